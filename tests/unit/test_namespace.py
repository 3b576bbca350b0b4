"""The watched namespace is picked as kubectl picks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.kopf_embedding import watched_namespace

KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: work
contexts:
- name: work
  context: {cluster: local, user: me, namespace: apps}
- name: other
  context: {cluster: local, user: me, namespace: elsewhere}
clusters:
- name: local
  cluster: {server: "http://127.0.0.1:1"}
users:
- name: me
  user: {token: t}
"""


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    path.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def test_the_kubeconfig_context_namespace_is_watched_outside_a_cluster(kubeconfig: Path) -> None:
    namespace, source = watched_namespace("")
    assert namespace == "apps"
    assert "kubeconfig" in source


def test_the_setting_wins_over_the_kubeconfig(kubeconfig: Path) -> None:
    assert watched_namespace("team-a") == ("team-a", "TASK_TRACKING_NAMESPACE")


def test_a_context_without_namespace_means_default(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig.write_text(KUBECONFIG.replace(", namespace: apps", ""))
    assert watched_namespace("")[0] == "default"
