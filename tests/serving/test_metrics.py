"""The event-loop histogram and counter must expose what prometheus_client's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import LATENCY_BUCKETS, Metrics

NAME = "tensorferry_request_duration_seconds"


def samples(text: bytes, name: str) -> dict[tuple, float]:
    family = next(f for f in text_string_to_metric_families(text.decode()) if f.name == name)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


values = st.floats(min_value=0, max_value=120, allow_nan=False)


@given(st.lists(values, max_size=60) | st.lists(st.sampled_from(LATENCY_BUCKETS), max_size=20))
def test_latency_histogram_matches_prometheus_client(observed: list[float]) -> None:
    # Bucket edges themselves are in the second strategy: le is inclusive in both.
    ours = Metrics("m", 64, {"backend": "onnxruntime"})
    registry = CollectorRegistry()
    reference = Histogram(NAME, "doc", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    child = reference.labels("m")
    for value in observed:
        ours.request_seconds.observe(value)
        child.observe(value)
    got, want = samples(ours.render(), NAME), samples(generate_latest(registry), NAME)
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    total = (NAME + "_sum", (("model", "m"),))
    assert got.pop(total) == pytest.approx(want.pop(total))  # same sum, maybe summed apart
    assert got == want


def test_counters_and_batch_histogram_render_with_the_model_label() -> None:
    metrics = Metrics("seed_cnn", 8, {"backend": "onnxruntime"})
    for rows in (1, 3, 8, 8):
        metrics.batch_size.observe(rows)
        metrics.inferences.inc(rows)
        metrics.executions.inc()
    metrics.success.inc()
    text = metrics.render()
    label = (("model", "seed_cnn"),)
    batch = samples(text, "tensorferry_batch_size")
    assert batch[("tensorferry_batch_size_bucket", (("le", "2.0"), *label))] == 1
    assert batch[("tensorferry_batch_size_bucket", (("le", "4.0"), *label))] == 2
    assert batch[("tensorferry_batch_size_bucket", (("le", "8.0"), *label))] == 4
    assert batch[("tensorferry_batch_size_count", label)] == 4
    inferences = samples(text, "tensorferry_inference_count")
    assert inferences[("tensorferry_inference_count_total", label)] == 20
    success = samples(text, "tensorferry_request_success")
    assert success[("tensorferry_request_success_total", label)] == 1


def test_statistics_split_request_time_into_success_and_failure() -> None:
    """Triton's $model_stat: successes are what the request histogram holds beyond failures."""
    metrics = Metrics("seed_cnn", 8, {"backend": "onnxruntime"})
    for seconds in (0.002, 0.003):  # answered 200
        metrics.success.inc()
        metrics.request_seconds.observe(seconds)
    metrics.failed.add(0.05)  # a queue timeout
    metrics.request_seconds.observe(0.05)
    metrics.queue_seconds.observe(0.001)
    metrics.request_phases.add((1.0, 1.0001, 1.0021, 1.0022), count=2)  # one batch, 2 requests
    stats = metrics.statistics("seed_cnn")["inference_stats"]
    assert stats["success"] == {"count": 2, "ns": 5_000_000}
    assert stats["fail"] == {"count": 1, "ns": 50_000_000}
    assert stats["queue"] == {"count": 1, "ns": 1_000_000}
    # Each request of the batch is counted with the batch's whole phase.
    assert stats["compute_input"] == {"count": 2, "ns": 200_000}
    assert stats["compute_infer"] == {"count": 2, "ns": 4_000_000}
    assert stats["compute_output"] == {"count": 2, "ns": 200_000}
