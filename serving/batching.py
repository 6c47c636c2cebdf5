"""The dynamic-batching policy: which queued requests run together, and when.

Pure and clock-free (callers pass ``now``) so it is unit-tested over sizes and delays
without threads or sleeps. Semantics follow Triton's dynamic batcher, with two changes:
a request that finds the worker idle is not held back to wait for company, so
``max_delay_s`` only ever applies to requests that queued behind a running batch (this
matters at low load); and with several model instances each batch takes an even share
of the queue, not all of it, and a request larger than that share is split among the
idle instances (see ``take``). As in Triton, only requests whose inputs have the same
non-batch shapes (the same ``group``) share a batch; the oldest request's group goes first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
# Rows start:stop of a queued request: (request, start, stop). A plain tuple, not a
# NamedTuple: a batch makes one per request while holding the GIL, at 5 ns against 200.
Part = tuple[T, int, int]


@dataclass(eq=False, slots=True)
class _Group(Generic[T]):
    """The queued requests that may share a batch, in arrival order."""

    key: Hashable
    queue: deque[Pending[T]] = field(default_factory=deque)
    rows: int = 0  # not yet handed out, so a split request counts only its rest


@dataclass(eq=False, slots=True)
class Pending(Generic[T]):
    """One queued request: ``rows`` batch rows that must come back to ``item``."""

    item: T
    rows: int
    enqueued: float
    group: _Group[T] = field(repr=False)
    queued: bool = field(default=True, repr=False)
    taken: int = field(default=0, repr=False)  # rows already handed out (a split request)


class BatchQueue(Generic[T]):
    """A bounded queue of requests that hands out batches of at most ``max_batch_size`` rows.

    Each group waits in its own FIFO; ``_order`` holds every request in arrival order, so
    its head names the group to serve next without a search over the groups.
    """

    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue_size: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_s)
        self.max_queue_size = max_queue_size  # 0: unbounded, as in Triton
        self._groups: dict[Hashable, _Group[T]] = {}
        self._order: deque[Pending[T]] = deque()
        self._full_groups = 0  # so that ready() needs no search over the groups either
        self._requests = 0
        self._rows = 0

    def __len__(self) -> int:
        return self._requests

    @property
    def rows(self) -> int:
        return self._rows

    def put(self, item: T, rows: int, now: float, group: Hashable = None) -> Pending[T] | None:
        """Queue a request; ``None`` when the queue is full (reject it, don't block).

        Only requests with equal ``group`` keys share a batch (for a model with dynamic
        dims, the tuple of every input's non-batch shape); by default all share one group.
        """
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"a request must have 1 to {self.max_batch_size} rows, not {rows}")
        if self.max_queue_size and self._requests >= self.max_queue_size:
            return None
        queued = self._groups.get(group)
        if queued is None:
            queued = self._groups[group] = _Group(group)
        pending = Pending(item, rows, now, queued)
        queued.queue.append(pending)
        self._order.append(pending)
        before = queued.rows
        queued.rows = before + rows
        if before < self.max_batch_size <= queued.rows:
            self._full_groups += 1
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
        self._hand_out(pending.group, pending.rows)
        return True

    def ready(self, now: float, idle_since: float | None) -> bool:
        """Whether a batch should start now, given when the worker became idle (None: busy)."""
        oldest = self._oldest()
        if idle_since is None or oldest is None:
            return False
        return (
            # Any full group: take() still serves the oldest, but no worker idles beside a batch.
            self._full_groups > 0
            or oldest.enqueued >= idle_since  # arrived to an idle worker: low load, go at once
            or now >= oldest.enqueued + self.max_delay_s  # the same sum wake_at() returns
        )

    def take(self, instances: int = 1, idle_instances: int = 0) -> list[Part[T]]:
        """Pop the oldest request and those after it in its group while their rows fit in one batch.

        With several model instances sharing the queue, a batch holds at most an even
        share of the group's queued rows (always at least one request). Taking all of them
        let one instance run everything while the others got stragglers: every client then
        waited on one long batch, and single-image throughput with 2 instances fell by
        a quarter, with a third of the CPU idle. A request larger than the share, when
        ``idle_instances`` other instances are waiting for work, is split among them,
        so that a lone client's large request runs on every instance, not on one.
        """
        if (oldest := self._oldest()) is None:
            return []
        group = oldest.group
        queue = group.queue
        limit = min(self.max_batch_size, -(-group.rows // instances))
        batch: list[Part[T]] = []
        rows = 0
        while queue:
            head = queue[0]
            if not head.queued:
                queue.popleft()
                continue
            left = head.rows - head.taken
            if batch and rows + left > limit:
                break
            if not batch and left > limit and idle_instances:
                rows = -(-left // (idle_instances + 1))
                batch.append((head.item, head.taken, head.taken + rows))
                head.taken += rows  # the rest stays at the head for the idle instances
                break
            queue.popleft()
            head.queued = False
            rows += left
            self._requests -= 1
            batch.append((head.item, head.taken, head.rows))
        self._hand_out(group, rows)
        return batch

    def wake_at(self) -> float | None:
        """When the oldest request's delay runs out; ``None`` with nothing queued."""
        oldest = self._oldest()
        return None if oldest is None else oldest.enqueued + self.max_delay_s

    def _oldest(self) -> Pending[T] | None:
        order = self._order
        while order and not order[0].queued:
            order.popleft()
        return order[0] if order else None

    def _hand_out(self, group: _Group[T], rows: int) -> None:
        """Count ``rows`` of ``group`` as gone (run or discarded)."""
        full = group.rows >= self.max_batch_size
        group.rows -= rows
        self._rows -= rows
        if full and group.rows < self.max_batch_size:
            self._full_groups -= 1
        if not group.rows and len(self._groups) > 1:
            # Empty groups go, so that many distinct shapes cannot pile up; but the last one
            # stays (at most one is ever empty), or one shape would rebuild it every batch.
            del self._groups[group.key]


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
    if first.dtype.kind == "O":
        # BYTES tensors hold references: bytes.join would copy bare pointers (np.frombuffer
        # then refuses them), and concatenate, counting each one, keeps the GIL here anyway.
        return np.concatenate(arrays)
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


def pad_merge(arrays: list[np.ndarray], axis: int, pad_value: float) -> np.ndarray:
    """One batch from requests' arrays that differ in length along ``axis``: each request's
    rows right-padded with ``pad_value`` to the longest (``merge`` when all are as long)."""
    longest = max(a.shape[axis] for a in arrays)
    if all(a.shape[axis] == longest for a in arrays):
        return merge(arrays)
    first = arrays[0]
    shape = list(first.shape)
    shape[0], shape[axis] = sum(len(a) for a in arrays), longest
    batch = np.full(shape, pad_value, first.dtype)
    index: list[slice] = [slice(None)] * first.ndim
    start = 0
    for array in arrays:
        index[0] = slice(start, start + len(array))
        index[axis] = slice(0, array.shape[axis])
        batch[tuple(index)] = array
        start += len(array)
    return batch
