"""Runs batches off the event loop: the BatchQueue policy, worker threads, timers.

The event loop parses requests, queues them and writes answers; each model instance has a
worker thread that merges, calls its backend (onnxruntime releases the GIL) and takes
its own next batch when the last one ends, so starting a batch never waits for the event
loop to be scheduled. A request split among idle instances (see ``BatchQueue.take``) is
answered when its last part ends, with its parts' outputs joined in row order. The event
loop only wakes an idle worker, at the end of the pass that queued a request, so requests
read in one pass share a batch. The queue is shared: every BatchQueue call holds ``_lock``,
and a worker holds it to take a batch, never to run one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from time import perf_counter

import numpy as np

from serving.backends import Backend
from serving.batching import BatchQueue, Part, Pending, merge, pad_merge, split
from serving.denormals import flush_denormals
from serving.metrics import Metrics, Phases

log = logging.getLogger("serving")

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Done = Callable[[Outputs | None, Exception | None], None]


class QueueTimeout(Exception):
    """The request's timeout passed while it was still queued."""


class BackendFailure(Exception):
    """The backend raised while running the batch this request was in."""


class Job:
    # No link to its queue entry, which links to the job: that cycle kept every answered
    # request (body, closure) until the garbage collector ran. Only the timeout timer holds
    # both, and cancelling it when the job is answered lets both go.
    __slots__ = ("inputs", "rows", "done", "timer", "enqueued", "pieces", "rows_left")

    def __init__(self, inputs: Inputs, rows: int, done: Done) -> None:
        self.inputs = inputs
        self.rows = rows  # batch rows; 1 for a model without a batch dim
        self.done = done
        self.timer: asyncio.TimerHandle | None = None
        self.enqueued = 0.0
        self.pieces: dict[int, Outputs] | None = None  # a split request's parts, by first row
        self.rows_left = rows  # rows not yet run; 0 once answered


