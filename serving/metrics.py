"""Prometheus metrics, one registry per server, every series labelled with the model.

Latencies are histograms (not Triton's cumulative counters) so p99 comes from
``histogram_quantile`` and aggregates across replicas. Buckets span 50 µs (a small CNN
on CPU) to 60 s (a large model on a busy GPU).

The series updated for every request are plain Python numbers changed only on the event
loop thread and rendered through a collector at scrape time: prometheus_client's own
Histogram takes a lock and walks its buckets on every observation, which was about
3 µs of the event loop's 21 µs of Python per request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from time import perf_counter, time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class LoopHistogram:
    """A histogram only the event loop thread updates: no lock, one bisect per value."""

    __slots__ = ("name", "doc", "bounds", "counts", "total")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.total += value

    def family(self, model: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=["model"])
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        family.add_metric([model], buckets, self.total)
        return family


class LoopCounter:
    """A counter only the event loop thread updates."""

    __slots__ = ("name", "doc", "value")

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def family(self, model: str) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=["model"])
        family.add_metric([model], self.value)
        return family


class Duration:
    """A count and a cumulative time, Triton's ``$duration_stat``; event loop thread only."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        """Count ``count`` occurrences that each took ``seconds``."""
        self.count += count
        self.seconds += seconds * count

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": round(self.seconds * 1e9)}


class Phases:
    """Where compute went: preparing the input (merge), the backend run, splitting the output."""

    __slots__ = ("input", "infer", "output")

    def __init__(self) -> None:
        self.input, self.infer, self.output = Duration(), Duration(), Duration()

    def add(self, marks: tuple[float, float, float, float], count: int = 1) -> None:
        """``marks``: perf_counter at the start, after the merge, after the run, at the end."""
        started, merged, ran, ended = marks
        self.input.add(merged - started, count)
        self.infer.add(ran - merged, count)
        self.output.add(ended - ran, count)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {
            "compute_input": self.input.to_json(),
            "compute_infer": self.infer.to_json(),
            "compute_output": self.output.to_json(),
        }


class _LoopSeries(Collector):
    def __init__(self, model: str, series: list[LoopHistogram | LoopCounter]) -> None:
        self.model = model
        self.series = series

    def collect(self) -> Iterator[Metric]:
        return (s.family(self.model) for s in self.series)


class Metrics:
    """Per-model series, with the label already bound so the hot path does no lookups."""

    def __init__(self, model: str, max_batch_size: int, info: dict[str, str]) -> None:
        # *_created series double the scrape size and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, [model]
        p = "tensorferry_"
        failure = Counter(
            p + "request_failure",
            "Requests answered with an error",
            ["model", "reason"],
            registry=r,
        )
        self.failure = {reason: failure.labels(model, reason) for reason in FAILURE_REASONS}
        self.success = LoopCounter(p + "request_success", "Requests answered 200")
        self.request_seconds = LoopHistogram(
            p + "request_duration_seconds",
            "Infer request latency, body parsed to answer written",
            LATENCY_BUCKETS,
        )
        self.queue_seconds = LoopHistogram(
            p + "queue_duration_seconds",
            "Time a request waited in the batch queue",
            LATENCY_BUCKETS,
        )
        self.compute_seconds = LoopHistogram(
            p + "compute_duration_seconds", "Time one batch spent in the backend", LATENCY_BUCKETS
        )
        self.batch_size = LoopHistogram(
            p + "batch_size", "Rows per backend execution", _batch_buckets(max_batch_size)
        )
        # Triton's statistics extension (GET .../stats, what perf_analyzer reads): the same
        # ground as the histograms, plus compute by phase and by exact batch size.
        # Successes are request_seconds less these (no second sum on the hot path).
        self.failed = Duration()  # queued requests answered with an error (timeout, backend)
        self.request_phases = Phases()  # each request counted once, in its first batch
        self.batch_phases: dict[int, Phases] = {}  # by rows in the batch
        self.last_batch_end: float | None = None  # perf_counter; wall clock derived on read
        self.inferences = LoopCounter(p + "inference_count", "Rows (images) inferred")
        self.executions = LoopCounter(p + "execution_count", "Backend executions (batches)")
        r.register(
            _LoopSeries(
                model,
                [
                    self.success,
                    self.request_seconds,
                    self.queue_seconds,
                    self.compute_seconds,
                    self.batch_size,
                    self.inferences,
                    self.executions,
                ],
            )
        )
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

    def _last_inference_ms(self) -> int:
        """When the last successful batch ended, in ms since the epoch (0: none yet)."""
        if self.last_batch_end is None:
            return 0
        return round((time() - (perf_counter() - self.last_batch_end)) * 1000)

    def statistics(self, model: str) -> dict[str, Any]:
        """Triton's ``$model_stat`` for ``model``: cumulative counts and nanoseconds."""
        queue = self.queue_seconds
        succeeded = Duration()
        succeeded.count = self.success.value
        succeeded.seconds = self.request_seconds.total - self.failed.seconds
        none = {"count": 0, "ns": 0}  # no response cache
        return {
            "name": model,
            "version": "1",
            "last_inference": self._last_inference_ms(),
            "inference_count": self.inferences.value,
            "execution_count": self.executions.value,
            "inference_stats": {
                "success": succeeded.to_json(),
                "fail": self.failed.to_json(),
                "queue": {"count": sum(queue.counts), "ns": round(queue.total * 1e9)},
                **self.request_phases.to_json(),
                "cache_hit": none,
                "cache_miss": none,
            },
            "batch_stats": [
                {"batch_size": rows, **phases.to_json()}
                for rows, phases in sorted(self.batch_phases.items())
            ],
        }
