"""The export stage on tiny synthetic data: files, metadata, parity, variants, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from pipeline import export, onnx_tools
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.cli import app
from pipeline.dataset import load_meta
from pipeline.errors import StageError
from pipeline.models import Classifier
from pipeline.params import ExportParams, load_with_overrides
from pipeline.variants import check_accuracy_drops
from serving.contract import KEY_GIT_REVISION, ImagePreprocessing, ModelContract
from tests.pipeline.export_fixtures import CLASS_NAMES, SHAPE, shared_export

PARITY_PARAMS = ExportParams(batch_size=32)


@pytest.fixture(scope="module")
def shared():
    return shared_export()


@pytest.fixture(scope="module")
def torch_model(shared):
    return load_checkpoint(shared.checkpoint).build()


def test_writes_one_self_contained_file_per_variant_and_a_report(shared):
    assert sorted(p.name for p in shared.onnx_dir.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
    ]
    report = json.loads(shared.report_path.read_text())
    assert report["parity"]["images"] == 90
    assert report["parity"]["top1_agreement"] == 1.0
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["parity"]["batch_sizes"] == [1, 7, 64]
    for name in ("fp32", "int8", "fp16"):
        variant = report["variants"][name]
        assert variant["accuracy"] >= 0.9, "the fixture model should have learned the patterns"
        assert variant["accuracy_drop_pp"] <= 1.0
        assert variant["top1_agreement_fp32"] >= 0.97
    assert report["variants"]["fp32"]["accuracy_drop_pp"] == 0.0


def test_fp32_graph_takes_uint8_with_dynamic_batch_and_has_two_outputs(shared):
    model = onnx.load(str(shared.variant("fp32")))
    (images,) = model.graph.input
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value, "batch must stay symbolic"
    assert [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert model.opset_import[0].version == 18
    # Normalisation is in the graph: the raw pixels are cast, scaled and standardised.
    assert [n.op_type for n in model.graph.node[:4]] == ["Cast", "Div", "Sub", "Div"]


def test_metadata_carries_the_contract(shared):
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    meta = load_meta(shared.data_dir)
    assert contract.class_names == CLASS_NAMES
    assert contract.task == "image_classification"
    assert contract.image == ImagePreprocessing("images", "NCHW", SHAPE, "uint8", (0.0, 255.0))
    assert contract.model_name == "seed_cnn" and contract.precision == "fp32"
    assert contract.data_fingerprint == meta.fingerprint
    assert contract.params_hash == shared.report["params_hash"]
    keys = {p.key for p in onnx.load(str(shared.variant("fp32"))).metadata_props}
    assert KEY_GIT_REVISION in keys  # "" outside a git checkout, the commit inside one


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_matches_torch_at_several_batch_sizes(shared, torch_model, batch):
    x = np.random.default_rng(batch).integers(0, 256, (batch, *SHAPE), dtype=np.uint8)
    logits, probabilities = onnx_tools.session(shared.variant("fp32")).run(None, {"images": x})
    expected = torch_model(torch.from_numpy(x)).detach().numpy()
    assert logits.shape == (batch, len(CLASS_NAMES))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["fp32", "int8", "fp16"])
def test_every_variant_passes_the_full_checker_and_keeps_io_types(shared, name):
    path = shared.variant(name)
    onnx.checker.check_model(str(path), full_check=True)
    sess = onnx_tools.session(path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(uint8)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
    assert onnx_tools.read_contract(path).precision == name


def test_int8_is_symmetric_per_channel_qdq(shared):
    model = onnx.load(str(shared.variant("int8")))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert quantize, "expected Q/DQ nodes"
    zero_points = [initializers[n.input[2]] for n in quantize if len(n.input) > 2]
    assert all(np.all(z == 0) for z in zero_points), "TensorRT needs zero points of 0"
    assert all(z.dtype == np.int8 for z in zero_points)
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    weight_scales = [
        initializers[n.input[1]]
        for n in quantize
        if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights
    ]
    assert weight_scales and all(s.size > 1 for s in weight_scales), "per-channel weights"
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert not any(n.input[0] == softmax.output[0] for n in quantize), "probabilities stay float"


def test_fp16_holds_half_precision_weights_and_fp32_preprocessing(shared):
    model = onnx.load(str(shared.variant("fp16")))
    types = {i.name: i.data_type for i in model.graph.initializer}
    weights = {types[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert weights == {onnx.TensorProto.FLOAT16}
    # The normalisation before the first conv stays fp32 (quantize.float_ends).
    stats = {types[n.input[1]] for n in model.graph.node if n.op_type in ("Sub", "Div")}
    assert stats == {onnx.TensorProto.FLOAT}


# Parity


def perturbed_copy(src: Path, dst: Path, delta: float) -> Path:
    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + delta, weight.name))
    onnx.save(model, str(dst))
    return dst


def test_parity_fails_with_figures_for_a_perturbed_onnx(shared, torch_model, tmp_path):
    broken = perturbed_copy(shared.variant("fp32"), tmp_path / "broken.onnx", 0.05)
    x = np.load(shared.data_dir / "test.npz")["x"]
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    parity = export.measure_parity(torch_model, broken, x, PARITY_PARAMS, contract).parity
    assert parity.max_abs_logit_diff > 1e-4
    with pytest.raises(StageError, match=r"parity check failed on 90 test images: max \|logit"):
        parity.require()


class DivergentClassifier(Classifier):
    """Agrees with PyTorch eagerly, but the exported graph computes something else."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = super().forward(pixels)
        if torch.compiler.is_exporting():
            logits = logits * 1.001
        return logits


