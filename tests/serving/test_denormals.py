"""Flushing denormals: per thread, inherited by the threads it starts, undone after a block;
reaching the batch workers and onnxruntime's pool threads; decided by the flag, else by the
engine's sidecar, in a real server process."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from serving import denormals
from serving.backends import load_backend
from serving.batching import BatchQueue
from serving.compat import EngineError, sidecar_path
from serving.metrics import Metrics
from serving.scheduler import Scheduler
from tests.serving.reliability_helpers import infer_json, post
from tests.serving.serving_helpers import build_subnormal_model, contract, fetch, start_server

TINY = np.finfo(np.float32).tiny  # the smallest normal float32


def _flushes() -> bool:
    """Whether this thread flushes: 1e-40, a float32 subnormal, comes out 0."""
    return bool(np.float32(1e-30) * np.float32(1e-10) == 0)


def _in_thread(fn):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join(10)
    return result[0]


def test_flushing_is_per_thread_and_inherited_by_threads_started_meanwhile() -> None:
    started_before, go = threading.Event(), threading.Event()
    before: list[bool] = []

    def waits_then_looks() -> None:
        started_before.set()
        go.wait(10)
        before.append(_flushes())

    other = threading.Thread(target=waits_then_looks)
    other.start()
    started_before.wait(10)
    assert not _flushes()
    with denormals.flushed():
        assert _flushes()
        assert _in_thread(_flushes)  # a thread starts with its creator's environment
        go.set()
        other.join(10)
    assert before == [False]  # a thread already running keeps its own
    assert not _flushes()  # the block restored this thread


def test_flush_denormals_lasts_for_the_calling_thread_only() -> None:
    def flush_and_look() -> bool:
        denormals.flush_denormals()
        return _flushes()

    assert _in_thread(flush_and_look)
    assert not _flushes()


@pytest.fixture(scope="module")
def big_subnormal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough that onnxruntime splits its Mul between 2 intra-op threads."""
    path = tmp_path_factory.mktemp("denormals") / "big.onnx"
    return build_subnormal_model(path, (3, 512, 512), scale=1.0)


async def _three_requests(backend, flush: bool) -> list[np.ndarray]:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler([backend], BatchQueue(1, 0.0), Metrics("big", 1, {}), loop, flush)
    scheduler.start()
    image = np.full((1, 3, 512, 512), 7, np.uint8)
    answered = [loop.create_future() for _ in range(3)]
    for future in answered:
        done = lambda outputs, error, future=future: future.set_result(outputs)  # noqa: E731
        assert scheduler.submit({"images": image}, len(image), done, None)
    results = await asyncio.wait_for(asyncio.gather(*answered), 30)
    scheduler.stop()
    return [outputs["logits"] for outputs in results]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flush", [False, True], ids=["kept", "flushed"])
def test_the_batch_worker_and_the_pool_threads_flush(
    big_subnormal_model: Path, threads: int, flush: bool
) -> None:
    """A subnormal weight is 0 on every thread that runs the model, or on none: with
    2 threads, a pool thread that kept denormals would leave some logits nonzero."""
    backend = load_backend(big_subnormal_model, "cpu", threads, None, flush)
    for logits in asyncio.run(_three_requests(backend, flush)):
        assert (logits == 0).all() if flush else (logits > TINY).all(), logits


# The server's setting: the flag, else the sidecar ---------------------------------------------
def _engine(tmp_path: Path, recorded: object) -> Path:
    """A model whose logits are subnormal unless flushed; ``recorded``: its sidecar's value,
    ``absent`` for a sidecar without the key, None for no sidecar."""
    engine = build_subnormal_model(tmp_path / "sub.onnx")
    sidecar = {"format": "onnxruntime", "metadata": contract().to_metadata()}
    if recorded is not None:
        if recorded != "absent":
            sidecar[denormals.SIDECAR_KEY] = recorded
        sidecar_path(engine).write_text(json.dumps(sidecar))
    return engine


@pytest.mark.parametrize(
    ("flag", "recorded", "expected"),
    [
        (None, None, False),
        (None, "absent", False),
        (None, True, True),
        (None, False, False),
        (False, True, False),
        (True, False, True),
    ],
)
def test_the_flag_wins_else_the_sidecar_decides(
    tmp_path: Path, flag: bool | None, recorded: object, expected: bool
) -> None:
    assert denormals.decide(flag, _engine(tmp_path, recorded)) is expected


def test_a_sidecar_value_that_is_not_a_bool_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="flush_denormals must be true or false, not 'yes'"):
        denormals.decide(None, _engine(tmp_path, "yes"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recorded", "args", "env", "flushed"),
    [
        (True, (), {}, True),
        (True, ("--no-flush-denormals",), {}, False),
        (None, (), {"TENSORFERRY_FLUSH_DENORMALS": "1"}, True),
        (None, (), {}, False),
    ],
    ids=["follows-the-sidecar", "flag-beats-sidecar", "env-var", "default-kept"],
)
def test_the_server_computes_as_decided(
    tmp_path: Path, recorded: object, args: tuple, env: dict, flushed: bool
) -> None:
    server = start_server(_engine(tmp_path, recorded), "--threads", "1", *args, env=env)
    try:
        status, answer, _ = post(server, infer_json(rows=2))
        metrics = fetch(server, "/metrics")[2].decode()
    finally:
        assert server.terminate() == 0, "\n".join(server.log)
    assert status == 200
    logits = next(o["data"] for o in answer["outputs"] if o["name"] == "logits")
    assert all(v == 0 for v in logits) if flushed else all(0 < v < TINY for v in logits), logits
    assert f'flush_denormals="{str(flushed).lower()}"' in metrics
