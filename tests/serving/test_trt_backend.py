"""The TensorRT runner: its pure decisions, its bookkeeping with stand-in tensorrt and
cuda-python modules (CPU), and (marked ``tensorrt``) a real plan on a GPU host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from serving.backends import load_backend
from serving.compat import EngineError
from serving.trt_backend import TRT_DATATYPES, host_code_allowed, open_plan, run_in_profile
from tests.serving import trt_stand_ins
from tests.serving.serving_helpers import images

# Pure decisions


@pytest.mark.parametrize(
    ("flag", "allowed"), [(True, True), (False, False), (None, False), ("true", False)]
)
def test_only_a_version_compatible_plan_may_run_host_code(flag, allowed) -> None:
    sidecar = {} if flag is None else {"version_compatible": flag}
    assert host_code_allowed(sidecar) is allowed


@pytest.mark.parametrize(
    ("rows", "min_batch", "max_batch", "runs"),
    [
        (10, 1, 4, [4, 4, 2]),
        (10, 4, 4, [4, 4, 4]),  # the last 2 rows padded to the profile's min
        (1, 8, 64, [8]),
        (64, 1, 64, [64]),
        (130, 2, 64, [64, 64, 2]),
        (3, 2, 2, [2, 2]),
    ],
)
def test_run_in_profile_chunks_pads_and_drops_the_padding(rows, min_batch, max_batch, runs):
    seen = []

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(len(batch))
        return {"logits": batch[:, :1] * 2.0, "rows": batch[:, 1:2]}

    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    out = run_in_profile(run, x, min_batch, max_batch)
    assert seen == runs
    np.testing.assert_array_equal(out["logits"], x[:, :1] * 2.0)
    np.testing.assert_array_equal(out["rows"], x[:, 1:2])


def test_run_in_profile_refuses_an_empty_batch() -> None:
    with pytest.raises(EngineError, match="empty batch"):
        run_in_profile(lambda b: {"x": b}, np.zeros((0, 2)), 1, 4)


# The runner's bookkeeping, with stand-ins


@pytest.mark.parametrize("version_compatible", [True, False])
def test_the_runtime_trusts_host_code_exactly_when_the_sidecar_says_version_compatible(
    monkeypatch, version_compatible
) -> None:
    trt_stand_ins.install(monkeypatch)
    side = trt_stand_ins.sidecar(version_compatible=version_compatible)
    backend = open_plan(b"plan", side, Path("m.trt"))
    assert backend.runtime.host_code_when_deserialized is version_compatible
    backend.close()


def test_the_runner_pads_to_the_profile_and_frees_all_it_holds(monkeypatch) -> None:
    cudart = trt_stand_ins.install(monkeypatch, batches=(2, 4))
    backend = open_plan(b"plan", trt_stand_ins.sidecar(), Path("m.trt"))
    assert (backend.min_batch, backend.max_batch) == (2, 4)
    assert [s.datatype for s in backend.outputs] == ["FP32"]
    x = images(5)
    logits = backend.run(x)["logits"]
    np.testing.assert_array_equal(logits, trt_stand_ins.expected_logits(x))
    assert [shape[0] for shape in backend.context.input_shapes] == [4, 2]  # 1 row padded
    held = set(cudart.memory)
    assert len(held) == 2 and len(cudart.streams) == 1
    backend.close()
    assert cudart.memory == {} and sorted(cudart.freed) == sorted(held) and not cudart.streams
    assert backend.context is backend.engine is backend.runtime is None
    backend.close()  # idempotent: nothing is freed twice
    assert len(cudart.freed) == 2
    with pytest.raises(EngineError, match="closed"):
        backend.run(x)


def test_plan_files_are_loaded_through_the_same_runner(monkeypatch, tmp_path: Path) -> None:
    trt_stand_ins.install(monkeypatch)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    (tmp_path / "m.plan.json").write_text(json.dumps(trt_stand_ins.sidecar()))
    backend = load_backend(plan, "cuda", 3)  # onnxruntime settings don't apply to a plan
    assert backend.platform == "tensorrt_plan" and backend.max_batch == 4
    assert backend.run(images(1))["logits"].shape == (1, 4)
    backend.close()


def test_a_tensor_type_numpy_cannot_hold_is_refused_by_name(monkeypatch) -> None:
    tensors = {**trt_stand_ins.Engine.TENSORS, "logits": ("BF16", (-1, 4))}
    trt_stand_ins.install(monkeypatch, tensors=tensors)
    assert TRT_DATATYPES["BF16"] == "BF16"  # the sidecar names it; the server can't serve it
    with pytest.raises(EngineError, match="engine tensor 'logits' has unsupported type"):
        open_plan(b"plan", trt_stand_ins.sidecar(), Path("m.trt"))


# A real plan (GPU hosts: scripts/gpu-check hands one over)


@pytest.fixture
def real_plan() -> Path:
    pytest.importorskip("tensorrt", reason="needs TensorRT and an NVIDIA GPU (not on CPU hosts)")
    plan = os.environ.get("TENSORFERRY_TEST_PLAN")
    if not plan:
        pytest.skip("set TENSORFERRY_TEST_PLAN to a .trt built by the engine stage")
    return Path(plan)


@pytest.mark.tensorrt
def test_real_plan_runs_any_batch_and_closes(real_plan: Path) -> None:
    from serving.trt_backend import load_tensorrt

    sidecar = json.loads(real_plan.with_name(real_plan.name + ".json").read_text())
    backend = load_tensorrt(real_plan)
    assert backend.runtime.engine_host_code_allowed is (sidecar.get("version_compatible") is True)
    x = np.random.default_rng(0).integers(
        0, 256, (backend.max_batch + 3, *backend.inputs[0].shape[1:]), dtype=np.uint8
    )
    whole = backend.run(x)
    one_by_one = [backend.run(x[i : i + 1]) for i in (0, len(x) - 1)]
    assert whole["probabilities"].shape == (len(x), len(backend.contract.class_names))
    np.testing.assert_allclose(whole["probabilities"].sum(axis=1), 1.0, rtol=1e-3)
    for got, i in zip(one_by_one, (0, len(x) - 1), strict=True):
        np.testing.assert_allclose(got["logits"][0], whole["logits"][i], rtol=2e-2, atol=5e-2)
    backend.close()
    backend.close()
    with pytest.raises(EngineError, match="closed"):
        backend.run(x[:1])
