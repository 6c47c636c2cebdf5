"""The engine stage on tabular models and on regressors (tabular, image, series): the
onnxruntime target run for real over the test split (accuracy, or RMSE/MAE/R² and the
distance from the fp32 ONNX model), TensorRT's [N, F] profile and typed fp16 plans (pure),
the server's runner reading a regressor's ``prediction`` (stand-in TensorRT), and (marked
``tensorrt``) real builds."""

from __future__ import annotations

import importlib.util
import json
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import engine, onnx_tools, tensorrt_build
from pipeline.cli import app
from pipeline.errors import StageError
from pipeline.params import EngineParams
from serving.compat import HostInfo, check_plan
from serving.contract import ModelContract
from tests.pipeline.export_tabular_fixtures import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    SIZES,
    make_tabular,
    shared_tabular_export,
)
from tests.serving import trt_stand_ins


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
needs_gpu = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")
FEATURES = 5


def build(name, precision, tmp_path, **options):
    shared = shared_tabular_export(name)
    params = EngineParams(precision=precision, **options)
    out = tmp_path / "engine"
    report = engine.build_engine(params, shared.onnx_dir, out, shared.data_dir, None)
    sidecar = json.loads((out / "model.optimized.onnx.json").read_text())
    return shared, report, sidecar


# onnxruntime target


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_tabular_classifier_runs_over_the_test_split(precision, tmp_path):
    shared, report, sidecar = build("tabular-classification", precision, tmp_path)
    assert report["rows"] == SIZES["test"] and report["accuracy"] >= 0.85
    assert report["accuracy_drop_pp"] <= 1.0 and report["top1_agreement_fp32"] >= 0.98
    assert sidecar["inputs"] == [{"name": "features", "dtype": "FP32", "shape": [-1, FEATURES]}]
    assert [o["name"] for o in sidecar["outputs"]] == ["logits", "probabilities"]
    assert sidecar["class_names"] == list(CLASS_NAMES) and sidecar["precision"] == precision
    contract = onnx_tools.read_contract(tmp_path / "engine" / "model.optimized.onnx")
    assert contract == ModelContract.from_metadata(sidecar["metadata"])
    assert contract.tabular == onnx_tools.read_contract(shared.variant("fp32")).tabular


# Dynamic int8 quantizes each batch's activations over that batch's range, so the engine's
# batches of 64 (engine.max_batch) answer a little differently from the export's of 256.
@pytest.mark.parametrize(
    ("precision", "max_diff", "rel"), [("fp32", 0.1, 1e-6), ("int8", 2e3, 2e-2), ("fp16", 50, 1e-6)]
)
def test_a_tabular_regressor_reports_rmse_mae_r2_and_its_distance_from_fp32(
    precision, max_diff, rel, tmp_path
):
    shared, report, sidecar = build("tabular-regression", precision, tmp_path)
    exported = shared.report["variants"][precision]
    assert report["rows"] == SIZES["test"]
    for figure in ("rmse", "mae", "r2"):
        assert report[figure] == pytest.approx(exported[figure], rel=rel), figure
    assert report["fp32_onnx_rmse"] == pytest.approx(shared.report["variants"]["fp32"]["rmse"])
    assert report["rmse_increase_pct"] <= 5.0 and report["max_abs_diff_fp32"] <= max_diff
    assert "accuracy" not in report and "top1_agreement_fp32" not in report
    assert sidecar["class_names"] == [] and sidecar["precision"] == precision
    assert sidecar["outputs"] == [{"name": "prediction", "dtype": "FP32", "shape": [-1]}]


def test_an_image_regressor_runs_through_the_same_engine(tmp_path):
    shared, report, sidecar = build("image-regression", "int8", tmp_path)
    assert report["images"] == 96 and report["rmse_increase_pct"] <= 5.0
    assert report["r2"] > 0.95
    assert sidecar["inputs"][0] == {"name": "images", "dtype": "UINT8", "shape": [-1, 1, 8, 8]}
    assert sidecar["relus_folded_into_quantization"] >= 1


def test_a_series_regressor_runs_by_length_through_the_engine(tmp_path):
    shared, report, sidecar = build("series-regression", "fp16", tmp_path)
    assert report["sequences"] == 72 and report["rmse_increase_pct"] <= 5.0
    assert report["rmse"] == pytest.approx(shared.report["variants"]["fp16"]["rmse"], rel=1e-6)
    assert [i["name"] for i in sidecar["inputs"]] == ["series", "mask"]
    assert sidecar["outputs"] == [{"name": "prediction", "dtype": "FP32", "shape": [-1]}]


