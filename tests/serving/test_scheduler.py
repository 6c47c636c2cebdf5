"""The scheduler on a real onnxruntime model, with the event loop kept busy on purpose."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import numpy as np
import pytest

from serving.backends import load_backend
from serving.batching import BatchQueue
from serving.metrics import Metrics
from serving.scheduler import BackendFailure, Job, Scheduler
from tests.serving.serving_helpers import build_model


@pytest.fixture(scope="module")
def slow_backend(tmp_path_factory: pytest.TempPathFactory):
    """About 0.3 s per run (1 intra-op thread), whatever the batch or its pixels."""
    model = build_model(tmp_path_factory.mktemp("slow") / "slow.onnx", slow_rounds=120)
    return load_backend(model, "cpu", 1, None)


class CountedRuns:
    """The real backend; ``second_started`` is set when its second run begins."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.runs = 0
        self.second_started = threading.Event()

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        if self.runs == 2:
            self.second_started.set()
        return self.backend.run(batch)


async def _queue_behind_a_running_batch_then_block_the_loop(backend: CountedRuns) -> bool:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler([backend], BatchQueue(1, 0.0), Metrics("slow", 1, {}), loop)
    scheduler.start()
    answered: list[asyncio.Future] = [loop.create_future() for _ in range(2)]
    image = np.zeros((1, 3, 8, 8), np.uint8)

    def done_for(i: int):
        return lambda outputs, error: answered[i].set_result(error)

    assert scheduler.submit({"images": image}, len(image), done_for(0), None)
    await asyncio.sleep(0.05)  # the pass ends, the idle worker takes the first batch
    assert scheduler.submit(
        {"images": image}, len(image), done_for(1), None
    )  # one row per batch: it must wait
    # The event loop is stuck here (a blocking wait): it can hand nothing over, answer nothing.
    started_while_blocked = backend.second_started.wait(30)
    assert await asyncio.wait_for(asyncio.gather(*answered), 10) == [None, None]
    scheduler.stop()
    return started_while_blocked


def test_the_worker_starts_queued_work_while_the_event_loop_is_busy(slow_backend) -> None:
    backend = CountedRuns(slow_backend)
    started_while_blocked = asyncio.run(_queue_behind_a_running_batch_then_block_the_loop(backend))
    assert backend.runs == 2
    assert started_while_blocked, (
        "the second batch waited for the event loop instead of starting when the first ended"
    )