def test_parity_catches_a_graph_that_diverges_from_torch(shared, tmp_path):
    checkpoint = load_checkpoint(shared.checkpoint)
    model = DivergentClassifier(checkpoint.spec, checkpoint.mean, checkpoint.std)
    model.load_state_dict(checkpoint.state_dict)
    model.eval()
    contract = onnx_tools.read_contract(shared.variant("fp32"))
    export.export_onnx(model, tmp_path / "divergent.onnx", 18, contract)
    x = np.load(shared.data_dir / "test.npz")["x"]
    measured = export.measure_parity(model, tmp_path / "divergent.onnx", x, PARITY_PARAMS, contract)
    with pytest.raises(StageError, match="parity check failed"):
        measured.parity.require()


def test_accuracy_drop_above_the_limit_fails_naming_the_variant():
    variants = {
        "fp32": {"accuracy": 0.98, "accuracy_drop_pp": 0.0},
        "int8": {"accuracy": 0.965, "accuracy_drop_pp": 1.5},
        "fp16": {"accuracy": 0.98, "accuracy_drop_pp": 0.0},
    }
    with pytest.raises(StageError) as error:
        check_accuracy_drops(variants, max_drop=1.0)
    assert "int8 96.50% (+1.50 pp)" in str(error.value) and "fp16" not in str(error.value)
    check_accuracy_drops(variants, max_drop=1.5)


# Bad input: one line, nothing written


def test_checkpoint_of_another_architecture_fails_in_one_line(shared, tmp_path):
    checkpoint = load_checkpoint(shared.checkpoint)
    mlp = type(checkpoint.spec)("mlp", SHAPE, len(CLASS_NAMES), hidden=(16,))
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(type(checkpoint)(**{**checkpoint.__dict__, "spec": mlp}), foreign)
    out = tmp_path / "onnx"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(foreign)]
        + ["--data-dir", str(shared.data_dir), "--out", str(out)]
        + ["--report", str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: checkpoint {foreign} does not fit architecture 'mlp'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt"]


def test_checkpoint_trained_on_other_data_is_refused(shared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shared.data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    with pytest.raises(StageError, match="trained on other data"):
        export.export_model(ExportParams(), shared.checkpoint, data, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def test_unsupported_opset_fails_before_writing(shared, tmp_path):
    with pytest.raises(StageError, match="export.opset must be 17-20"):
        export.export_model(
            ExportParams(opset=21), shared.checkpoint, shared.data_dir, tmp_path / "out", None
        )
    assert list(tmp_path.iterdir()) == []


# CLI


def test_cli_options_override_params_file(shared, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  variants: [fp32, int8]\n  opset: 19\n")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(
        app,
        ["export", "--checkpoint", str(shared.checkpoint), "--data-dir", str(shared.data_dir)]
        + ["--out", str(out), "--report", str(tmp_path / "export.json")]
        + ["--params", str(params), "--variant", "fp32", "--opset", "18"],
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["opset"] == 18 and list(report["variants"]) == ["fp32"]
    assert "parity on 90 test images" in result.output


def test_params_reject_unknown_variant(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  variants: [fp32, int4]\n")
    with pytest.raises(StageError, match=r"export.variants\[1\] must be one of"):
        load_with_overrides("export", ExportParams, params)


def test_contract_round_trips_through_metadata(shared):
    contract = onnx_tools.read_contract(shared.variant("int8"))
    assert ModelContract.from_metadata(contract.to_metadata()) == contract