def test_the_cli_summary_shows_regression_figures(tmp_path):
    shared = shared_tabular_export("tabular-regression")
    result = CliRunner().invoke(
        app,
        ["build-engine", "--onnx", str(shared.variant("fp32")), "--target", "onnxruntime"]
        + ["--out", str(tmp_path / "m.opt.onnx"), "--data-dir", str(shared.data_dir)]
        + ["--report", str(tmp_path / "engine.json")],
    )
    assert result.exit_code == 0, result.output
    assert "built onnxruntime fp32 engine from model.onnx" in result.output
    assert "; test rmse " in result.output and ", r2 0." in result.output
    assert ", max |diff| with fp32 ONNX " in result.output and "accuracy" not in result.output


# Data that does not fit the model


def test_regression_data_for_a_classifier_is_refused(tmp_path):
    shared = shared_tabular_export("tabular-classification")
    make_tabular(tmp_path / "data", "regression")
    with pytest.raises(StageError, match="holds regression data, but model.onnx is a tabular_"):
        engine.build_engine(
            EngineParams(precision="fp32"), shared.onnx_dir, tmp_path / "e", tmp_path / "data"
        )
    assert not (tmp_path / "e").exists()


def test_tabular_data_of_another_width_is_refused(tmp_path):
    shared = shared_tabular_export("tabular-regression")
    data = tmp_path / "data"
    make_tabular(data, "regression")
    with np.load(data / "test.npz") as arrays:
        np.savez(data / "test.npz", x=arrays["x"][:, :4], y=arrays["y"])
    with pytest.raises(StageError, match=r"test rows are \[4\], the model takes \[5\]"):
        engine.build_engine(EngineParams(precision="fp32"), shared.onnx_dir, tmp_path / "e", data)


# TensorRT decisions (pure Python)


def test_the_profile_of_a_tabular_model_spans_the_batch_over_its_columns():
    shared = shared_tabular_export("tabular-classification")
    source = engine.resolve_source(shared.onnx_dir, "fp32")
    params = EngineParams(min_batch=2, opt_batch=16, max_batch=128)
    profile = engine._profile(source, params, None)
    assert profile.to_json() == {"min": [2, 5], "opt": [16, 5], "max": [128, 5]}
    image = engine.resolve_source(shared_tabular_export("image-regression").onnx_dir, "fp32")
    assert tensorrt_build.fixed_input_shape(image.contract) == IMAGE_SHAPE


@pytest.mark.parametrize("name", ["tabular-classification", "image-regression"])
def test_tensorrt_10_builds_their_fp16_from_the_typed_fp16_onnx(name, tmp_path):
    contract = onnx_tools.read_contract(shared_tabular_export(name).variant("fp32"))
    assert tensorrt_build.typed_fp16(contract)
    plan = tensorrt_build.plan_build(10, "fp16", typed_fp16=True)
    assert (plan.variant, plan.flags, plan.strongly_typed) == ("fp16", (), True)
    with pytest.raises(StageError, match=r"pass model\.fp16\.onnx"):
        tensorrt_build.check_source(plan, "fp32", tmp_path / "model.onnx", 10)
    # fp32 and int8 plans are as for images; TensorRT 11 is typed anyway.
    assert tensorrt_build.plan_build(10, "int8", typed_fp16=True).flags == ("INT8",)
    assert tensorrt_build.plan_build(11, "fp16", typed_fp16=True).variant == "fp16"


def test_image_classifiers_keep_tensorrt_10s_fp16_flag():
    assert not tensorrt_build.typed_fp16(trt_stand_ins.contract())
    assert tensorrt_build.plan_build(10, "fp16").flags == ("FP16",)


def test_network_flags_ask_tensorrt_10_for_a_strongly_typed_network():
    trt = types.SimpleNamespace(
        __version__="10.3.0",
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
    )
    typed, weak = tensorrt_build.plan_build(10, "fp16", True), tensorrt_build.plan_build(10, "fp16")
    assert tensorrt_build.network_flags(trt, typed) == 1 << 1
    assert tensorrt_build.network_flags(trt, weak) == 0
    trt.__version__ = "11.0.0"
    assert tensorrt_build.network_flags(trt, tensorrt_build.plan_build(11, "fp16")) == 0


