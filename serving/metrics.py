"""Prometheus metrics, one registry per server, every series labelled with the model.

Latencies are histograms (not Triton's cumulative counters) so p99 comes from
``histogram_quantile`` and aggregates across replicas. Buckets span 50 µs (a small CNN
on CPU) to 60 s (a large model on a busy GPU).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
FAILURE_REASONS = ("rejected", "timeout", "bad_request", "backend")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    edges, size = [], 1
    while size < max_batch_size:
        edges.append(float(size))
        size *= 2
    return (*edges, float(max_batch_size))


class Metrics:
    """Per-model series, with the label already bound so the hot path does no lookups."""

    def __init__(self, model: str, max_batch_size: int, info: dict[str, str]) -> None:
        # *_created series double the scrape size and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, [model]
        p = "tensorferry_"
        success = Counter(p + "request_success", "Requests answered 200", ["model"], registry=r)
        failure = Counter(
            p + "request_failure",
            "Requests answered with an error",
            ["model", "reason"],
            registry=r,
        )
        self.success = success.labels(*m)
        self.failure = {reason: failure.labels(model, reason) for reason in FAILURE_REASONS}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(p + name, doc, ["model"], buckets=buckets, registry=r).labels(*m)

        self.request_seconds = histogram(
            "request_duration_seconds",
            "Infer request latency, body parsed to answer written",
            LATENCY_BUCKETS,
        )
        self.queue_seconds = histogram(
            "queue_duration_seconds", "Time a request waited in the batch queue", LATENCY_BUCKETS
        )
        self.compute_seconds = histogram(
            "compute_duration_seconds", "Time one batch spent in the backend", LATENCY_BUCKETS
        )
        self.batch_size = histogram(
            "batch_size", "Rows per backend execution", _batch_buckets(max_batch_size)
        )
        self.inferences = Counter(
            p + "inference_count", "Rows (images) inferred", ["model"], registry=r
        ).labels(*m)
        self.executions = Counter(
            p + "execution_count", "Backend executions (batches)", ["model"], registry=r
        ).labels(*m)
        self.pending = Gauge(
            p + "pending_requests", "Requests queued for a batch", ["model"], registry=r
        ).labels(*m)
        self.inflight = Gauge(
            p + "inflight_requests",
            "Infer requests accepted and not yet answered",
            ["model"],
            registry=r,
        ).labels(*m)
        self.load_seconds = Gauge(
            p + "model_load_duration_seconds",
            "Time to load and warm the model",
            ["model"],
            registry=r,
        ).labels(*m)
        labels = sorted(info)
        Gauge(
            p + "model_info",
            "Backend, provider and runtime versions (value is always 1)",
            ["model", *labels],
            registry=r,
        ).labels(model, *(info[k] for k in labels)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
