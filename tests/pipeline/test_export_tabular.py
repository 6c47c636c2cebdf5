"""The export stage on tabular models (both tasks) and on image and series regressors:
graph I/O, the contract, the regression parity gate, fp16/int8 variants with missing
cells and values fp16 cannot hold, the RMSE gate, and the CLI's summary."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline import export, export_tasks, onnx_tools, variants
from pipeline.errors import StageError
from pipeline.params import ExportParams
from serving.contract import ModelContract, TabularColumn, check_io
from tests.pipeline.export_tabular_fixtures import (
    CATEGORIES,
    CLASS_NAMES,
    IMAGE_SHAPE,
    NUMERIC_COLUMNS,
    SIZES,
    TARGET_MEAN,
    export_standin,
    make_tabular,
    shared_tabular_export,
)

FEATURES = len(NUMERIC_COLUMNS) + len(CATEGORIES)
FP32_ONLY = ExportParams(variants=("fp32",))


@pytest.fixture(scope="module")
def classifier():
    return shared_tabular_export("tabular-classification")


@pytest.fixture(scope="module")
def regressor():
    return shared_tabular_export("tabular-regression")


@pytest.fixture(scope="module")
def image_regressor():
    return shared_tabular_export("image-regression")


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def awkward_rows(rows: int, seed: int) -> np.ndarray:
    """Rows a server may send: missing cells, unseen and out-of-range codes, incomes of
    several hundred thousand (fp16's largest value is 65 504)."""
    rng = np.random.default_rng(seed)
    x = np.stack(
        [rng.normal(m, 3 * s, rows) for m, s in NUMERIC_COLUMNS.values()]
        + [rng.integers(-1, len(c) + 1, rows).astype(float) for c in CATEGORIES.values()],
        axis=1,
    ).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[0, 1] = 400_000.0
    return x


# Files, graph and contract


def test_classifier_export_writes_variants_and_a_report(classifier):
    assert sorted(p.name for p in classifier.onnx_dir.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
    ]
    report = classifier.report
    assert (report["kind"], report["task"], report["int8_method"]) == (
        "tabular",
        "classification",
        "dynamic",
    )
    assert report["parity"] == {
        "rows": SIZES["test"],
        "max_abs_logit_diff": report["parity"]["max_abs_logit_diff"],
        "top1_agreement": 1.0,
        "batch_sizes": [1, 7, 64],
        "atol": 1e-4,
    }
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["torch_accuracy"] >= 0.85 and report["max_accuracy_drop_pp"] == 1.0
    for name in ("fp32", "int8", "fp16"):
        assert report["variants"][name]["accuracy_drop_pp"] <= 1.0
        assert report["variants"][name]["top1_agreement_fp32"] >= 0.98
    json.dumps(report)


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("tabular-classification", {"logits": [len(CLASS_NAMES)], "probabilities": [3]}),
        ("tabular-regression", {"prediction": []}),
    ],
)
def test_graph_takes_float_features_with_a_dynamic_batch(name, outputs):
    model = onnx.load(str(shared_tabular_export(name).variant("fp32")))
    (features,) = model.graph.input
    assert features.name == "features"
    assert features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, width = dims(features)
    assert isinstance(batch, str) and width == FEATURES
    assert {o.name: dims(o)[1:] for o in model.graph.output} == outputs
    assert all(dims(o)[0] == batch for o in model.graph.output), "one batch symbol"
    assert model.opset_import[0].version == 18


