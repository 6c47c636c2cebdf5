"""The dynamic-batching policy: which queued requests run together, and when.

Pure and clock-free (callers pass ``now``) so it is unit-tested over sizes and delays
without threads or sleeps. Semantics follow Triton's dynamic batcher, with two changes:
a request that finds the worker idle is not held back to wait for company, so
``max_delay_s`` only ever applies to requests that queued behind a running batch (this
matters at low load); and with several model instances each batch takes an even share
of the queue, not all of it, and a request larger than that share is split among the
idle instances (see ``take``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
# Rows start:stop of a queued request: (request, start, stop). A plain tuple, not a
# NamedTuple: a batch makes one per request while holding the GIL, at 5 ns against 200.
Part = tuple[T, int, int]


@dataclass(eq=False, slots=True)
class Pending(Generic[T]):
    """One queued request: ``rows`` batch rows that must come back to ``item``."""

    item: T
    rows: int
    enqueued: float
    queued: bool = field(default=True, repr=False)
    taken: int = field(default=0, repr=False)  # rows already handed out (a split request)


class BatchQueue(Generic[T]):
    """A bounded FIFO of requests that hands out batches of at most ``max_batch_size`` rows."""

    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue_size: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_s)
        self.max_queue_size = max_queue_size  # 0: unbounded, as in Triton
        self._queue: deque[Pending[T]] = deque()
        self._requests = 0
        self._rows = 0

    def __len__(self) -> int:
        return self._requests

    @property
    def rows(self) -> int:
        return self._rows

    def put(self, item: T, rows: int, now: float) -> Pending[T] | None:
        """Queue a request; ``None`` when the queue is full (reject it, don't block)."""
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"a request must have 1 to {self.max_batch_size} rows, not {rows}")
        if self.max_queue_size and self._requests >= self.max_queue_size:
            return None
        pending = Pending(item, rows, now)
        self._queue.append(pending)
        self._requests += 1
        self._rows += rows
        return pending

    def discard(self, pending: Pending[T]) -> bool:
        """Drop a still-queued request (it timed out); ``False`` if any of it already left."""
        if not pending.queued or pending.taken:
            return False
        # Marked, not removed: deque removal is O(n) and take() skips marked entries anyway.
        pending.queued = False
        self._requests -= 1
        self._rows -= pending.rows
        return True

    def ready(self, now: float, idle_since: float | None) -> bool:
        """Whether a batch should start now, given when the worker became idle (None: busy)."""
        self._drop_cancelled_head()
        if idle_since is None or not self._queue:
            return False
        oldest = self._queue[0].enqueued
        return (
            self._rows >= self.max_batch_size
            or oldest >= idle_since  # arrived to an idle worker: low load, go at once
            or now >= oldest + self.max_delay_s  # the same sum wake_at() returns
        )

    def take(self, instances: int = 1, idle_instances: int = 0) -> list[Part[T]]:
        """Pop the oldest requests, in order, while their rows fit in one batch.

        With several model instances sharing the queue, a batch holds at most an even
        share of the queued rows (always at least one request). Taking all of them let
        one instance run everything while the others got stragglers: every client then
        waited on one long batch, and single-image throughput with 2 instances fell by
        a quarter, with a third of the CPU idle. A request larger than the share, when
        ``idle_instances`` other instances are waiting for work, is split among them,
        so that a lone client's large request runs on every instance, not on one.
        """
        limit = min(self.max_batch_size, -(-self._rows // instances))
        batch: list[Part[T]] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if not head.queued:
                self._queue.popleft()
                continue
            left = head.rows - head.taken
            if batch and rows + left > limit:
                break
            if not batch and left > limit and idle_instances:
                rows = -(-left // (idle_instances + 1))
                batch.append((head.item, head.taken, head.taken + rows))
                head.taken += rows  # the rest stays at the head for the idle instances
                break
            self._queue.popleft()
            head.queued = False
            rows += left
            self._requests -= 1
            batch.append((head.item, head.taken, head.rows))
        self._rows -= rows
        return batch

    def wake_at(self) -> float | None:
        """When the oldest request's delay runs out; ``None`` with nothing queued."""
        self._drop_cancelled_head()
        return self._queue[0].enqueued + self.max_delay_s if self._queue else None

    def _drop_cancelled_head(self) -> None:
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()


def merge(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch from requests' arrays, in order (no copy for a batch of one).

    Not np.concatenate: it lets go of the GIL for every part above a few hundred elements,
    and taking it back from the busy event loop thread can wait out the interpreter's 5 ms
    switch interval, once per part (31 single images against a thread busy in Python:
    1.0-1.8 ms per merge on average, against 35-43 µs this way; ``benchmarks/bench_merge.py``).
    bytes.join copies under the GIL, letting go of it once for joins of 1 MiB and more.
    """
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    joined = b"".join([a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays])
    return np.frombuffer(joined, first.dtype).reshape(-1, *first.shape[1:])


def split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output, in order; views, not copies.

    Raises ValueError when an output has not one row per input row: slicing it anyway
    would hand some requests another request's rows or too few.
    """
    total = sum(rows)
    for name, array in outputs.items():
        if len(array) != total:
            raise ValueError(f"output '{name}' has {len(array)} rows for a batch of {total}")
    ends = np.cumsum(rows).tolist()
    return [
        {name: array[end - n : end] for name, array in outputs.items()}
        for n, end in zip(rows, ends, strict=True)
    ]
