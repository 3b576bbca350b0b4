"""`observe_many` leaves a histogram exactly as one `observe(max(0, v))` per value would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import LATENCY_BUCKETS, observe_many

BOUNDS = [*LATENCY_BUCKETS, float("inf")]
values = st.lists(
    st.sampled_from([-1.0, 0.0, *LATENCY_BUCKETS]) | st.floats(-10, 100, allow_nan=False)
)


def _samples(registry: CollectorRegistry) -> dict[str, float | None]:
    samples: dict[str, float | None] = {"sum": registry.get_sample_value("h_sum")}
    for bound in BOUNDS:
        le = "+Inf" if bound == float("inf") else str(float(bound))
        samples[le] = registry.get_sample_value("h_bucket", {"le": le})
    return samples


@given(values)
def test_observe_many_equals_observing_one_by_one(observed: list[float]) -> None:
    one_by_one, many = CollectorRegistry(), CollectorRegistry()
    single = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=one_by_one)
    for value in observed:
        single.observe(max(0.0, value))
    observe_many(Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=many), list(observed))
    expected, got = _samples(one_by_one), _samples(many)
    assert got.pop("sum") == pytest.approx(expected.pop("sum"))  # summed in another order
    assert got == expected