@pytest.mark.parametrize(
    ("name", "task", "class_names"),
    [
        ("tabular-classification", "tabular_classification", CLASS_NAMES),
        ("tabular-regression", "regression", ()),
    ],
)
def test_contract_lists_the_columns_and_serving_accepts_the_graph(name, task, class_names):
    shared = shared_tabular_export(name)
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    assert (contract.task, contract.class_names) == (task, class_names)
    assert contract.image is None and contract.sequence is None
    tabular = contract.tabular
    assert tabular.input_name == "features" and tabular.impute is True
    assert tabular.columns == (
        *(TabularColumn(n, "numeric") for n in NUMERIC_COLUMNS),
        *(TabularColumn(n, "categorical", c) for n, c in CATEGORIES.items()),
    )
    assert contract.data_fingerprint == shared.meta.fingerprint
    assert ModelContract.from_metadata(contract.to_metadata()) == contract
    for precision in ("fp32", "int8", "fp16"):
        sess = onnx_tools.session(shared.variant(precision))
        check_io(contract, onnx_tools.signature(sess), precision)  # the server's own check


def test_without_imputation_the_contract_says_refuse(tmp_path):
    meta = make_tabular(tmp_path / "data", impute=False)
    contract = export.make_contract("m", meta, ExportParams(), tmp_path / "data")
    assert contract.tabular.impute is False
    assert contract.tabular.to_json()["missing"] == "refuse"


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_matches_torch_on_missing_unseen_and_large_values(classifier, regressor, batch):
    x = awkward_rows(batch, batch)
    for shared in (classifier, regressor):
        got = onnx_tools.session(shared.variant("fp32")).run(None, {"features": x})[0]
        with torch.inference_mode():
            want = shared.model(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


# Regression


def test_regressor_report_has_parity_and_rmse_per_variant(regressor):
    report = regressor.report
    assert (report["kind"], report["task"]) == ("tabular", "regression")
    parity = report["parity"]
    assert set(parity) == {"rows", "max_abs_diff", "max_rel_diff", "batch_sizes", "atol", "rtol"}
    assert parity["rows"] == SIZES["test"] and parity["batch_sizes"] == [1, 7, 64]
    assert (parity["atol"], parity["rtol"]) == (1e-4, 1e-5)
    assert parity["max_rel_diff"] <= 1e-5 < parity["max_abs_diff"], "float32 at 150 000"
    assert report["max_rmse_increase_pct"] == 5.0
    assert report["torch_rmse"] == pytest.approx(report["variants"]["fp32"]["rmse"], rel=1e-5)
    assert report["torch_r2"] > 0.8
    for name in ("fp32", "int8", "fp16"):
        variant = report["variants"][name]
        assert set(variant) >= {"rmse", "mae", "r2", "rmse_increase_pct", "max_abs_diff_fp32"}
        assert variant["rmse_increase_pct"] <= 5.0
    assert report["variants"]["fp32"]["rmse_increase_pct"] == 0.0


def test_fp16_keeps_raw_inputs_and_the_target_units_in_fp32(regressor):
    """fp16 cannot hold an income of 80 000 or a prediction of 150 000: the graph's ends
    stay fp32 (quantize.float_ends), the MLP between them is fp16."""
    model = onnx.load(str(regressor.variant("fp16")))
    initializers = {i.name: i for i in model.graph.initializer}
    gemm_weights = [n.input[1] for n in model.graph.node if n.op_type == "Gemm"]
    assert {initializers[w].data_type for w in gemm_weights} == {onnx.TensorProto.FLOAT16}
    add = next(n for n in model.graph.node if n.op_type == "Add")  # + target_mean
    (mean,) = [numpy_helper.to_array(initializers[i]) for i in add.input if i in initializers]
    assert mean.dtype == np.float32 and mean == pytest.approx(regressor.meta.target_mean)
    x = awkward_rows(64, 0)
    fp16, fp32 = (
        onnx_tools.session(regressor.variant(p)).run(None, {"features": x})[0]
        for p in ("fp16", "fp32")
    )
    assert np.isfinite(fp16).all()
    np.testing.assert_allclose(fp16, fp32, rtol=2e-3)  # fp16's 11 bits, in the MLP only


def test_int8_is_dynamic_on_the_dense_layers_only(regressor):
    ops = [n.op_type for n in onnx.load(str(regressor.variant("int8"))).graph.node]
    assert "MatMulInteger" in ops and "QuantizeLinear" not in ops
    assert ops[:2] == ["IsNaN", "Where"], "the NaN fill stays float"


class Drifting(torch.nn.Module):
    """Agrees with PyTorch eagerly; the exported graph's predictions are 0.01 % higher,
    0.15 at 150 000: above 1e-4 + 1e-5 * 150 000 = 1.5e-3."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        prediction = self.inner(x)
        return prediction * 1.0001 if torch.compiler.is_exporting() else prediction


def test_regression_parity_fails_naming_the_worst_prediction(regressor, tmp_path):
    out = tmp_path / "onnx"
    with pytest.raises(StageError) as error:
        export_standin(Drifting(regressor.model), "drift", regressor.data_dir, out, FP32_ONLY)
    message = str(error.value)
    assert message.startswith("ONNX parity check failed on 300 test rows: max |diff| ")
    assert "parity_atol 0.0001 + parity_rtol 1e-05 x |value|" in message
    assert "\n" not in message and not out.exists()


def test_regression_tolerance_scales_with_the_value():
    task, params = export_tasks.REGRESSION_TASK, ExportParams(parity_atol=1e-4, parity_rtol=1e-5)

    def judged(reference, got):
        pair = (np.array(reference, np.float32), np.array(got, np.float32))
        return task.parity([pair], params, "rows", len(reference))

    assert judged([150_000.0, 0.0], [150_001.0, 5e-5]).passed  # 1 <= 1.5001; 5e-5 <= 1e-4
    assert not judged([0.0], [2e-4]).passed
    assert not judged([1.0, 2.0], [1.0, np.nan]).passed, "NaN on one side fails"
    assert judged([np.nan], [np.nan]).passed, "the same missing answer on both sides"
    parity = judged([100.0, -10.0], [100.0005, -10.0003])
    assert parity.max_abs_diff == pytest.approx(5e-4, rel=1e-2)
    assert parity.max_rel_diff == pytest.approx(3e-5, rel=1e-2)
    assert parity.to_json() == {
        "rows": 2,
        "max_abs_diff": parity.max_abs_diff,
        "max_rel_diff": parity.max_rel_diff,
        "atol": 1e-4,
        "rtol": 1e-5,
    }


def test_rmse_gate_names_the_variant_its_rmse_fp32s_and_the_limit():
    reports = {
        "fp32": {"rmse": 100.0, "rmse_increase_pct": 0.0},
        "int8": {"rmse": 106.0, "rmse_increase_pct": 6.0},
        "fp16": {"rmse": 100.1, "rmse_increase_pct": 0.1},
    }
    with pytest.raises(StageError) as error:
        variants.check_rmse_increases(reports, max_increase=5.0)
    assert str(error.value) == (
        "test RMSE above fp32's 100 by more than export.max_rmse_increase 5 % (limit 105): "
        "int8 rmse 106 (+6.00 %)"
    )
    variants.check_rmse_increases(reports, max_increase=6.0)
    nan = {**reports, "fp16": {"rmse": float("nan"), "rmse_increase_pct": float("nan")}}
    with pytest.raises(StageError, match="fp16 rmse nan"):
        variants.check_rmse_increases(nan, max_increase=6.0)


def test_the_rmse_gate_runs_in_the_stage(regressor, tmp_path):
    params = ExportParams(variants=("fp32", "fp16"), max_rmse_increase=-1.0)
    with pytest.raises(StageError, match=r"max_rmse_increase -1 % .*: fp32 rmse .*, fp16 rmse"):
        export_standin(regressor.model, "r", regressor.data_dir, tmp_path / "onnx", params)
    assert not (tmp_path / "onnx").exists()


def test_an_image_regressor_takes_the_same_path(image_regressor):
    report = image_regressor.report
    assert (report["kind"], report["task"], report["int8_method"]) == (
        "image",
        "regression",
        "static",
    )
    assert report["parity"]["images"] == 96 and report["parity"]["max_rel_diff"] <= 1e-5
    assert all(v["rmse_increase_pct"] <= 5.0 for v in report["variants"].values())
    model = onnx.load(str(image_regressor.variant("int8")))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8]
    assert [o.name for o in model.graph.output] == ["prediction"]
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    contract = onnx_tools.read_contract(image_regressor.variant("fp16"))
    assert contract.task == "regression" and contract.image.shape == IMAGE_SHAPE
    assert contract.class_names == () and contract.tabular is None


# The model's output shape


class Constant(torch.nn.Module):
    def __init__(self, shape_tail):
        super().__init__()
        self.shape_tail = shape_tail
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.ones((x.shape[0], *self.shape_tail)) * self.scale + TARGET_MEAN


def test_a_regressor_returning_n_by_1_exports_a_prediction_of_n(regressor, tmp_path):
    report = export_standin(Constant((1,)), "c", regressor.data_dir, tmp_path / "o", FP32_ONLY)
    output = onnx.load(str(tmp_path / "o" / "model.onnx")).graph.output
    assert [(o.name, len(dims(o))) for o in output] == [("prediction", 1)]
    assert report["parity"]["max_abs_diff"] == 0.0


@pytest.mark.parametrize(
    ("name", "tail", "message"),
    [
        ("tabular-regression", (2,), r"returns \[2, 2\] for 2 rows; a regression model must "),
        ("tabular-classification", (4,), r"must return \[N, 3\] \(one logit per class\)"),
    ],
)
def test_a_model_of_the_wrong_output_shape_is_refused(name, tail, message, tmp_path):
    shared = shared_tabular_export(name)
    with pytest.raises(StageError, match=message):
        export_standin(Constant(tail), "c", shared.data_dir, tmp_path / "o", FP32_ONLY)
    assert not (tmp_path / "o").exists()


def test_a_series_regressor_takes_the_sequence_path_with_its_length_probes():
    shared = shared_tabular_export("series-regression")
    report = shared.report
    assert (report["kind"], report["task"], report["exporter"]) == (
        "series",
        "regression",
        "dynamo",
    )
    parity = report["parity"]
    assert parity["sequences"] == 72 and parity["max_rel_diff"] <= 1e-5
    assert {(p["length"], p["batch"]) for p in parity["probes"]} == {
        (n, b) for n in (2, 7, 20) for b in (1, 7, 64)
    }
    assert all(
        set(p) == {"length", "batch", "max_abs_diff", "max_rel_diff"} for p in parity["probes"]
    )
    assert report["torch_r2"] > 0.9 and report["max_rmse_increase_pct"] == 5.0
    assert all(v["rmse_increase_pct"] <= 5.0 for v in report["variants"].values())
    model = onnx.load(str(shared.variant("fp16")))
    assert [i.name for i in model.graph.input] == ["series", "mask"]
    assert [(o.name, len(dims(o))) for o in model.graph.output] == [("prediction", 1)]
    contract = onnx_tools.read_contract(shared.variant("int8"))
    assert contract.task == "regression" and contract.sequence.kind == "series"


# The CLI's summary


def test_summary_lines_show_regression_figures(regressor, tmp_path):
    lines = export_tasks.summary_lines(regressor.report, "300 test rows", tmp_path)
    assert lines[0].startswith("exported tabular-regression-standin (opset 18) in ")
    assert "parity on 300 test rows: max |diff| " in lines[0] and ", max relative " in lines[0]
    assert len(lines) == 4 and lines[1].startswith(f"  fp32: {tmp_path / 'model.onnx'} rmse ")
    assert "(+0.00 %, r2 0." in lines[1] and lines[2].startswith("  int8: ")
    assert export._rows(regressor.report) == "300 test rows"


def test_summary_lines_show_classifier_figures(classifier, tmp_path):
    lines = export_tasks.summary_lines(classifier.report, "300 test rows", tmp_path)
    assert "max |logit diff| " in lines[0] and "top-1 agreement 100%" in lines[0]
    assert "accuracy " in lines[3] and " pp, " in lines[3]