class Scheduler:
    def __init__(
        self,
        backends: Sequence[Backend],
        batches: BatchQueue[Job],
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        flush_denormals: bool = False,
        batching: bool = True,
        padding: dict[str, tuple[int, float]] | None = None,
    ) -> None:
        """One worker thread per backend (model instance), all taking from ``batches``;
        with ``flush_denormals`` each flushes subnormals to zero on its own thread.

        A model without a batch dim (``batching`` false, as its signature says) runs each
        request alone: its tensors are passed and answered whole, never sliced by rows.
        ``padding`` (input name -> sequence axis, pad value) pads those inputs of a batch
        to its longest request (``batching.pad_merge``); the others merge as they are."""
        if not backends:
            raise ValueError("a scheduler needs at least one backend")
        self.metrics = metrics
        self._batches = batches
        self._loop = loop
        self._lock = threading.Lock()
        self._batch_ready = threading.Condition(self._lock)  # wakes an idle worker
        self._idle_workers = 0  # guarded by _lock: workers waiting in _next_batch
        self._stopping = False
        self._wake_scheduled = False  # event loop thread only
        self._flush_denormals = flush_denormals
        self._batching = batching
        self._padding = padding or None
        self._threads = [
            threading.Thread(
                target=self._worker, args=(backend,), name=f"batch-worker-{i}", daemon=True
            )
            for i, backend in enumerate(backends)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> bool:
        """Stop the workers; True once none is left inside its backend (then it may be closed)."""
        with self._lock:
            self._stopping = True
            self._batch_ready.notify_all()
        for thread in self._threads:
            if thread.is_alive():  # never started: nothing to wait for
                thread.join(timeout=5)
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def queued(self) -> int:
        return len(self._batches)

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._idle_workers == len(self._threads) and not self._batches

    def submit(
        self,
        inputs: Inputs,
        rows: int,
        done: Done,
        timeout_s: float | None,
        group: Hashable = None,
    ) -> bool:
        """Queue one request of ``rows`` rows; False if the queue is full.

        Only requests of the same ``group`` (every input's non-batch shape) share a batch.
        ``done`` is called exactly once.
        """
        job = Job(inputs, rows, done)
        job.enqueued = now = perf_counter()
        with self._lock:
            pending = self._batches.put(job, rows, now, group)
        if pending is None:
            return False
        if timeout_s:
            job.timer = self._loop.call_later(timeout_s, self._expire, job, pending)
        if not self._wake_scheduled:
            # Deferred to the end of this loop pass: requests read in the same pass share a batch.
            self._wake_scheduled = True
            self._loop.call_soon(self._wake_worker)
        return True

    def _wake_worker(self) -> None:
        self._wake_scheduled = False
        with self._lock:
            if self._idle_workers:  # a busy worker looks at the queue when it ends
                self._batch_ready.notify()

    def _expire(self, job: Job, pending: Pending[Job]) -> None:
        with self._lock:
            expired = self._batches.discard(pending)
        if expired:
            waited_ms = (perf_counter() - job.enqueued) * 1e3
            self._deliver(
                job,
                None,
                QueueTimeout(f"request timeout expired after {waited_ms:.0f} ms in the queue"),
            )

    def _next_batch(self, idle_since: float) -> list[Part[Job]] | None:
        """Block until a batch should start (BatchQueue decides) and take it; None: stop.

        ``idle_since`` is when this worker went idle: a request that came after it goes
        at once, without waiting for company.
        """
        with self._lock:
            self._idle_workers += 1
            while not self._stopping:
                now = perf_counter()
                if self._batches.ready(now, idle_since):
                    self._idle_workers -= 1
                    parts = self._batches.take(len(self._threads), self._idle_workers)
                    if self._batches and self._idle_workers:
                        self._batch_ready.notify()  # more than one batch is waiting
                    return parts
                wake_at = self._batches.wake_at()
                self._batch_ready.wait(None if wake_at is None else max(0.0, wake_at - now))
            return None

    def _worker(self, backend: Backend) -> None:
        if self._flush_denormals:
            flush_denormals()  # the switches are per thread, and this one calls session.run
        idle_since = float("-inf")
        while (parts := self._next_batch(idle_since)) is not None:
            started = merged = ran = perf_counter()
            try:
                batch = self._merged(parts)
                merged = perf_counter()
                raw = backend.run(batch)
                ran = perf_counter()
                rows = [stop - start for _, start, stop in parts]
                outputs = split(raw, rows) if self._batching else [raw]
                error = None
            except Exception as exc:  # any backend failure fails this batch, not the server
                log.exception("backend failed on a batch of %d requests", len(parts))
                outputs, error = None, BackendFailure(f"backend error: {exc}")
            idle_since = perf_counter()
            marks = (started, merged, ran, idle_since)
            self._loop.call_soon_threadsafe(self._finished, parts, outputs, error, marks)

    def _merged(self, parts: list[Part[Job]]) -> Inputs:
        """The batch's inputs: a whole request's own tensors, or its rows merged in order."""
        first, start, stop = parts[0]
        if len(parts) == 1 and (not self._batching or stop - start == first.rows):
            return first.inputs
        if self._padding is not None:
            return self._padded(parts, self._padding)
        return {
            name: merge([job.inputs[name][start:stop] for job, start, stop in parts])
            for name in first.inputs
        }

    @staticmethod
    def _padded(parts: list[Part[Job]], padding: dict[str, tuple[int, float]]) -> Inputs:
        inputs = {}
        for name in parts[0][0].inputs:
            arrays = [job.inputs[name][start:stop] for job, start, stop in parts]
            inputs[name] = pad_merge(arrays, *padding[name]) if name in padding else merge(arrays)
        return inputs

    def _finished(
        self,
        parts: list[Part[Job]],
        outputs: list[Outputs] | None,
        error: Exception | None,
        marks: tuple[float, float, float, float],
    ) -> None:
        """Account for a batch and answer its requests; ``marks`` as ``Phases.add`` takes them."""
        metrics = self.metrics
        started, ended = marks[0], marks[3]
        rows = requests = 0
        for job, start, stop in parts:
            rows += stop - start
            if not start:  # a split request waited until its first rows ran
                requests += 1
                metrics.queue_seconds.observe(started - job.enqueued)
        metrics.compute_seconds.observe(ended - started)
        metrics.batch_size.observe(rows)
        metrics.executions.inc()
        metrics.inferences.inc(rows)
        if error is None:
            metrics.request_phases.add(marks, requests)
            if (phases := metrics.batch_phases.get(rows)) is None:
                phases = metrics.batch_phases[rows] = Phases()
            phases.add(marks)
            metrics.last_batch_end = ended
        for i, (job, start, stop) in enumerate(parts):
            if not job.rows_left:  # answered: another part of this split request failed
                continue
            result = None if outputs is None else outputs[i]
            if result is not None and stop - start < job.rows:
                job.pieces = job.pieces or {}
                job.pieces[start] = result
                job.rows_left -= stop - start
                if job.rows_left:
                    continue  # other parts are still queued or running
                result = _joined(job.pieces)
            if job.timer is not None:
                job.timer.cancel()  # only the loop may touch its timers; a late one finds nothing
            self._deliver(job, result, error)

    @staticmethod
    def _deliver(job: Job, outputs: Outputs | None, error: Exception | None) -> None:
        job.rows_left = 0
        job.pieces = None
        try:
            job.done(outputs, error)
        except Exception:  # one broken response must not cost the rest of the batch theirs
            log.exception("failed to answer a request")


def _joined(pieces: dict[int, Outputs]) -> Outputs:
    """A split request's outputs, its parts in row order."""
    ordered = [pieces[start] for start in sorted(pieces)]
    return {name: merge([piece[name] for piece in ordered]) for name in ordered[0]}