def test_dynamic_int8_of_a_tabular_model_is_refused_for_tensorrt_with_the_fix():
    shared = shared_tabular_export("tabular-regression")
    contract = onnx_tools.read_contract(shared.variant("int8"))
    graph = onnx_tools.load_model(shared.variant("int8")).graph
    with pytest.raises(StageError, match="int8 variant is dynamic; build engine.precision=fp16"):
        tensorrt_build.check_int8_form(
            {n.op_type for n in graph.node},
            shared.variant("int8"),
            tensorrt_build.int8_fix(contract),
        )


def test_a_tabular_sidecar_is_one_the_server_accepts():
    shared = shared_tabular_export("tabular-regression")
    contract = onnx_tools.read_contract(shared.variant("fp16"))
    params = EngineParams(target="tensorrt", precision="fp16")
    plan = tensorrt_build.plan_build(10, "fp16", typed_fp16=tensorrt_build.typed_fp16(contract))
    sidecar = tensorrt_build.make_sidecar(
        contract,
        plan,
        params,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        profile=tensorrt_build.profile_shapes((FEATURES,), params),
        io={
            "inputs": [{"name": "features", "dtype": "FP32", "shape": [-1, FEATURES]}],
            "outputs": [{"name": "prediction", "dtype": "FP32", "shape": [-1]}],
        },
        onnx_file="model.fp16.onnx",
        onnx_sha256="ab" * 32,
    )
    assert sidecar["profile"] == {"min": [1, 5], "opt": [32, 5], "max": [64, 5]}
    assert sidecar["strongly_typed"] is True and sidecar["builder_flags"] == []
    assert ModelContract.from_metadata(sidecar["metadata"]).tabular == contract.tabular
    json.dumps(sidecar)
    check_plan(sidecar, HostInfo("10.3.0", "Orin", "8.7"))


# The server's runner on a regressor's plan (stand-in tensorrt and cuda-python, CPU)


def test_the_plan_runner_reads_a_regressors_prediction(monkeypatch, tmp_path):
    contract = onnx_tools.read_contract(shared_tabular_export("tabular-regression").variant("fp32"))
    spec = trt_stand_ins.EngineSpec(
        {
            "features": trt_stand_ins.tensor_input(
                "FLOAT", (-1, FEATURES), (1, FEATURES), (8, FEATURES)
            ),
            "prediction": trt_stand_ins.tensor_output("FLOAT", (-1,)),
        },
        lambda x: {"prediction": x["features"].sum(axis=1)},
    )
    cudart = trt_stand_ins.install(monkeypatch, engine=spec)
    sidecar = trt_stand_ins.sidecar(
        metadata=contract.to_metadata(),
        inputs=[{"name": "features", "dtype": "FP32", "shape": [-1, FEATURES]}],
        outputs=[{"name": "prediction", "dtype": "FP32", "shape": [-1]}],
    )
    x = np.random.default_rng(0).normal(size=(19, FEATURES)).astype(np.float32)
    output = onnx_tools.primary_output(contract)
    got = engine.plan_logits(b"plan", sidecar, tmp_path / "model.trt", x, output)
    np.testing.assert_allclose(got, x.sum(axis=1), rtol=1e-6)  # 8, 8, 3 rows
    assert output == "prediction" and cudart.memory == {} and not cudart.streams


# Real TensorRT builds (GPU hosts: pytest -m tensorrt, or scripts/gpu-check)


@pytest.mark.tensorrt
@needs_tensorrt
@needs_gpu
@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("tabular-regression", "fp32"),
        ("tabular-regression", "fp16"),
        ("tabular-classification", "fp16"),
    ],
)
def test_tensorrt_tabular_engine_builds_with_an_n_by_f_profile_and_agrees(
    name, precision, tmp_path
):
    shared = shared_tabular_export(name)
    params = EngineParams(
        target="tensorrt", precision=precision, timing_cache=str(tmp_path / "cache")
    )
    out = tmp_path / "engine"
    report = engine.build_engine(params, shared.onnx_dir, out, shared.data_dir, None)
    sidecar = json.loads((out / "model.trt.json").read_text())
    assert sidecar["profile"] == {"min": [1, 5], "opt": [32, 5], "max": [64, 5]}
    if precision == "fp16":
        assert sidecar["strongly_typed"] is True, "built from the fp16 ONNX's types"
    if shared.meta.is_regression:
        assert report["rmse_increase_pct"] <= 5.0, report  # fp16 kept its fp32 ends
    else:
        assert report["accuracy_drop_pp"] <= 1.0 and report["top1_agreement_fp32"] >= 0.98
