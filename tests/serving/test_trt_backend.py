"""The TensorRT runner: its pure decisions, its bookkeeping with stand-in tensorrt and
cuda-python modules (CPU), and (marked ``tensorrt``) a real plan on a GPU host."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.compat import EngineError
from serving.contract import IMAGE_CLASSIFICATION, TensorSpec
from serving.trt_backend import (
    TRT_DATATYPES,
    host_code_allowed,
    load_tensorrt,
    open_plan,
    run_in_profile,
)
from tests.serving import trt_stand_ins
from tests.serving.serving_helpers import CLASSES, images


def sidecar_specs(entries: list[dict[str, Any]]) -> dict[str, TensorSpec]:
    """A sidecar's "inputs" or "outputs" list (pipeline/tensorrt_build.network_io) as specs."""
    return {e["name"]: TensorSpec(e["name"], e["dtype"], tuple(e["shape"])) for e in entries}


def by_name(specs: tuple[TensorSpec, ...]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def allocated(cudart: trt_stand_ins.Cudart, backend: Any) -> dict[str, int]:
    return {name: cudart.memory[pointer].nbytes for name, pointer in backend.buffers.items()}


# Pure decisions


@pytest.mark.parametrize(
    ("flag", "allowed"), [(True, True), (False, False), (None, False), ("true", False)]
)
def test_only_a_version_compatible_plan_may_run_host_code(flag, allowed) -> None:
    sidecar = {} if flag is None else {"version_compatible": flag}
    assert host_code_allowed(sidecar) is allowed


def test_a_plan_without_a_sidecar_may_not_run_host_code() -> None:
    assert host_code_allowed(None) is False


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
def test_run_in_profile_chunks_pads_and_drops_the_padding_in_every_tensor(
    rows, min_batch, max_batch, runs
):
    seen = []

    def run(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = chunk["a"], chunk["b"]
        seen.append((len(a), len(b)))
        return {"sum": a.sum(axis=1) + b[:, 0], "b": b}

    a = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    b = np.arange(rows * 3, dtype=np.int64).reshape(rows, 3) * 7
    out = run_in_profile(run, {"a": a, "b": b}, min_batch, max_batch)
    assert seen == [(n, n) for n in runs]
    np.testing.assert_array_equal(out["sum"], a.sum(axis=1) + b[:, 0])
    np.testing.assert_array_equal(out["b"], b)


def test_run_in_profile_pads_every_input_with_its_last_row() -> None:
    chunks = []

    def run(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks.append(chunk)
        return {"a": chunk["a"] * 2}

    a, b = np.arange(6.0).reshape(3, 2), np.array([[1], [2], [3]], np.int8)
    out = run_in_profile(run, {"a": a, "b": b}, 5, 8)
    np.testing.assert_array_equal(chunks[0]["a"], a[[0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(chunks[0]["b"], b[[0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(out["a"], a * 2)  # the padding's outputs dropped


def test_run_in_profile_refuses_an_empty_batch_and_ragged_inputs() -> None:
    with pytest.raises(EngineError, match="empty batch"):
        run_in_profile(lambda c: dict(c), {"x": np.zeros((0, 2))}, 1, 4)
    with pytest.raises(EngineError, match="different batch sizes: {'x': 2, 'y': 3}"):
        run_in_profile(lambda c: dict(c), {"x": np.zeros((2, 1)), "y": np.zeros((3, 1))}, 1, 4)


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
    assert backend.signature.batching
    assert [s.datatype for s in backend.signature.outputs] == ["FP32"]
    x = images(5)
    logits = backend.run({"images": x})["logits"]
    np.testing.assert_array_equal(logits, trt_stand_ins.expected_logits(x))
    assert [run["images"][0] for run in backend.context.runs] == [4, 2]  # 1 row padded
    held = set(cudart.memory)
    assert len(held) == 2 and len(cudart.streams) == 1
    backend.close()
    assert cudart.memory == {} and sorted(cudart.freed) == sorted(held) and not cudart.streams
    assert backend.context is backend.engine is backend.runtime is None
    backend.close()  # idempotent: nothing is freed twice
    assert len(cudart.freed) == 2
    with pytest.raises(EngineError, match="closed"):
        backend.run({"images": x})


def test_a_plan_with_its_sidecar_loads_with_its_contract(monkeypatch, tmp_path: Path) -> None:
    trt_stand_ins.install(monkeypatch)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    (tmp_path / "m.plan.json").write_text(json.dumps(trt_stand_ins.sidecar()))
    backend = load_tensorrt(plan)
    assert backend.platform == "tensorrt_plan" and backend.max_batch == 4
    assert backend.contract == trt_stand_ins.contract()
    assert backend.info["precision"] == "fp32" and backend.info["tensorrt_version"]
    assert backend.run({"images": images(1)})["logits"].shape == (1, 4)
    backend.close()


def test_the_signature_read_from_the_engine_is_what_the_sidecar_lists(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch)
    side = trt_stand_ins.sidecar()
    backend = open_plan(b"plan", side, Path("m.trt"))
    assert by_name(backend.signature.inputs) == sidecar_specs(side["inputs"])
    assert by_name(backend.signature.outputs) == sidecar_specs(side["outputs"])
    backend.close()


def test_a_v1_sidecar_still_loads_as_an_image_classifier(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch)
    v1 = {  # what the engine stage wrote before contract version 2
        "tensorferry.model_name": "tiny",
        "tensorferry.class_names": json.dumps(CLASSES),
        "tensorferry.input_name": "images",
        "tensorferry.input_layout": "NCHW",
        "tensorferry.input_shape": "[3, 8, 8]",
        "tensorferry.input_dtype": "uint8",
        "tensorferry.value_range": "[0, 255]",
        "tensorferry.precision": "fp32",
    }
    backend = open_plan(b"plan", trt_stand_ins.sidecar(metadata=v1), Path("m.trt"))
    assert backend.contract.task == IMAGE_CLASSIFICATION
    assert backend.contract.class_names == CLASSES
    assert backend.contract.image == trt_stand_ins.contract().image
    backend.close()


def test_a_plan_without_a_sidecar_is_served_from_the_engine_alone(
    monkeypatch, tmp_path: Path
) -> None:
    cudart = trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.two_in_three_out())
    plan = tmp_path / "user.engine"  # e.g. trtexec --saveEngine output
    plan.write_bytes(b"plan from trtexec")
    backend = load_tensorrt(plan)
    assert backend.contract is None and backend.info["precision"] == ""
    assert backend.runtime.host_code_when_deserialized is False
    assert [s.name for s in backend.signature.inputs] == ["ids", "weight"]
    ids = np.ones((3, 2), np.int32)
    out = backend.run({"ids": ids, "weight": np.ones((3, 3), np.float16)})
    np.testing.assert_array_equal(out["total"], np.full(3, 5.0, np.float32))
    backend.close()
    assert cudart.memory == {}


def test_a_bare_plan_tensorrt_cannot_read_fails_with_tensorrt_s_word(
    monkeypatch, tmp_path: Path
) -> None:
    trt_stand_ins.install(monkeypatch)
    plan = tmp_path / "m.trt"
    plan.write_bytes(b"not a plan")
    with pytest.raises(EngineError, match="TensorRT could not deserialize"):
        load_tensorrt(plan)


def test_a_sidecar_that_exists_but_is_unreadable_stays_an_error(
    monkeypatch, tmp_path: Path
) -> None:
    trt_stand_ins.install(monkeypatch)
    plan = tmp_path / "m.trt"
    plan.write_bytes(b"plan")
    (tmp_path / "m.trt.json").write_text("{not json")
    with pytest.raises(EngineError, match="sidecar .*m.trt.json is unreadable"):
        load_tensorrt(plan)
    assert sys.modules["tensorrt"].plans == []


def test_a_sidecar_from_another_host_is_refused_before_deserializing(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch)
    side = trt_stand_ins.sidecar(tensorrt_version="9.2.0")
    with pytest.raises(EngineError, match="built with TensorRT 9.2.0"):
        open_plan(b"plan", side, Path("m.trt"))
    assert sys.modules["tensorrt"].plans == []


def test_an_engine_that_does_not_take_what_its_contract_says_is_refused(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch)
    metadata = trt_stand_ins.contract().to_metadata()
    metadata["tensorferry.preprocessing"] = metadata["tensorferry.preprocessing"].replace(
        "[3, 8, 8]", "[3, 16, 16]"
    )
    with pytest.raises(EngineError, match="do not match its metadata"):
        open_plan(b"plan", trt_stand_ins.sidecar(metadata=metadata), Path("m.trt"))


def test_a_tensor_type_numpy_cannot_hold_is_refused_by_name(monkeypatch) -> None:
    spec = trt_stand_ins.image_engine()
    tensors = {**spec.tensors, "logits": trt_stand_ins.tensor_output("BF16", (-1, 4))}
    trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.EngineSpec(tensors, spec.rule))
    assert TRT_DATATYPES["BF16"] == "BF16"  # the sidecar names it; the server can't serve it
    with pytest.raises(EngineError, match="engine tensor 'logits' has unsupported type"):
        open_plan(b"plan", trt_stand_ins.sidecar(), Path("m.trt"))


def test_two_inputs_and_three_outputs_read_and_run(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.two_in_three_out())
    backend = open_plan(b"plan", None, Path("m.trt"))
    signature = backend.signature
    assert signature.inputs == (
        TensorSpec("ids", "INT32", (-1, -1)),
        TensorSpec("weight", "FP16", (-1, 3)),
    )
    assert signature.outputs == (
        TensorSpec("total", "FP32", (-1,)),
        TensorSpec("doubled", "INT32", (-1, -1)),
        TensorSpec("positive", "BOOL", (-1, 3)),
    )
    assert signature.batching
    assert (backend.min_batch, backend.max_batch) == (2, 4)  # ids take 1..8, weight 2..4
    rng = np.random.default_rng(0)
    x = {
        "ids": rng.integers(-50, 50, (5, 6), dtype=np.int32),
        "weight": rng.standard_normal((5, 3)).astype(np.float16),
    }
    out = backend.run(x)
    expected = trt_stand_ins.two_in_three_out_rule(x)
    assert {name: value.dtype for name, value in out.items()} == {
        "total": np.float32,
        "doubled": np.int32,
        "positive": np.bool_,
    }
    for name, value in expected.items():
        np.testing.assert_array_equal(out[name], value)
    assert backend.context.runs == [  # 4 rows, then 1 padded to weight's min of 2
        {"ids": (4, 6), "weight": (4, 3)},
        {"ids": (2, 6), "weight": (2, 3)},
    ]
    backend.close()


def test_a_dynamic_non_batch_dim_is_allocated_at_its_profile_max(monkeypatch) -> None:
    cudart = trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.two_in_three_out())
    backend = open_plan(b"plan", None, Path("m.trt"))
    # 4 rows (the batch all inputs take) x the profile's max of 16 ids; outputs as the
    # context resolves them with every input at that size.
    assert allocated(cudart, backend) == {
        "ids": 4 * 16 * 4,
        "weight": 4 * 3 * 2,
        "total": 4 * 4,
        "doubled": 4 * 16 * 4,
        "positive": 4 * 3,
    }
    longest = {"ids": np.ones((4, 16), np.int32), "weight": np.ones((4, 3), np.float16)}
    assert backend.run(longest)["doubled"].shape == (4, 16)
    too_long = {**longest, "ids": np.ones((4, 17), np.int32)}
    with pytest.raises(EngineError, match=r"refused input 'ids' shape \[4, 17\]; its profile"):
        backend.run(too_long)
    # TensorRT's docs promise an error for a shape outside the profile, not that
    # set_input_shape is where it comes: the copy in must not overrun the buffer meanwhile.
    monkeypatch.setattr(backend.context, "set_input_shape", lambda name, shape: True)
    with pytest.raises(EngineError, match=r"refused input 'ids' shape \[4, 17\]"):
        backend.run(too_long)
    backend.close()


def test_an_output_larger_than_its_buffer_is_refused_not_copied(monkeypatch) -> None:
    trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.two_in_three_out())
    backend = open_plan(b"plan", None, Path("m.trt"))
    resolved = backend.context.get_tensor_shape
    monkeypatch.setattr(  # a network whose output outgrows what its largest inputs gave
        backend.context, "get_tensor_shape", lambda n: (4, 17) if n == "doubled" else resolved(n)
    )
    x = {"ids": np.ones((4, 2), np.int32), "weight": np.ones((4, 3), np.float16)}
    with pytest.raises(EngineError, match=r"output 'doubled' has shape \[4, 17\], beyond the 256"):
        backend.run(x)
    backend.close()


@pytest.mark.parametrize(
    ("method", "answer", "message"),
    [
        ("infer_shapes", lambda self: ["dims"], r"needs the values, not only the shapes, of"),
        ("get_tensor_shape", lambda self, name: (-1, 4), "output 'logits' has a data-dependent"),
    ],
)
def test_an_engine_whose_output_shapes_inputs_do_not_give_is_refused_at_open(
    monkeypatch, method, answer, message
) -> None:
    cudart = trt_stand_ins.install(monkeypatch)
    monkeypatch.setattr(trt_stand_ins.Context, method, answer)
    with pytest.raises(EngineError, match=message):
        open_plan(b"plan", trt_stand_ins.sidecar(), Path("m.trt"))
    assert cudart.memory == {} and not cudart.streams


def test_an_engine_without_a_batch_dim_runs_its_shapes_unchunked(monkeypatch) -> None:
    cudart = trt_stand_ins.install(monkeypatch, engine=trt_stand_ins.fixed_batch_engine())
    backend = open_plan(b"plan", None, Path("m.trt"))
    assert not backend.signature.batching
    assert backend.max_batch is None and backend.min_batch is None
    assert allocated(cudart, backend) == {"x": 2 * 8 * 4, "y": 2 * 8 * 4}
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(backend.run({"x": x})["y"], x * 2)
    assert backend.context.runs == [{"x": (2, 5)}]
    with pytest.raises(EngineError, match=r"input 'x' has shape \[3, 5\]; the engine takes"):
        backend.run({"x": np.zeros((3, 5), np.float32)})
    backend.close()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, r"takes inputs \['images'\]; missing \['images'\], unexpected \[\]"),
        ({"images": images(1), "extra": images(1)}, r"unexpected \['extra'\]"),
        ({"images": images(1).astype(np.float32)}, "input 'images' is float32; .* UINT8"),
        ({"images": images(1)[0]}, r"has shape \[3, 8, 8\]; the engine takes \[-1, 3, 8, 8\]"),
        (images(1), "run takes a dict of arrays keyed by input name"),
    ],
)
def test_inputs_must_be_exactly_the_engine_s_and_are_never_cast(
    monkeypatch, inputs, message
) -> None:
    trt_stand_ins.install(monkeypatch)
    backend = open_plan(b"plan", trt_stand_ins.sidecar(), Path("m.trt"))
    with pytest.raises(EngineError, match=message):
        backend.run(inputs)
    assert backend.context.runs == []
    backend.close()


# A real plan (GPU hosts: scripts/gpu-check hands one over)


@pytest.fixture
def real_plan() -> Path:
    pytest.importorskip("tensorrt", reason="needs TensorRT and an NVIDIA GPU (not on CPU hosts)")
    plan = os.environ.get("TENSORFERRY_TEST_PLAN")
    if not plan:
        pytest.skip("set TENSORFERRY_TEST_PLAN to a .trt built by the engine stage")
    return Path(plan)


@pytest.mark.tensorrt
def test_real_plan_reads_its_signature_runs_any_batch_and_closes(real_plan: Path) -> None:
    sidecar = json.loads(real_plan.with_name(real_plan.name + ".json").read_text())
    backend = load_tensorrt(real_plan)
    assert backend.runtime.engine_host_code_allowed is (sidecar.get("version_compatible") is True)
    assert by_name(backend.signature.inputs) == sidecar_specs(sidecar["inputs"])
    assert by_name(backend.signature.outputs) == sidecar_specs(sidecar["outputs"])
    assert backend.signature.batching
    (images_spec,) = backend.signature.inputs
    x = np.random.default_rng(0).integers(
        0, 256, (backend.max_batch + 3, *images_spec.shape[1:]), dtype=np.uint8
    )
    whole = backend.run({images_spec.name: x})
    one_by_one = [backend.run({images_spec.name: x[i : i + 1]}) for i in (0, len(x) - 1)]
    assert whole["probabilities"].shape == (len(x), len(backend.contract.class_names))
    np.testing.assert_allclose(whole["probabilities"].sum(axis=1), 1.0, rtol=1e-3)
    for got, i in zip(one_by_one, (0, len(x) - 1), strict=True):
        np.testing.assert_allclose(got["logits"][0], whole["logits"][i], rtol=2e-2, atol=5e-2)
    backend.close()
    backend.close()
    with pytest.raises(EngineError, match="closed"):
        backend.run({images_spec.name: x[:1]})
