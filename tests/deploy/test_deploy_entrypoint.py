"""deploy/docker/entrypoint.py: one-line refusals, serve's exit code passed through, and the
start-up TensorRT build with its cache, on CPU with stand-ins for trtexec, tensorrt and
cuda-python (the stand-ins answer the host queries; serve's own checks run for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import ENTRYPOINT, HEALTHCHECK, REPO, ServerProcess, load_entrypoint
from serving_helpers import build_model, contract, free_port

from serving.compat import HostInfo, check_plan, load_sidecar
from serving.contract import ModelContract

entrypoint = load_entrypoint()

FAKE_TENSORRT = '__version__ = "{version}"\n'
FAKE_CUDART = """
class _Props:
    name = b"{gpu}"
    major, minor = {major}, {minor}

def cudaGetDevice():
    return 0, 0

def cudaGetDeviceProperties(device):
    return 0, _Props()
"""
FAKE_TRTEXEC = """#!/bin/sh
echo "$@" >> "{log}"
[ -n "$FAIL" ] && exit 3
for arg in "$@"; do
  case "$arg" in --saveEngine=*) echo plan > "${{arg#--saveEngine=}}" ;; esac
done
"""


def fake_gpu_host(root: Path, version: str, gpu: str, capability: str) -> Path:
    """A directory for PYTHONPATH holding stand-in tensorrt and cuda.bindings modules."""
    major, minor = capability.split(".")
    (root / "cuda" / "bindings").mkdir(parents=True)
    (root / "cuda" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "runtime.py").write_text(
        FAKE_CUDART.format(gpu=gpu, major=major, minor=minor)
    )
    (root / "tensorrt.py").write_text(FAKE_TENSORRT.format(version=version))
    return root


def run_entrypoint(*args: str, pythonpath: list[Path] = (), **env: str):
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, REPO])),
        **env,
    }
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# Bad input: one line, non-zero exit


@pytest.mark.parametrize("how", ["flag", "flag=", "env"])
def test_missing_model_fails_with_one_line(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope" / "model.trt"
    args = {"flag": ["--engine", str(missing)], "flag=": [f"--engine={missing}"], "env": []}[how]
    result = run_entrypoint(*args, TENSORFERRY_ENGINE=str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tensorferry-entrypoint: error: model file")
    assert str(missing) in lines[0]


def test_serves_exit_code_passes_through(tmp_path: Path) -> None:
    plan = tmp_path / "model.trt"
    plan.write_bytes(b"not a plan")
    result = run_entrypoint("--engine", str(plan))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"serve: error: {plan} is a TensorRT plan but tensorrt is not installed here"
    )


def test_engine_from_another_gpu_fails_with_the_sidecar_message(tmp_path: Path) -> None:
    plan = tmp_path / "model.trt"
    plan.write_bytes(b"plan bytes never read: the sidecar check comes first")
    sidecar = {
        "format": "tensorrt",
        "metadata": contract().to_metadata(),
        "tensorrt_version": "10.8.0.43",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
    }
    Path(f"{plan}.json").write_text(json.dumps(sidecar))
    host = fake_gpu_host(tmp_path / "host", "10.3.0.30", "Orin", "8.7")
    result = run_entrypoint("--engine", str(plan), pythonpath=[host])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "serve: error: model.trt was built with TensorRT 10.8.0.43 on NVIDIA L4 (compute 8.9) "
        "but this host has TensorRT 10.3.0.30 on Orin (compute 8.7); "
        "rebuild the engine on this host"
    )


def test_cache_needs_tensorrt(tmp_path: Path) -> None:
    model = build_model(tmp_path / "model.onnx")
    result = run_entrypoint("--engine", str(model), TENSORFERRY_ENGINE_CACHE=str(tmp_path / "c"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "tensorrt is not importable" in result.stderr


# The start-up build


@pytest.fixture
def gpu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    root = fake_gpu_host(tmp_path / "host", "10.3.0.30", "Orin (nvgpu)", "8.7")
    monkeypatch.syspath_prepend(str(root))
    stand_ins = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime")
    for name in stand_ins:
        monkeypatch.delitem(sys.modules, name, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "trtexec.log"
    trtexec = bin_dir / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC.format(log=log))
    trtexec.chmod(0o755)
    yield {"bin": bin_dir, "log": log, "cache": tmp_path / "cache"}
    # The stand-ins were imported in this process; later tests must see the real (absent) ones.
    for name in stand_ins:
        sys.modules.pop(name, None)


def _env(gpu_host: dict[str, Path], **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{gpu_host['bin']}{os.pathsep}{os.environ['PATH']}",
        "TENSORFERRY_ENGINE_CACHE": str(gpu_host["cache"]),
        **extra,
    }


def test_onnx_with_cache_builds_once_and_serves_the_plan(
    tmp_path: Path, gpu_host: dict[str, Path]
) -> None:
    model = build_model(tmp_path / "model.onnx")
    args = ["--engine", str(model), "--port", "9000"]
    final = entrypoint.serve_args(args, _env(gpu_host))
    plan = Path(final[-1])
    assert final[:-2] == ["--port", "9000"] and final[-2] == "--engine"
    assert plan.parent == gpu_host["cache"] and plan.suffix == ".trt"
    assert "-fp32-b64-orin-nvgpu-sm87-trt10.3.0.30" in plan.name
    calls = gpu_host["log"].read_text().splitlines()
    assert len(calls) == 1
    assert "--minShapes=images:1x3x8x8 --optShapes=images:32x3x8x8" in calls[0]
    assert "--maxShapes=images:64x3x8x8" in calls[0]
    assert "--fp16" not in calls[0] and "--timingCacheFile=" in calls[0]
    # The sidecar is what serve's loader and compatibility check accept on this host only.
    sidecar = load_sidecar(plan)
    assert ModelContract.from_metadata(sidecar["metadata"]) == contract()
    check_plan(sidecar, HostInfo("10.3.0.30", "Orin (nvgpu)", "8.7"))
    with pytest.raises(Exception, match="rebuild the engine on this host"):
        check_plan(sidecar, HostInfo("10.3.0.30", "NVIDIA L4", "8.9"))
    # A restart (another replica, same cache) reuses it.
    assert entrypoint.serve_args(args, _env(gpu_host)) == final
    assert len(gpu_host["log"].read_text().splitlines()) == 1
    assert [p.name for p in gpu_host["cache"].iterdir() if p.name.startswith(".")] == []


def test_batch_size_and_precision_shape_the_build(
    tmp_path: Path, gpu_host: dict[str, Path]
) -> None:
    fp16 = build_model(tmp_path / "model.fp16.onnx")
    meta = {**contract().to_metadata(), "tensorferry.precision": "fp16"}
    build_model(fp16, metadata=meta)
    env = _env(gpu_host, TENSORFERRY_MAX_BATCH_SIZE="16")
    plan = Path(entrypoint.serve_args(["--engine", str(fp16)], env)[-1])
    assert "-fp16-b16-" in plan.name
    call = gpu_host["log"].read_text()
    assert "--optShapes=images:16x3x8x8 --maxShapes=images:16x3x8x8" in call
    assert call.rstrip().endswith("--fp16")  # TensorRT 10 needs the flag


def test_failed_build_leaves_nothing_in_the_cache(
    tmp_path: Path, gpu_host: dict[str, Path]
) -> None:
    model = build_model(tmp_path / "model.onnx")
    with pytest.raises(entrypoint.EntrypointError, match=r"trtexec failed \(exit 3\)"):
        entrypoint.serve_args(["--engine", str(model)], _env(gpu_host, FAIL="1"))
    assert list(gpu_host["cache"].iterdir()) == []


def test_plans_and_models_without_cache_pass_through(tmp_path: Path) -> None:
    model = build_model(tmp_path / "model.onnx")
    args = ["--engine", str(model), "--threads", "1"]
    assert entrypoint.serve_args(args, {}) == args
    assert entrypoint.serve_args([], {}) == []  # serve itself reports the missing option


# HEALTHCHECK


def test_healthcheck_follows_readiness(entrypoint_server: ServerProcess) -> None:
    port = entrypoint_server.url.rsplit(":", 1)[1]

    def check(port: str) -> int:
        env = {**os.environ, "TENSORFERRY_PORT": port}
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30
        ).returncode

    assert check(port) == 0
    assert check(str(free_port())) == 1


def test_trtexec_gets_a_shape_for_every_input_of_a_bare_model(tmp_path: Path) -> None:
    from serving.backends import load_backend
    from tests.serving import any_models

    model = any_models.two_inputs_three_outputs(tmp_path / "two.onnx")
    backend = load_backend(model, "cpu", 1)
    command = entrypoint.trtexec_command(
        "trtexec", model, tmp_path / "p.trt", backend, 16, "10.3.0.30", tmp_path / "t"
    )
    assert "--minShapes=features:1x3,counts:1x2" in command
    assert "--maxShapes=features:16x3,counts:16x2" in command
    assert not any(arg.startswith("--fp16") for arg in command)  # no recorded precision


def test_trtexec_refuses_a_dynamic_dim_it_cannot_size(tmp_path: Path) -> None:
    from serving.backends import load_backend
    from tests.serving import any_models

    model = any_models.dynamic_length(tmp_path / "lengths.onnx")
    backend = load_backend(model, "cpu", 1)
    with pytest.raises(entrypoint.EntrypointError, match="dynamic dims besides the batch"):
        entrypoint.trtexec_command(
            "trtexec", model, tmp_path / "p.trt", backend, 16, "10.3.0.30", tmp_path / "t"
        )
