"""The chart's http.host value: rendered as TASK_TRACKING_HTTP_HOST, checked by the schema."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import HelmRefused
from .test_chart_render import env_of, sidecar_of


def test_http_host_reaches_the_sidecar_and_the_settings_accept_it(render: Any) -> None:
    from sidecar.config import load_settings

    env = env_of(sidecar_of(render({"http": {"host": "::"}})))
    assert env["TASK_TRACKING_HTTP_HOST"] == "::"
    settings = load_settings(
        {"TASK_TRACKING_REDIS_URL": "redis://r", "TASK_TRACKING_HTTP_HOST": "::"}
    )
    assert settings.http_host == "::"


@pytest.mark.parametrize("host", ["", "0.0.0.0 --x", "a/b"])
def test_the_schema_refuses_a_malformed_host(render: Any, host: str) -> None:
    with pytest.raises(HelmRefused, match="host"):
        render({"http": {"host": host}})


def test_a_malformed_host_stops_start_up_with_one_line_naming_the_variable() -> None:
    from sidecar.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings({"TASK_TRACKING_REDIS_URL": "redis://r", "TASK_TRACKING_HTTP_HOST": "a b"})
    message = str(refused.value)
    assert message.startswith("TASK_TRACKING_HTTP_HOST='a b' is invalid") and "\n" not in message