async def _answer_twenty(backend, timeout_s: float | None) -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler([backend], BatchQueue(4, 0.0), Metrics("tiny", 4, {}), loop)
    scheduler.start()
    answered = [loop.create_future() for _ in range(20)]
    for future in answered:
        done = lambda outputs, error, future=future: future.set_result(error)  # noqa: E731
        assert scheduler.submit({"images": np.zeros((1, 3, 8, 8), np.uint8)}, 1, done, timeout_s)
    assert await asyncio.wait_for(asyncio.gather(*answered), 10) == [None] * 20
    scheduler.stop()


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["no-timeout", "timeout"])
def test_answered_requests_leave_no_reference_cycles(
    tiny_model: Path, timeout_s: float | None
) -> None:
    """A cycle through a request's job keeps its body and closure until the collector runs."""
    backend = load_backend(tiny_model, "cpu", 1, None)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector would free, to look at it
    try:
        asyncio.run(_answer_twenty(backend, timeout_s))
        gc.collect()
        jobs = sum(isinstance(thing, Job) for thing in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert jobs == 0, f"{jobs} of 20 answered jobs were only freed by the garbage collector"


class HeldInside:
    """The real backend; its first run waits at ``inside`` (with the test), then for ``release``."""

    def __init__(self, backend, inside: threading.Barrier, release: threading.Event) -> None:
        self.backend = backend
        self.inside = inside
        self.release = release
        self.batch_rows: list[int] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batch_rows.append(len(batch["images"]))
        if len(self.batch_rows) == 1:
            self.inside.wait()  # BrokenBarrierError if the other instance is not running too
            self.release.wait(10)
        return self.backend.run(batch)


async def _two_batches_at_once(
    backends: list[HeldInside], max_batch: int, requests: list[np.ndarray]
) -> list[dict[str, np.ndarray]]:
    loop = asyncio.get_running_loop()
    metrics = Metrics("tiny", max_batch, {})
    scheduler = Scheduler(backends, BatchQueue(max_batch, 0.0), metrics, loop)
    scheduler.start()
    answered = [loop.create_future() for _ in requests]
    for array, future in zip(requests, answered, strict=True):  # one pass: one wake-up
        done = lambda outputs, error, future=future: future.set_result((outputs, error))  # noqa: E731
        assert scheduler.submit({"images": array}, len(array), done, None)
    await loop.run_in_executor(None, backends[0].inside.wait)  # both instances are running
    assert not scheduler.idle
    backends[0].release.set()
    results = await asyncio.wait_for(asyncio.gather(*answered), 10)
    assert [error for _, error in results] == [None] * len(requests)
    for _ in range(200):  # a worker counts itself idle just after its answers are queued
        if scheduler.idle:
            break
        await asyncio.sleep(0.005)
    assert scheduler.idle
    scheduler.stop()
    return [outputs for outputs, _ in results]


@pytest.mark.parametrize(
    ("max_batch", "rows", "first_batches"),
    [(1, [1, 1], [1, 1]), (8, [1, 1, 1, 1], [1, 2]), (8, [8], [4, 4])],
    ids=["one-row-batches", "a-burst-is-shared", "a-large-request-is-split"],
)
def test_instances_run_their_batches_at_the_same_time(
    tiny_model: Path, max_batch: int, rows: list[int], first_batches: list[int]
) -> None:
    """Both instances run at once: forced by one-row batches, by sharing a burst, or by
    splitting one request.

    A burst of 4 that fits one batch: the first worker takes its half (2), the second
    half of what is left (1), the last row waits for whichever ends first. A lone request
    of 8 rows: each idle instance runs 4 of them, and the answer joins them in order.
    Taking a whole burst or request would leave the second instance idle and break the
    barrier.
    """
    inside, release = threading.Barrier(3, timeout=10), threading.Event()
    backends = [
        HeldInside(load_backend(tiny_model, "cpu", 1, None), inside, release) for _ in range(2)
    ]
    images = np.random.default_rng(0).integers(0, 256, (sum(rows), 3, 8, 8), dtype=np.uint8)
    requests = np.split(images, np.cumsum(rows)[:-1])
    answers = asyncio.run(_two_batches_at_once(backends, max_batch, requests))
    assert sorted(b.batch_rows[0] for b in backends) == first_batches
    assert sum(sum(b.batch_rows) for b in backends) == sum(rows)
    expected = backends[0].backend.run({"images": images})
    for name, want in expected.items():
        np.testing.assert_allclose(np.concatenate([a[name] for a in answers]), want, rtol=1e-6)


class FailsInside(HeldInside):
    """Held like HeldInside, then raises instead of running."""

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        super().run(batch)
        raise RuntimeError("device lost")


async def _answers_to_one_request(backends: list, array: np.ndarray) -> list:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(backends, BatchQueue(8, 0.0), Metrics("tiny", 8, {}), loop)
    answers: list = []
    last = loop.create_future()

    def done(outputs, error) -> None:
        answers.append(error)
        loop.call_later(0.3, last.set_result, None)  # time for a second, wrong answer

    scheduler.start()
    assert scheduler.submit({"images": array}, len(array), done, None)
    await asyncio.wait_for(last, 10)
    scheduler.stop()
    return answers


def test_a_split_request_whose_part_fails_is_answered_once_with_the_error(
    tiny_model: Path,
) -> None:
    inside, release = threading.Barrier(2, timeout=10), threading.Event()
    release.set()
    backends = [
        HeldInside(load_backend(tiny_model, "cpu", 1, None), inside, release),
        FailsInside(load_backend(tiny_model, "cpu", 1, None), inside, release),
    ]
    answers = asyncio.run(_answers_to_one_request(backends, np.zeros((8, 3, 8, 8), np.uint8)))
    assert [b.batch_rows for b in backends] == [[4], [4]]  # the barrier: both ran a half
    assert len(answers) == 1 and isinstance(answers[0], BackendFailure)
    assert "device lost" in str(answers[0])
