"""Runs batches off the event loop: the BatchQueue policy, one worker thread, timers.

Everything except ``_work`` runs on the event loop thread, so the queue needs no lock.
The worker thread only concatenates, calls the backend (onnxruntime releases the GIL)
and posts the result back; accepting and parsing requests never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from time import perf_counter

import numpy as np

from serving.backends import Backend
from serving.batching import BatchQueue, Pending, merge, split
from serving.metrics import Metrics

log = logging.getLogger("serving")

Outputs = dict[str, np.ndarray]
Done = Callable[[Outputs | None, Exception | None], None]


class QueueTimeout(Exception):
    """The request's timeout passed while it was still queued."""


class BackendFailure(Exception):
    """The backend raised while running the batch this request was in."""


class Job:
    __slots__ = ("array", "done", "pending", "timer", "enqueued")

    def __init__(self, array: np.ndarray, done: Done) -> None:
        self.array = array
        self.done = done
        self.pending: Pending[Job] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.enqueued = 0.0


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        batches: BatchQueue[Job],
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self._batches = batches
        self._loop = loop
        self._idle_since: float | None = float("-inf")  # None while a batch runs
        self._running = 0  # batches handed to the worker and not finished
        self._check_scheduled = False
        self._wake: asyncio.TimerHandle | None = None
        self._work: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._worker, name="batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=5)

    @property
    def queued(self) -> int:
        return len(self._batches)

    @property
    def idle(self) -> bool:
        return self._running == 0 and not self._batches

    def submit(self, array: np.ndarray, done: Done, timeout_s: float | None) -> bool:
        """Queue one request; False if the queue is full. ``done`` is called exactly once."""
        job = Job(array, done)
        job.enqueued = now = perf_counter()
        job.pending = self._batches.put(job, len(array), now)
        if job.pending is None:
            return False
        if timeout_s:
            job.timer = self._loop.call_later(timeout_s, self._expire, job)
        if not self._check_scheduled:
            # Deferred to the end of this loop pass: requests read in the same pass share a batch.
            self._check_scheduled = True
            self._loop.call_soon(self._dispatch)
        return True

    def _dispatch(self) -> None:
        self._check_scheduled = False
        now = perf_counter()
        # A full batch may wait in the worker's queue behind the running one, so the worker
        # starts it without a round trip through the event loop (which may hold the GIL).
        if self._batches.ready(now, self._idle_since) or (
            self._running == 1 and self._batches.full
        ):
            jobs = self._batches.take()
            self._idle_since = None
            self._running += 1
            for job in jobs:
                if job.timer is not None:
                    job.timer.cancel()
            self._work.put(jobs)
        elif self._idle_since is not None:
            self._wake_at(self._batches.wake_at(), now)

    def _wake_at(self, when: float | None, now: float) -> None:
        if when is None:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = self._loop.call_later(max(0.0, when - now), self._dispatch)

    def _expire(self, job: Job) -> None:
        assert job.pending is not None
        if self._batches.discard(job.pending):
            waited_ms = (perf_counter() - job.enqueued) * 1e3
            self._deliver(
                job,
                None,
                QueueTimeout(f"request timeout expired after {waited_ms:.0f} ms in the queue"),
            )

    def _worker(self) -> None:
        while (jobs := self._work.get()) is not None:
            started = perf_counter()
            try:
                batch = merge([job.array for job in jobs])
                outputs = split(self.backend.run(batch), [len(job.array) for job in jobs])
                error = None
            except Exception as exc:  # any backend failure fails this batch, not the server
                log.exception("backend failed on a batch of %d requests", len(jobs))
                outputs, error = None, BackendFailure(f"backend error: {exc}")
            self._loop.call_soon_threadsafe(
                self._finished, jobs, outputs, error, started, perf_counter()
            )

    def _finished(
        self,
        jobs: list[Job],
        outputs: list[Outputs] | None,
        error: Exception | None,
        started: float,
        ended: float,
    ) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle_since = perf_counter()
        self._dispatch()  # start the next batch before writing this one's answers
        rows = sum(len(job.array) for job in jobs)
        self.metrics.compute_seconds.observe(ended - started)
        for job in jobs:
            self.metrics.queue_seconds.observe(started - job.enqueued)
        self.metrics.batch_size.observe(rows)
        self.metrics.executions.inc()
        self.metrics.inferences.inc(rows)
        for i, job in enumerate(jobs):
            self._deliver(job, None if outputs is None else outputs[i], error)

    @staticmethod
    def _deliver(job: Job, outputs: Outputs | None, error: Exception | None) -> None:
        try:
            job.done(outputs, error)
        except Exception:  # one broken response must not cost the rest of the batch theirs
            log.exception("failed to answer a request")
