"""The batch policy as a pure object: sizes, delays, the idle rule, timeouts, the bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.batching import BatchQueue, merge

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


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float16, np.bool_, np.int64])
def test_merge_equals_concatenate(dtype) -> None:
    rng = np.random.default_rng(0)
    arrays = [(rng.random((n, 3, 2, 2)) * 100).astype(dtype) for n in (1, 4, 2)]
    arrays[1] = arrays[1][::2]  # a non-contiguous view (rows 0 and 2) is copied, not refused
    merged = merge(arrays)
    assert merged.dtype == dtype and merged.shape == (5, 3, 2, 2)
    np.testing.assert_array_equal(merged, np.concatenate(arrays))
    assert merge(arrays[:1]) is arrays[0]  # a batch of one request is not copied
