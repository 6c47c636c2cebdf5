"""onnxruntime backend: contract read from metadata, loud provider fallback, warm-up sizes,
threads per instance."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from serving.backends import load_onnxruntime
from serving.config import ServerConfig
from serving.server import instance_threads, warmup_sizes


def test_reads_contract_and_io(tiny_model: Path) -> None:
    backend = load_onnxruntime(tiny_model, "cpu", 1)
    assert backend.contract.class_names == ("cat", "dog", "ship", "truck")
    assert backend.inputs[0].shape == (-1, 3, 8, 8) and backend.inputs[0].datatype == "UINT8"
    out = backend.run(np.zeros((3, 3, 8, 8), np.uint8))
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
