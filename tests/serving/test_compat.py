"""Sidecar-vs-host checks for TensorRT plans, on hand-written sidecars (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.backends import load_backend
from serving.compat import EngineError, HostInfo, check_plan, load_sidecar

HOST = HostInfo(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def sidecar(**overrides) -> dict:
    base = {
        "format": "tensorrt",
        "metadata": {},
        "tensorrt_version": "10.3.0.30",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
    }
    return {**base, **overrides}


def test_matching_host_passes() -> None:
    check_plan(sidecar(), HOST)
    check_plan(sidecar(tensorrt_version="10.3.0.26"), HOST)  # same major.minor.patch


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            {"tensorrt_version": "10.8.0.43", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"},
            [
                "built with TensorRT 10.8.0.43 on NVIDIA L4 (compute 8.9)",
                "TensorRT 10.3.0.30 on Orin (compute 8.7)",
            ],
        ),
        (
            {"compute_capability": "8.6", "gpu_name": "RTX 3090"},
            ["on RTX 3090 (compute 8.6)", "rebuild"],
        ),
        ({"tensorrt_version": "11.0.0.1"}, ["TensorRT 11.0.0.1"]),
    ],
    ids=["both", "gpu", "major"],
)
def test_mismatch_is_one_line_saying_what_was_built_where(overrides, needles) -> None:
    with pytest.raises(EngineError) as info:
        check_plan(sidecar(**overrides), HOST, "model.trt")
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.trt was built with")
    for needle in needles:
        assert needle in message


def test_version_compatible_plans_run_forward_only() -> None:
    check_plan(sidecar(tensorrt_version="10.1.0", version_compatible=True), HOST)
    with pytest.raises(EngineError):
        check_plan(sidecar(tensorrt_version="10.4.0", version_compatible=True), HOST)
    with pytest.raises(EngineError):
        check_plan(sidecar(tensorrt_version="9.2.0", version_compatible=True), HOST)
    with pytest.raises(EngineError):  # only JSON true counts, as for the runtime's host code
        check_plan(sidecar(tensorrt_version="10.1.0", version_compatible="true"), HOST)


def test_hardware_compatible_plans_need_ampere_or_newer() -> None:
    check_plan(sidecar(compute_capability="8.0", hardware_compatibility="ampere_plus"), HOST)
    turing = HostInfo("10.3.0.30", "T4", "7.5")
    with pytest.raises(EngineError, match="compute 7.5"):
        check_plan(sidecar(hardware_compatibility="ampere_plus"), turing)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (sidecar(compute_capability=""), "lacks compute_capability"),
        (sidecar(format="onnxruntime"), "format 'onnxruntime'"),
        (sidecar(tensorrt_version="ten"), "unparseable version"),
    ],
)
def test_garbled_sidecar_is_refused(content, needle) -> None:
    with pytest.raises(EngineError, match=needle):
        check_plan(content, HOST)


def test_load_sidecar_errors(tmp_path: Path) -> None:
    engine = tmp_path / "m.trt"
    engine.write_bytes(b"plan")
    with pytest.raises(EngineError, match="has no sidecar m.trt.json"):
        load_sidecar(engine)
    (tmp_path / "m.trt.json").write_text("{oops")
    with pytest.raises(EngineError, match="unreadable"):
        load_sidecar(engine)
    (tmp_path / "m.trt.json").write_text(json.dumps({"format": "tensorrt"}))
    with pytest.raises(EngineError, match="lacks its 'metadata'"):
        load_sidecar(engine)


def test_plan_is_checked_before_it_is_deserialized(tmp_path: Path, monkeypatch) -> None:
    """With stand-in tensorrt/cuda modules: a mismatched sidecar stops the load first."""
    import sys
    import types

    from tests.serving.serving_helpers import contract

    deserialized = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0.43"
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt.Runtime = type(
        "Runtime",
        (),
        {
            "__init__": lambda self, log: None,
            "deserialize_cuda_engine": lambda s, b: deserialized.append(b),
        },
    )
    props = types.SimpleNamespace(name=b"NVIDIA L4", major=8, minor=9)
    runtime = types.SimpleNamespace(
        cudaGetDevice=lambda: (0, 0), cudaGetDeviceProperties=lambda d: (0, props)
    )
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    for name, module in {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings}.items():
        monkeypatch.setitem(sys.modules, name, module)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"plan bytes")
    side = sidecar(metadata=contract().to_metadata())
    (tmp_path / "m.plan.json").write_text(json.dumps(side))
    with pytest.raises(
        EngineError,
        match=r"built with TensorRT 10.3.0.30 on Orin .* has TensorRT 10.8.0.43 on NVIDIA L4",
    ):
        load_backend(engine)
    assert deserialized == []
