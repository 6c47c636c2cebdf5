"""Start-up, readiness and graceful shutdown around the app.

Order: load the engine (a bad one stops start-up before any port opens), listen, warm
up at the batch sizes the batcher will form, then report ready. SIGTERM/SIGINT flip
readiness off at once, keep answering (new inference gets 503), let queued and running
requests finish, then exit 0, or 1 if the grace period ran out first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
from time import perf_counter

import numpy as np

from serving import denormals
from serving.app import App, served_name
from serving.backends import Backend, load_backend
from serving.batching import BatchQueue
from serving.compat import EngineError
from serving.config import ServerConfig
from serving.contract import Signature
from serving.http import HttpConnection, expire_idle
from serving.metrics import Metrics
from serving.protocol import DATATYPES
from serving.scheduler import Scheduler
from serving.sequence import SequenceInputs, TextEncoder, sequence_inputs

log = logging.getLogger("serving")


def warmup_sizes(max_batch_size: int) -> list[int]:
    """1 and the maximum first (TensorRT EP profiles widen to what they see), then powers of 2."""
    sizes = [1, max_batch_size]
    size = 2
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return list(dict.fromkeys(sizes))


def dummy_inputs(
    signature: Signature, rows: int, padded: dict[str, int] | None = None, length: int = 1
) -> dict[str, np.ndarray]:
    """Zeros (empty strings for BYTES) for every input, ``rows`` rows, other dynamic dims 1,
    but ``length`` along the sequence axis of each ``padded`` input (name -> axis)."""
    inputs = {}
    for spec in signature.inputs:
        dims = [1 if d == -1 else d for d in spec.shape]
        if signature.batching:
            dims[0] = rows
        if padded and spec.name in padded:
            dims[padded[spec.name]] = length
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(dims, "", dtype=object)
        else:
            inputs[spec.name] = np.zeros(dims, DATATYPES[spec.datatype])
    return inputs


def warm(backend: Backend, sizes: list[int], flush_denormals: bool = False) -> None:
    """Run the batch sizes the batcher will form; a bare graph's failure only warns.

    Zeros are valid input to a tensorferry model; a model brought as is may refuse them
    (a shape its graph can't take, ids it checks), which says nothing about real requests.
    A sequence model runs each size at its contract's shortest and longest length: a
    TensorRT profile may start above 1, and the TensorRT EP widens its profile to the
    shapes it has seen.
    """
    sizes = sizes if backend.signature.batching else [1]
    sequence = backend.contract.sequence if backend.contract else None
    padded = {p.name: p.axis for p in sequence.padded} if sequence else None
    lengths = [max(1, sequence.min_length), sequence.max_length] if sequence else [1]
    shapes = [(size, length) for size in sizes for length in dict.fromkeys(lengths)]
    with denormals.flushed(flush_denormals):  # an executor thread: as the workers will run
        for size, length in shapes:
            try:
                backend.run(dummy_inputs(backend.signature, size, padded, length))
            except Exception as exc:
                if backend.contract is not None:
                    raise
                log.warning("warm-up with zeros failed (%s); serving without it", exc)
                return


def sequence_rules(
    config: ServerConfig, backend: Backend
) -> tuple[SequenceInputs | None, TextEncoder | None]:
    """A sequence model's request rules, and its tokenizer when it is a text model whose
    inputs are its ids and mask (so /v1/classify can build them); EngineError if the
    tokenizer the artifact carries does not load."""
    contract = backend.contract
    sequence = None if contract is None else contract.sequence
    text = None
    if sequence is not None and sequence.kind == "text":
        try:
            text = TextEncoder(sequence)
        except ImportError:
            raise EngineError(
                f"{config.engine} is a text model: serving it needs the tokenizers package "
                "(pip install -e '.[serve]')"
            ) from None
        except Exception as exc:  # the tokenizers package raises plain Exceptions
            raise EngineError(
                f"{config.engine} carries a tokenizer that does not load: {exc}"
            ) from None
        names = {s.name for s in backend.signature.inputs}
        if names != {p.name for p in sequence.padded}:
            text = None  # inputs beyond ids and mask: raw text cannot fill them
    vocab = None if text is None else text.vocab
    return sequence_inputs(backend.signature, contract, config.sequence_batching, vocab), text


def instance_threads(config: ServerConfig) -> int:
    """Intra-op threads per instance; 0 (onnxruntime's one per core) only for one instance."""
    if config.threads or config.instances == 1:
        return config.threads
    return max(1, len(os.sched_getaffinity(0)) // config.instances)


def load(config: ServerConfig) -> list[Backend]:
    """One backend per model instance; EngineError (one line) if the engine can't be served.

    What was loaded before a failure is closed again.
    """
    threads = instance_threads(config)
    flush, cache = bool(config.flush_denormals), config.trt_cache_dir
    backends: list[Backend] = []
    try:
        for _ in range(config.instances):
            backends.append(load_backend(config.engine, config.provider, threads, cache, flush))
        max_batch = backends[0].max_batch
        if max_batch is not None and config.max_batch_size > max_batch:
            raise EngineError(
                f"{config.engine} accepts batches up to {max_batch}; "
                f"lower --max-batch-size from {config.max_batch_size}"
            )
    except Exception:
        close_all(backends)
        raise
    return backends


def close_all(backends: list[Backend]) -> None:
    """Close every backend, each even if another fails (a failure is logged, not raised)."""
    for backend in backends:
        try:
            backend.close()
        except Exception:
            log.exception("closing a %s backend failed", backend.info.get("backend", "model"))


def release(scheduler: Scheduler, backends: list[Backend]) -> None:
    """Stop the workers, then close the backends, unless a worker is still inside one."""
    if scheduler.stop():
        close_all(backends)
    else:  # freeing memory a running batch uses could crash it; the process exit frees it
        log.warning("a batch was still running when the workers stopped; backends left open")


async def _drain(app: App, grace_s: float) -> bool:
    deadline = perf_counter() + grace_s
    while not (app.scheduler.idle and app.state.inflight == 0):
        if perf_counter() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def _sweep_idle(connections: set[HttpConnection], timeout_s: float) -> None:
    """One timer for all connections, not one per request: the hot path only stamps a time."""
    while True:
        await asyncio.sleep(min(1.0, timeout_s / 2))
        expire_idle(connections, timeout_s)


async def run_server(config: ServerConfig, backends: list[Backend], started: float) -> int:
    """Serve until SIGTERM/SIGINT; the backends are closed once their workers have stopped."""
    loop = asyncio.get_running_loop()
    backend = backends[0]  # the instances are alike: any one describes the model
    name = served_name(config, backend)
    log.info("model %s: %s", name, backend.signature.describe())
    flush = bool(config.flush_denormals)
    info = {**backend.info, "instances": str(len(backends)), "flush_denormals": str(flush).lower()}
    metrics = Metrics(name, config.max_batch_size, info)
    # A model without a batch dim runs each request alone: a batch is one request.
    rows = config.max_batch_size if backend.signature.batching else 1
    batches = BatchQueue(rows, config.max_queue_delay_us / 1e6, config.max_queue_size)
    try:
        rules, text = sequence_rules(config, backend)
    except EngineError:
        close_all(backends)
        raise
    padding = rules.padding if rules is not None and rules.pad else None
    scheduler = Scheduler(
        backends, batches, metrics, loop, flush, backend.signature.batching, padding
    )
    try:
        app = App(config, backend, scheduler, metrics, rules, text)
        drained = await _serve(app, backends, started)
    finally:
        release(scheduler, backends)
    log.info("stopped" if drained else "grace period ran out with requests unanswered")
    return 0 if drained else 1


async def _serve(app: App, backends: list[Backend], started: float) -> bool:
    """Listen, warm up, start the workers, answer until a signal, drain; True if drained."""
    loop = asyncio.get_running_loop()
    config, backend, scheduler, metrics = app.config, app.backend, app.scheduler, app.metrics
    flush = bool(config.flush_denormals)
    connections: set[HttpConnection] = set()
    server = await loop.create_server(
        lambda: HttpConnection(app, config.max_request_bytes, connections, config.max_header_bytes),
        config.host,
        config.port,
        reuse_address=True,
        backlog=2048,
    )
    host, port = server.sockets[0].getsockname()[:2]
    log.info(
        "listening on http://%s:%d (model %s, %s on %s, %d instance(s), denormals %s)",
        host,
        port,
        app.name,
        backend.info["backend"],
        backend.info["provider"],
        len(backends),
        "flushed to zero" if flush else "kept",
    )
    timeout = config.idle_timeout_s
    sweeper = loop.create_task(_sweep_idle(connections, timeout)) if timeout else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.warmup:
        sizes = warmup_sizes(config.max_batch_size)
        warming = (loop.run_in_executor(None, warm, b, sizes, flush) for b in backends)
        # Every warm-up ends before a failure is raised: release() closes the backends next.
        results = await asyncio.gather(*warming, return_exceptions=True)
        if failures := [r for r in results if isinstance(r, BaseException)]:
            raise failures[0]
    scheduler.start()
    # Start-up leaves tens of thousands of long-lived objects (numpy, onnxruntime, the
    # CLI); every full collection walked them all, stalling the event loop for about 5 ms.
    # Frozen, they are skipped: p99 at 64 connections fell from about 25 ms to 15 ms on
    # 2 cores (benchmarks/bench_serving.py).
    gc.collect()
    gc.freeze()
    metrics.load_seconds.set(perf_counter() - started)
    app.state.ready = not stop.is_set()
    log.info("ready in %.2f s", perf_counter() - started)
    await stop.wait()
    app.state.ready, app.state.draining = False, True
    log.info("draining: %d requests in flight", app.state.inflight)
    drained = await _drain(app, config.grace_s)
    server.close()
    if sweeper is not None:
        sweeper.cancel()
    for connection in list(connections):
        connection.close()
    return drained


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; EngineError (one line) if the engine can't be served."""
    started = perf_counter()
    flush = denormals.decide(config.flush_denormals, config.engine)
    config = dataclasses.replace(config, flush_denormals=flush)
    backends = load(config)
    try:
        config = dataclasses.replace(config, model_name=served_name(config, backends[0]))
    except ValueError:
        close_all(backends)
        raise
    try:
        import uvloop
    except ImportError:  # Windows, or a minimal install: asyncio's loop works, slower
        return asyncio.run(run_server(config, backends, started))
    return uvloop.run(run_server(config, backends, started))
