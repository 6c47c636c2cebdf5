"""The engine stage on sequence models: the onnxruntime target with two inputs and trimmed
batches, TensorRT profiles over batch and length (pure), and (marked ``tensorrt``) real
TensorRT builds on GPU hosts."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from pipeline import engine, onnx_tools, tensorrt_build
from pipeline.dataset import load_meta
from pipeline.errors import StageError
from pipeline.params import EngineParams
from serving.compat import HostInfo, check_plan
from serving.contract import ModelContract
from tests.pipeline.export_sequence_fixtures import (
    CLASS_NAMES,
    SERIES_SHAPE,
    TEXT_LENGTH,
    make_prepared,
    shared_sequence_export,
)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
needs_gpu = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")

INPUTS = {
    "text": [
        {"name": "input_ids", "dtype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "dtype": "INT64", "shape": [-1, -1]},
    ],
    "series": [
        {"name": "series", "dtype": "FP32", "shape": [-1, SERIES_SHAPE[0], -1]},
        {"name": "mask", "dtype": "INT64", "shape": [-1, -1]},
    ],
}


@pytest.mark.parametrize(
    ("kind", "precision"), [("text", "fp32"), ("text", "int8"), ("series", "fp16")]
)
def test_onnxruntime_target_runs_sequence_models_over_the_test_split(kind, precision, tmp_path):
    shared = shared_sequence_export(kind)
    out, report_path = tmp_path / "engine", tmp_path / "engine.json"
    params = EngineParams(precision=precision)
    report = engine.build_engine(params, shared.onnx_dir, out, shared.data_dir, report_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.optimized.onnx",
        "model.optimized.onnx.json",
    ]
    assert report["sequences"] == 72 and report["accuracy"] >= 0.9
    assert report["accuracy_drop_pp"] <= 1.0
    if precision == "fp32":
        assert report["top1_agreement_fp32"] == 1.0 and report["max_abs_logit_diff_fp32"] < 1e-4
    sidecar = json.loads((out / "model.optimized.onnx.json").read_text())
    assert sidecar["inputs"] == INPUTS[kind] and sidecar["precision"] == precision
    assert sidecar["class_names"] == list(CLASS_NAMES)
    contract = onnx_tools.read_contract(out / "model.optimized.onnx")
    assert contract == ModelContract.from_metadata(sidecar["metadata"])
    assert contract.sequence.kind == kind


def test_engine_refuses_data_of_another_kind(tmp_path):
    shared = shared_sequence_export("text")
    make_prepared(tmp_path / "series", "series")
    with pytest.raises(StageError, match="holds series data of length 20, the model takes text"):
        engine.build_engine(
            EngineParams(precision="fp32"), shared.onnx_dir, tmp_path / "e", tmp_path / "series"
        )
    assert not (tmp_path / "e").exists()


# TensorRT profiles (pure Python)


def graph_shapes(path):
    model = onnx_tools.load_model(path)
    return {
        i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }


@pytest.mark.parametrize("kind", ["text", "series"])
def test_sequence_profiles_span_batch_and_length_of_every_input(kind):
    shared = shared_sequence_export(kind)
    stats = load_meta(shared.data_dir).length_stats
    sequence = onnx_tools.read_contract(shared.variant("fp32")).sequence
    params = EngineParams(min_batch=2, opt_batch=8, max_batch=32)
    shapes = graph_shapes(shared.variant("fp32"))
    profiles = tensorrt_build.sequence_profiles(shapes, sequence, stats["median"], params)
    low, mid, high = stats["min"], stats["median"], (TEXT_LENGTH, SERIES_SHAPE[1])[kind == "series"]
    assert low < mid < high
    values, mask = (p.name for p in sequence.padded)
    channels = () if kind == "text" else (SERIES_SHAPE[0],)
    assert profiles[values].to_json() == {
        "min": [2, *channels, low],
        "opt": [8, *channels, mid],
        "max": [32, *channels, high],
    }
    assert profiles[mask].to_json() == {"min": [2, low], "opt": [8, mid], "max": [32, high]}
    halfway = tensorrt_build.sequence_profiles(shapes, sequence, None, params)
    assert halfway[mask].opt == (8, (low + high) // 2)
    if kind == "series":
        unknown_channels = {**shapes, values: [-1, -1, -1]}
        with pytest.raises(StageError, match="dynamic dim besides the batch and its sequence"):
            tensorrt_build.sequence_profiles(unknown_channels, sequence, None, params)


def test_sequence_sidecar_lists_a_profile_per_input_and_serving_reads_it():
    shared = shared_sequence_export("text")
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    params = EngineParams(target="tensorrt", precision="fp16")
    shapes = graph_shapes(shared.variant("fp32"))
    profiles = tensorrt_build.sequence_profiles(shapes, contract.sequence, 9, params)
    sidecar = tensorrt_build.make_sidecar(
        contract,
        tensorrt_build.plan_build(10, "fp16"),
        params,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        profile=profiles,
        io={"inputs": INPUTS["text"], "outputs": []},
        onnx_file="model.onnx",
        onnx_sha256="ab" * 32,
    )
    assert set(sidecar["profile"]) == {"input_ids", "attention_mask"}
    assert sidecar["profile"]["input_ids"]["opt"] == [32, 9]
    assert ModelContract.from_metadata(sidecar["metadata"]).sequence == contract.sequence
    json.dumps(sidecar)
    check_plan(sidecar, HostInfo("10.3.0", "Orin", "8.7"))


def test_dynamically_quantized_int8_is_refused_for_tensorrt_with_the_fix():
    shared = shared_sequence_export("text")
    model = onnx_tools.load_model(shared.variant("int8"))
    with pytest.raises(StageError, match="export.sequence_int8=static"):
        tensorrt_build.check_int8_form(
            {n.op_type for n in model.graph.node}, shared.variant("int8")
        )
    tensorrt_build.check_int8_form({"QuantizeLinear", "DequantizeLinear"}, shared.variant("int8"))


def test_the_plan_runner_takes_a_sequence_models_feeds(monkeypatch, tmp_path):
    """plan_logits hands every named input to the server's runner (stand-in TensorRT)."""
    from tests.serving import trt_stand_ins

    trt_stand_ins.install(monkeypatch, batches=(4, 64))
    x = np.random.default_rng(0).integers(0, 256, (9, *trt_stand_ins.IMAGE), dtype=np.uint8)
    by_name = engine.plan_logits(
        b"plan", trt_stand_ins.sidecar(), tmp_path / "model.trt", {"images": x}
    )
    np.testing.assert_array_equal(by_name, trt_stand_ins.expected_logits(x))


# Real TensorRT builds (GPU hosts: pytest -m tensorrt, or scripts/gpu-check)


@pytest.mark.tensorrt
@needs_tensorrt
@needs_gpu
@pytest.mark.parametrize(("kind", "precision"), [("text", "fp16"), ("series", "fp32")])
def test_tensorrt_sequence_engine_builds_with_length_profiles_and_agrees(kind, precision, tmp_path):
    shared = shared_sequence_export(kind)
    params = EngineParams(
        target="tensorrt", precision=precision, timing_cache=str(tmp_path / "cache")
    )
    out = tmp_path / "engine"
    report = engine.build_engine(params, shared.onnx_dir, out, shared.data_dir, None)
    assert report["accuracy"] >= 0.9 and report["top1_agreement_fp32"] >= 0.97
    sidecar = json.loads((out / "model.trt.json").read_text())
    stats = load_meta(shared.data_dir).length_stats
    for name in (i["name"] for i in INPUTS[kind]):
        profile = sidecar["profile"][name]
        assert (profile["min"][0], profile["max"][0]) == (1, 64)
        assert (profile["min"][-1], profile["opt"][-1]) == (stats["min"], stats["median"])
