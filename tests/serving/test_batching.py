"""The batch policy as a pure object: sizes, delays, the idle rule, timeouts, the bound, shapes."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.batching import BatchQueue, Pending, merge, pad_merge

IDLE_LONG_AGO = float("-inf")
BUSY = None


def take(queue: BatchQueue[str], instances: int = 1) -> list[str]:
    """The requests a batch takes, with no idle instance to split one with."""
    return [item for item, _, _ in queue.take(instances)]


def queue_of(
    *rows: int, max_batch: int = 8, delay: float = 0.001, at: float = 0.0
) -> BatchQueue[str]:
    queue: BatchQueue[str] = BatchQueue(max_batch, delay)
    for i, n in enumerate(rows):
        queue.put(f"r{i}", n, at)
    return queue


def test_request_to_an_idle_worker_goes_at_once() -> None:
    queue = queue_of(1, at=5.0)
    assert queue.ready(now=5.0, idle_since=IDLE_LONG_AGO)
    assert take(queue) == ["r0"]


def test_nothing_starts_while_the_worker_is_busy() -> None:
    queue = queue_of(8, 8)
    assert not queue.ready(now=100.0, idle_since=BUSY)


def test_requests_that_queued_behind_a_batch_wait_up_to_the_delay() -> None:
    queue = queue_of(1, 2, delay=0.001, at=1.0)  # arrived while a batch ran
    assert not queue.ready(now=1.0005, idle_since=1.0002)
    assert queue.wake_at() == pytest.approx(1.001)
    assert queue.ready(now=1.001, idle_since=1.0002)
    assert take(queue) == ["r0", "r1"]


def test_full_batch_goes_without_waiting() -> None:
    queue = queue_of(4, 4, 3, max_batch=8, delay=10.0, at=1.0)
    assert queue.ready(now=1.0, idle_since=2.0)
    assert take(queue) == ["r0", "r1"]  # 8 rows; r2 would overflow
    assert len(queue) == 1 and queue.rows == 3


def test_take_keeps_order_and_never_splits_a_request() -> None:
    queue = queue_of(3, 6, 1, max_batch=8)
    assert take(queue) == ["r0"]  # r1 doesn't fit after r0, and r2 must not overtake it
    assert take(queue) == ["r1", "r2"]
    assert take(queue) == []


def test_with_several_instances_a_batch_takes_an_even_share_of_the_queue() -> None:
    queue = queue_of(*[1] * 9, max_batch=8)
    assert take(queue, instances=2) == ["r0", "r1", "r2", "r3", "r4"]  # ceil(9 / 2) rows
    assert take(queue, instances=2) == ["r5", "r6"]
    assert take(queue, instances=2) == ["r7"]
    assert take(queue, instances=2) == ["r8"]


def test_a_request_larger_than_the_share_goes_whole_and_alone_when_no_instance_is_idle() -> None:
    queue = queue_of(6, 1, 1, max_batch=8)
    assert take(queue, instances=2) == ["r0"]  # 6 rows > ceil(8 / 2): alone, not split
    assert take(queue, instances=2) == ["r1"]
    assert take(queue, instances=3) == ["r2"]


def test_a_request_larger_than_the_share_is_split_among_the_idle_instances() -> None:
    queue = queue_of(64, 1, max_batch=64)
    # 3 instances, all idle: this one and 2 others each take a third of the 64 rows
    assert queue.take(instances=3, idle_instances=2) == [("r0", 0, 22)]
    assert len(queue) == 2 and queue.rows == 43
    assert queue.take(instances=3, idle_instances=1) == [("r0", 22, 43)]
    assert queue.take(instances=3, idle_instances=0) == [("r0", 43, 64)]  # the rest
    assert queue.take(instances=3, idle_instances=2) == [("r1", 0, 1)]
    assert len(queue) == 0 and queue.rows == 0


def test_a_split_request_can_no_longer_be_discarded() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0)
    pending = queue.put("a", 8, 0.0)
    assert pending is not None
    assert queue.take(instances=2, idle_instances=1) == [("a", 0, 4)]
    assert not queue.discard(pending)  # half of it is running: it completes
    assert queue.take(instances=2) == [("a", 4, 8)]


def test_zero_delay_always_ready_when_idle() -> None:
    queue = queue_of(1, delay=0.0, at=3.0)
    assert queue.ready(now=3.0, idle_since=4.0)


def test_bounded_queue_rejects_instead_of_blocking() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0, max_queue_size=2)
    assert queue.put("a", 1, 0.0) and queue.put("b", 1, 0.0)
    assert queue.put("c", 1, 0.0) is None
    take(queue)
    assert queue.put("c", 1, 0.0) is not None


def test_discard_removes_a_timed_out_request_only_while_queued() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0)
    a = queue.put("a", 2, 0.0)
    b = queue.put("b", 3, 0.0)
    assert a is not None and b is not None
    assert queue.discard(a) and not queue.discard(a)
    assert len(queue) == 1 and queue.rows == 3
    assert take(queue) == ["b"]
    assert not queue.discard(b)  # already running: it completes
    assert queue.wake_at() is None


def test_rejects_impossible_row_counts() -> None:
    queue: BatchQueue[str] = BatchQueue(4, 0.0)
    with pytest.raises(ValueError):
        queue.put("big", 5, 0.0)
    with pytest.raises(ValueError):
        BatchQueue(0, 0.0)


@given(
    rows=st.lists(st.integers(1, 16), min_size=1, max_size=60),
    max_batch=st.integers(16, 64),
    cancel=st.sets(st.integers(0, 59)),
    instances=st.integers(1, 4),
    idle=st.lists(st.integers(0, 3), min_size=1, max_size=8),
)
def test_every_row_comes_back_once_in_order_within_the_cap(
    rows, max_batch, cancel, instances, idle
) -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch, 0.0)
    pendings = [queue.put(i, n, 0.0) for i, n in enumerate(rows)]
    for i in cancel:
        if i < len(pendings):
            queue.discard(pendings[i])
    taken: list[tuple[int, int, int]] = []
    for step in itertools.count():
        idle_instances = min(idle[step % len(idle)], instances - 1)
        share = -(-queue.rows // instances)
        if not (batch := queue.take(instances, idle_instances)):
            break
        taken_rows = sum(stop - start for _, start, stop in batch)
        assert taken_rows <= max_batch
        assert len(batch) == 1 or taken_rows <= share
        item, start, stop = batch[0]
        if stop < rows[item]:  # split: only with idle instances, evenly
            assert len(batch) == 1 and idle_instances
            assert stop - start == -(-(rows[item] - start) // (idle_instances + 1))
        taken += batch
    assert taken == sorted(taken), "requests or their parts left out of order"
    for i, n in enumerate(rows):
        ranges = [(start, stop) for item, start, stop in taken if item == i]
        expected_starts = [0] + [stop for _, stop in ranges[:-1]]
        assert [start for start, _ in ranges] == ([] if i in cancel else expected_starts)
        assert i in cancel or ranges[-1][1] == n  # every row of every request, once
    assert len(queue) == 0 and queue.rows == 0


# groups: requests of other shapes -----------------------------------------------------------------
SHORT, LONG = ((1, 16),), ((1, 64),)  # group keys: each input's non-batch shape


def test_different_groups_never_share_a_batch() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0)
    for name, group in (("a", SHORT), ("b", LONG), ("c", SHORT), ("d", LONG)):
        queue.put(name, 1, 0.0, group)
    assert take(queue) == ["a", "c"]
    assert take(queue) == ["b", "d"]
    assert take(queue) == []


def test_the_oldest_group_goes_first_even_when_a_younger_one_is_full() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 10.0)
    queue.put("short", 1, 1.0, SHORT)  # queued behind a running batch: would wait 10 s
    assert not queue.ready(now=1.0, idle_since=2.0)
    queue.put("long1", 4, 1.0, LONG)
    queue.put("long2", 4, 1.0, LONG)
    assert queue.ready(now=1.0, idle_since=2.0)  # a full batch is waiting: don't idle
    assert take(queue) == ["short"]
    assert take(queue) == ["long1", "long2"]


def test_the_even_share_is_of_the_group_taken() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0)
    for i in range(4):
        queue.put(f"s{i}", 1, 0.0, SHORT)
    queue.put("long", 8, 0.0, LONG)
    assert take(queue, instances=2) == ["s0", "s1"]  # ceil(4 / 2) of SHORT's rows, not of 12


def test_emptied_groups_are_dropped_but_the_last_is_kept_for_the_next_batch() -> None:
    queue: BatchQueue[int] = BatchQueue(8, 0.0)
    for shape in range(100):  # a client sending a new shape every time
        queue.put(shape, 1, float(shape), ((shape,),))
        if shape % 2:
            queue.take()
    assert len(queue._groups) == 50
    while queue.take():
        pass
    assert len(queue._groups) == 1 and not queue


def test_discard_across_groups() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.5)
    a = queue.put("a", 2, 1.0, SHORT)
    b = queue.put("b", 3, 2.0, LONG)
    queue.put("c", 1, 3.0, SHORT)
    assert a is not None and b is not None
    assert queue.discard(a)
    assert len(queue) == 2 and queue.rows == 4
    assert queue.wake_at() == 2.5  # b is now the oldest, though in another group
    assert take(queue) == ["b"]
    assert not queue.discard(b)
    d = queue.put("d", 1, 4.0, ((1, 32),))
    assert d is not None and len(queue._groups) == 2
    assert queue.discard(d) and len(queue._groups) == 1  # discarding can empty a group too
    assert take(queue) == ["c"] and queue.wake_at() is None


def test_the_bound_counts_requests_of_every_group() -> None:
    queue: BatchQueue[str] = BatchQueue(8, 0.0, max_queue_size=2)
    assert queue.put("a", 1, 0.0, SHORT) and queue.put("b", 1, 0.0, LONG)
    assert queue.put("c", 1, 0.0, ((1, 32),)) is None
    assert len(queue._groups) == 2  # a rejected request leaves no group behind
    take(queue)
    assert queue.put("c", 1, 0.0, ((1, 32),)) is not None


@dataclass
class Request:
    group: Hashable
    rows: int
    at: float
    pending: Pending[int]
    parts: list[tuple[int, int]] = field(default_factory=list)
    discarded: bool = False

    @property
    def left(self) -> int:
        return self.rows - sum(stop - start for start, stop in self.parts)

    @property
    def queued(self) -> bool:
        return not self.discarded and self.left > 0


class Reference:
    """What the queue must do, worked out from every request it was given."""

    def __init__(self, queue: BatchQueue[int]) -> None:
        self.queue = queue
        self.requests: list[Request] = []
        self.now = 0.0

    def waiting(self, group: Hashable = ...) -> list[int]:
        """Queued requests in arrival order, of one group or (by default) all."""
        return [
            i
            for i, r in enumerate(self.requests)
            if r.queued and (group is ... or r.group == group)
        ]

    def put(self, group: Hashable, rows: int, dt: float) -> None:
        self.now += dt
        rows = min(rows, self.queue.max_batch_size)
        bound = self.queue.max_queue_size
        pending = self.queue.put(len(self.requests), rows, self.now, group)
        assert (pending is None) == bool(bound and len(self.waiting()) >= bound)
        if pending is not None:
            self.requests.append(Request(group, rows, self.now, pending))

    def discard(self, index: int) -> None:
        if self.requests:
            request = self.requests[index % len(self.requests)]
            discardable = request.queued and not request.parts
            assert self.queue.discard(request.pending) == discardable
            request.discarded |= discardable

    def take(self, instances: int, idle: int) -> None:
        idle = min(idle, instances - 1)
        waiting = self.waiting()
        batch = self.queue.take(instances, idle)
        if not waiting:
            assert batch == []
            return
        # The group of the oldest request anywhere, from its oldest request on, in order.
        group = self.waiting(self.requests[waiting[0]].group)
        assert [item for item, _, _ in batch] == group[: len(batch)]
        rows = sum(stop - start for _, start, stop in batch)
        share = -(-sum(self.requests[i].left for i in group) // instances)
        assert rows <= self.queue.max_batch_size and (len(batch) == 1 or rows <= share)
        for item, start, stop in batch:
            request = self.requests[item]
            assert start == request.rows - request.left < stop  # picks up where it stopped
            request.parts.append((start, stop))

    def check(self) -> None:
        queue, waiting = self.queue, [self.requests[i] for i in self.waiting()]
        assert len(queue) == len(waiting) and queue.rows == sum(r.left for r in waiting)
        assert queue.wake_at() == (waiting[0].at + queue.max_delay_s if waiting else None)
        rows = {r.group: 0 for r in waiting}
        for r in waiting:
            rows[r.group] += r.left
        # With the other two rules kept from firing, ready() says whether a group is full.
        full = any(n >= queue.max_batch_size for n in rows.values())
        assert queue.ready(float("-inf"), float("inf")) == full
        assert rows.keys() <= queue._groups.keys() and len(queue._groups) <= len(rows) + 1


GROUPS = st.sampled_from([None, SHORT, LONG, ((1, 16), (1, 16))])
PUT = st.tuples(st.just("put"), GROUPS, st.integers(1, 16), st.sampled_from([0, 0.0004, 0.003]))
OPS = st.one_of(  # two puts to a take, so that groups pile up
    PUT,
    PUT,
    st.tuples(st.just("take"), st.integers(1, 3), st.integers(0, 2)),
    st.tuples(st.just("discard"), st.integers(0, 79)),
)


@given(
    ops=st.lists(OPS, min_size=10, max_size=80),
    max_batch=st.integers(8, 16),
    bound=st.integers(0, 12),
)
def test_mixed_groups_each_row_once_one_group_a_batch_oldest_group_first(
    ops, max_batch, bound
) -> None:
    """Any mix of shapes, takes on 1 to 3 instances and timeouts, on a fake clock."""
    reference = Reference(BatchQueue(max_batch, 0.001, bound))
    for name, *args in ops:
        getattr(reference, name)(*args)
        reference.check()
    while reference.waiting():
        reference.take(1, 0)
    reference.check()
    for request in reference.requests:  # every row of every request once, or none if discarded
        starts = [0] + [stop for _, stop in request.parts]
        assert [start for start, _ in request.parts] == starts[:-1]
        assert starts[-1] == (0 if request.discarded else request.rows)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float16, np.bool_, np.int64])
def test_merge_equals_concatenate(dtype) -> None:
    rng = np.random.default_rng(0)
    arrays = [(rng.random((n, 3, 2, 2)) * 100).astype(dtype) for n in (1, 4, 2)]
    arrays[1] = arrays[1][::2]  # a non-contiguous view (rows 0 and 2) is copied, not refused
    merged = merge(arrays)
    assert merged.dtype == dtype and merged.shape == (5, 3, 2, 2)
    np.testing.assert_array_equal(merged, np.concatenate(arrays))
    assert merge(arrays[:1]) is arrays[0]  # a batch of one request is not copied


def test_merge_joins_bytes_tensors() -> None:
    arrays = [np.array([[b"a", b"bc"]], object), np.array([[b"", b"d"], [b"e", b"f"]], object)]
    merged = merge(arrays)
    assert merged.dtype == object and merged.tolist() == [[b"a", b"bc"], [b"", b"d"], [b"e", b"f"]]


def test_pad_merge_pads_each_request_to_the_longest_along_its_axis() -> None:
    series = [np.full((1, 2, 3), 1.0, np.float32), np.full((2, 2, 5), 2.0, np.float32)]
    merged = pad_merge(series, axis=2, pad_value=-1.0)
    assert merged.shape == (3, 2, 5) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged[0, :, :3], 1.0)
    np.testing.assert_array_equal(merged[0, :, 3:], -1.0)  # the pad value, past its length
    np.testing.assert_array_equal(merged[1:], 2.0)
    ids = [np.arange(4).reshape(1, 4), np.arange(2).reshape(1, 2) + 7]
    np.testing.assert_array_equal(pad_merge(ids, 1, 0), [[0, 1, 2, 3], [7, 8, 0, 0]])


def test_pad_merge_of_equal_lengths_is_merge() -> None:
    arrays = [np.ones((1, 4), np.int64), np.zeros((3, 4), np.int64)]
    np.testing.assert_array_equal(pad_merge(arrays, 1, 9), np.concatenate(arrays))
    assert pad_merge(arrays[:1], 1, 9) is arrays[0]
