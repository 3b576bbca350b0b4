"""What keeps the sidecar light: nothing imported that the configuration does not use, and
an S3 client without the data the sidecar never uses (README, "Footprint")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import botocore

from sidecar.s3_client import ENDPOINT_SERVICES, SidecarFileLoader, lean_session

DATA = Path(botocore.__file__).parent / "data"


def test_the_sidecar_without_s3_or_a_watch_imports_neither_botocore_nor_kopf() -> None:
    code = (
        "import sys, sidecar.runtime, sidecar.cli, sidecar.replay\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'botocore', 'aiobotocore',"
        " 'kopf', 'boto3'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_endpoint_data_keeps_s3_and_sts_only() -> None:
    data = SidecarFileLoader().load_file(str(DATA / "endpoints"))
    assert data["partitions"], "no partitions loaded"
    for partition in data["partitions"]:
        assert set(partition["services"]) <= ENDPOINT_SERVICES
    assert "s3" in data["partitions"][0]["services"]
    assert type(data) is dict  # not botocore's OrderedDict per object


def test_the_s3_model_keeps_its_shapes_without_the_prose() -> None:
    model = SidecarFileLoader().load_file(str(DATA / "s3/2006-03-01/service-2"))
    assert "PutObject" in model["operations"]
    assert model["operations"]["PutObject"]["documentation"] == ""
    assert "IfNoneMatch" in model["shapes"]["PutObjectRequest"]["members"]


async def test_a_client_from_the_lean_session_builds_requests() -> None:
    session = lean_session()
    session.set_credentials("test", "test")
    async with session.create_client(
        "s3", region_name="eu-west-1", endpoint_url="http://127.0.0.1:9"
    ) as client:
        request = await client.generate_presigned_url(
            "put_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
        )
        assert request.startswith("http://127.0.0.1:9/b/k?")
        assert client.meta.region_name == "eu-west-1"
