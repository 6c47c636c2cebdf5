"""onnxruntime backend: contract read from metadata, loud provider fallback, warm-up sizes,
threads per instance, and closing: each backend, and all of them on a failed load or shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from serving import server
from serving.backends import load_onnxruntime
from serving.compat import EngineError
from serving.config import ServerConfig
from serving.server import instance_threads, warmup_sizes


def test_reads_contract_and_io(tiny_model: Path) -> None:
    backend = load_onnxruntime(tiny_model, "cpu", 1)
    assert backend.contract.class_names == ("cat", "dog", "ship", "truck")
    (spec,) = backend.signature.inputs
    assert spec.shape == (-1, 3, 8, 8) and spec.datatype == "UINT8"
    assert backend.signature.batching
    out = backend.run({"images": np.zeros((3, 3, 8, 8), np.uint8)})
    assert out["logits"].shape == (3, 4) and out["probabilities"].shape == (3, 4)


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_fallback_to_cpu_is_loud(tiny_model: Path, provider: str, caplog) -> None:
    caplog.set_level(logging.WARNING, "serving")
    backend = load_onnxruntime(tiny_model, provider, 1)
    assert backend.info["provider"] == "cpu"  # what actually runs, from session.get_providers()
    assert any(
        "onnxruntime is running on CPUExecutionProvider" in r.message for r in caplog.records
    )


def test_warmup_covers_the_ends_first() -> None:
    assert warmup_sizes(64) == [1, 64, 2, 4, 8, 16, 32]
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(6) == [1, 6, 2, 4]


def test_instances_share_the_cores_unless_threads_are_set(tiny_model: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert instance_threads(ServerConfig(tiny_model)) == 0  # onnxruntime's own default
    assert instance_threads(ServerConfig(tiny_model, instances=2)) == max(1, cores // 2)
    assert instance_threads(ServerConfig(tiny_model, instances=4 * cores)) == 1
    assert instance_threads(ServerConfig(tiny_model, threads=3, instances=2)) == 3


def test_tensorrt_provider_caches_engines_where_told() -> None:
    from serving.backends import _providers

    beside = _providers("tensorrt", Path("/models/m.onnx"), None)
    assert beside[0][1]["trt_engine_cache_path"] == "/models"
    elsewhere = _providers("tensorrt", Path("/models/m.onnx"), Path("/cache"))  # read-only mounts
    assert elsewhere[0][1]["trt_engine_cache_path"] == "/cache"
    assert _providers("cpu", Path("/models/m.onnx"), Path("/cache")) == ["CPUExecutionProvider"]


# Closing: every backend frees what it holds, and the server closes them


def test_onnxruntime_backend_closes_its_session_once(tiny_model: Path) -> None:
    backend = load_onnxruntime(tiny_model, "cpu", 1)
    backend.close()
    backend.close()  # idempotent
    assert backend.session is None
    with pytest.raises(EngineError, match="closed"):
        backend.run({"images": np.zeros((1, 3, 8, 8), np.uint8)})


class Closes:
    """A real backend that counts its close() calls."""

    def __init__(self, backend, max_batch: int | None = None) -> None:
        self.backend, self.closed = backend, 0
        self.contract, self.signature = backend.contract, backend.signature
        self.platform, self.info, self.max_batch = backend.platform, backend.info, max_batch

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(inputs)

    def close(self) -> None:
        self.closed += 1
        self.backend.close()


def test_a_failed_load_closes_what_it_had_loaded(tiny_model: Path, monkeypatch) -> None:
    loaded: list[Closes] = []

    def load_backend(*args) -> Closes:
        loaded.append(Closes(load_onnxruntime(tiny_model, "cpu", 1), max_batch=8))
        return loaded[-1]

    monkeypatch.setattr(server, "load_backend", load_backend)
    with pytest.raises(EngineError, match="accepts batches up to 8"):
        server.load(ServerConfig(tiny_model, instances=2, max_batch_size=64))
    assert [b.closed for b in loaded] == [1, 1]


def test_shutdown_closes_every_backend_after_its_worker_stops(tiny_model: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "serving")
    backends = [Closes(load_onnxruntime(tiny_model, "cpu", 1)) for _ in range(2)]
    config = ServerConfig(tiny_model, port=0, instances=2, max_batch_size=4)

    async def serve_then_sigterm() -> int:
        running = asyncio.ensure_future(server.run_server(config, backends, time.perf_counter()))
        while not any(r.message.startswith("ready in") for r in caplog.records):
            assert not running.done(), caplog.text
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # the server's own handler takes it
        return await running

    try:
        assert asyncio.run(serve_then_sigterm()) == 0
    finally:
        gc.unfreeze()  # run_server froze this test process's objects
    assert [b.closed for b in backends] == [1, 1]
