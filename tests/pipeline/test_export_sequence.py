"""The export stage on sequence models (text, series): graph I/O with a dynamic batch and
length, the contract, the parity gate and its length probes, the exporter fallback, and the
int8/fp16 variants."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline import export_sequence, export_tasks, onnx_tools, quantize, variants
from pipeline.dataset import TOKENIZER_FILE, load_meta, load_split
from pipeline.errors import StageError
from pipeline.params import ExportParams
from serving.contract import ModelContract, PaddedInput, check_io
from tests.pipeline.export_sequence_fixtures import (
    CLASS_NAMES,
    SERIES_SHAPE,
    TEXT_LENGTH,
    VOCAB,
    export_standin,
    make_prepared,
    shared_sequence_export,
    standin,
    train,
)


@pytest.fixture(scope="module")
def text():
    return shared_sequence_export("text")


@pytest.fixture(scope="module")
def series():
    return shared_sequence_export("series")


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_text_export_writes_variants_tokenizer_and_a_report(text):
    assert sorted(p.name for p in text.onnx_dir.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
        TOKENIZER_FILE,
    ]
    tokenizer = (text.data_dir / TOKENIZER_FILE).read_text()
    assert (text.onnx_dir / TOKENIZER_FILE).read_text() == tokenizer
    report = text.report
    assert report["kind"] == "text" and report["exporter"] == "dynamo"
    assert report["dynamo_problem"] is None
    assert report["int8_method"] == "dynamic"
    parity = report["parity"]
    assert parity["sequences"] == 72 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["atol"] == 1e-4
    probes = {(p["length"], p["batch"]) for p in parity["probes"]}
    assert probes == {(n, b) for n in (2, 7, TEXT_LENGTH) for b in (1, 7, 64)}
    assert all(p["top1_agreement"] == 1.0 for p in parity["probes"])
    for name in ("fp32", "int8", "fp16"):
        variant = report["variants"][name]
        assert variant["accuracy"] >= 0.9, "the stand-in should have learned the groups"
        assert variant["accuracy_drop_pp"] <= 1.0
    json.dumps(report)


@pytest.mark.parametrize(
    ("kind", "names", "types"),
    [
        ("text", ["input_ids", "attention_mask"], [onnx.TensorProto.INT64] * 2),
        ("series", ["series", "mask"], [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]),
    ],
)
def test_graph_inputs_share_a_dynamic_batch_and_length(kind, names, types):
    model = onnx.load(str(shared_sequence_export(kind).variant("fp32")))
    assert [i.name for i in model.graph.input] == names
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == types
    values, mask = (dims(i) for i in model.graph.input)
    assert isinstance(values[0], str) and isinstance(values[-1], str), values
    assert values[0] == mask[0] and values[-1] == mask[1], "one batch and one length symbol"
    if kind == "series":
        assert values[1] == SERIES_SHAPE[0]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert model.opset_import[0].version == 18


def test_text_contract_has_padded_inputs_lengths_and_the_tokenizer(text):
    contract = onnx_tools.read_contract(text.variant("fp32"))
    meta = load_meta(text.data_dir)
    assert contract.task == "sequence_classification" and contract.image is None
    assert contract.class_names == CLASS_NAMES and contract.model_name == "text_standin"
    sequence = contract.sequence
    assert sequence.kind == "text" and sequence.mask_input == "attention_mask"
    assert sequence.padded == (
        PaddedInput("input_ids", 1, 0.0),
        PaddedInput("attention_mask", 1, 0.0),
    )
    assert (sequence.min_length, sequence.max_length) == (meta.length_stats["min"], TEXT_LENGTH)
    assert sequence.tokenizer == (text.data_dir / TOKENIZER_FILE).read_text()
    assert contract.data_fingerprint == meta.fingerprint
    # The server's own check on the graph it would load.
    sess = onnx_tools.session(text.variant("fp32"))
    check_io(contract, onnx_tools.signature(sess), "model.onnx")


def test_series_contract_carries_the_standardisation(series):
    sequence = onnx_tools.read_contract(series.variant("int8")).sequence
    meta = load_meta(series.data_dir)
    assert sequence.kind == "series" and sequence.tokenizer is None
    assert sequence.padded == (PaddedInput("series", 2, 0.0), PaddedInput("mask", 1, 0.0))
    assert (sequence.mean, sequence.std) == (meta.mean, meta.std)
    assert sequence.max_length == SERIES_SHAPE[1]
    contract = onnx_tools.read_contract(series.variant("fp32"))
    assert ModelContract.from_metadata(contract.to_metadata()) == contract


@pytest.mark.parametrize("kind", ["text", "series"])
@pytest.mark.parametrize("name", ["fp32", "int8", "fp16"])
def test_every_variant_checks_keeps_io_types_and_ignores_padding(kind, name):
    shared = shared_sequence_export(kind)
    path = shared.variant(name)
    onnx.checker.check_model(str(path), full_check=True)
    sess = onnx_tools.session(path)
    want = ["tensor(int64)"] * 2 if kind == "text" else ["tensor(float)", "tensor(int64)"]
    assert [i.type for i in sess.get_inputs()] == want
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
    assert onnx_tools.read_contract(path).precision == name
    test = load_split("test", shared.data_dir)
    rows = np.argsort(test.lengths)[:8]  # the shortest rows: the most padding
    steps = test.x.shape[-1]
    padded = onnx_tools.sequence_feeds(kind, test.x[rows], test.lengths[rows], steps)
    longest = int(test.lengths[rows].max())
    assert longest < steps - 4
    short = onnx_tools.sequence_feeds(kind, test.x[rows], test.lengths[rows], longest)
    full, trimmed = (sess.run(["logits"], dict(f))[0] for f in (padded, short))
    np.testing.assert_allclose(full, trimmed, atol=1e-4 if name == "fp32" else 5e-2)


def test_int8_dynamic_quantizes_the_matmuls(text):
    ops = {n.op_type for n in onnx.load(str(text.variant("int8"))).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}, ops
    assert "QuantizeLinear" not in ops


# The exporter fallback and the parity gate


class DivergesUnderDynamo(torch.nn.Module):
    """Agrees with PyTorch eagerly and in the legacy exporter's graph, not in dynamo's."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, mask):
        logits = self.inner(ids, mask)
        return logits * 1.01 if torch.compiler.is_exporting() else logits


def test_auto_falls_back_to_legacy_when_the_dynamo_graph_is_wrong(text, tmp_path):
    params = ExportParams(variants=("fp32",))
    model = DivergesUnderDynamo(text.model).eval()
    report = export_standin(model, "text", text.data_dir, tmp_path / "auto", params)
    assert report["exporter"] == "legacy"
    assert report["dynamo_problem"] == "differs from PyTorch at length 2"
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4
    with pytest.raises(StageError, match="parity check failed on 72 test sequences"):
        params = ExportParams(variants=("fp32",), exporter="dynamo")
        export_standin(model, "text", text.data_dir, tmp_path / "dynamo", params)
    assert not (tmp_path / "dynamo").exists()


def test_a_bidirectional_gru_exports_with_auto_and_runs_in_fp16(text, tmp_path):
    """torch 2.13's dynamo bakes a bidirectional GRU's length in some runs (not all: it
    depends on what the process exported before); auto must end with a passing graph."""
    model = train(standin("text", load_meta(text.data_dir), "bigru"), text.data_dir, steps=40)
    params = ExportParams(variants=("fp32", "fp16"))
    report = export_standin(model, "bigru", text.data_dir, tmp_path / "onnx", params)
    assert report["exporter"] in ("dynamo", "legacy")
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4
    fp16 = onnx.load(str(tmp_path / "onnx" / "model.fp16.onnx"))
    initializers = {i.name: i.data_type for i in fp16.graph.initializer}
    gru = next(n for n in fp16.graph.node if n.op_type == "GRU")
    # fp16 weights; ONNX Runtime's CPU provider casts around a GRU it has no fp16 kernel for.
    assert [initializers[name] for name in gru.input[1:4]] == [onnx.TensorProto.FLOAT16] * 3
    assert report["variants"]["fp16"]["accuracy_drop_pp"] <= 1.0


def static_length_export(model, meta, path):
    """A legacy export whose length is fixed: what a baked-in length looks like to ORT."""
    module = export_tasks.CLASSIFICATION.module(model)
    example = export_sequence.example_inputs(meta, meta.input_shape[-1])
    buffer = io.BytesIO()
    names = ["input_ids", "attention_mask"]
    with variants.quiet_exporter():
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=["logits", "probabilities"],
            dynamic_axes={name: {0: "batch"} for name in names},
        )
    path.write_bytes(buffer.getvalue())
    return path


def test_a_graph_with_a_baked_length_fails_the_gate_naming_the_probe(text, tmp_path):
    meta = load_meta(text.data_dir)
    baked = static_length_export(text.model, meta, tmp_path / "baked.onnx")
    test = load_split("test", text.data_dir)
    with pytest.raises(StageError, match=r"at sequence length \d+, batch \d+: the length may be"):
        export_sequence.measure_parity(text.model, baked, "text", test, ExportParams())
    # At the full length it runs: only the probes at other lengths can catch it.
    full = onnx_tools.sequence_feeds("text", test.x, test.lengths, TEXT_LENGTH)
    runner = export_sequence.onnx_runner(baked)
    assert runner(full).shape == (72, 3)
    with pytest.raises(StageError, match="fails in ONNX Runtime at sequence length 7, batch 64"):
        runner(onnx_tools.sequence_feeds("text", test.x[:64], test.lengths[:64], 7))


def test_parity_fails_with_figures_for_a_perturbed_graph(text, tmp_path):
    model = onnx.load(str(text.variant("fp32")))
    weight = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == VOCAB)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.05, weight.name))
    onnx.save(model, str(tmp_path / "perturbed.onnx"))
    test = load_split("test", text.data_dir)
    params = ExportParams(batch_size=32)
    measured = export_sequence.measure_parity(
        text.model, tmp_path / "perturbed.onnx", "text", test, params
    )
    with pytest.raises(
        StageError, match=r"failed on 72 test sequences: max \|logit diff\| .*; worst probe: "
    ):
        measured.parity.require()


def test_probe_lengths_stay_within_the_maximum():
    assert export_sequence.probe_lengths(16) == (2, 7, 16)
    assert export_sequence.probe_lengths(5) == (2, 5)


# Static int8 and bad input


def test_static_int8_is_symmetric_qdq_and_passes_the_gate(series, tmp_path):
    params = ExportParams(
        variants=("fp32", "int8"), sequence_int8="static", exporter="legacy", calibration_samples=64
    )
    report = export_standin(series.model, "series", series.data_dir, tmp_path / "onnx", params)
    assert report["exporter"] == "legacy" and report["int8_method"] == "static"
    assert report["variants"]["int8"]["accuracy_drop_pp"] <= 1.0
    model = onnx.load(str(tmp_path / "onnx" / "model.int8.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [
        initializers[n.input[2]]
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]
    assert zero_points and all(np.all(z == 0) for z in zero_points), "TensorRT's symmetric Q/DQ"


def test_calibration_feeds_are_trimmed_batches_of_the_sample(series):
    train_split = load_split("train", series.data_dir)
    params = ExportParams(calibration_samples=100)
    batches = export_sequence.calibration_feeds(train_split, "series", params)
    assert sum(len(b["mask"]) for b in batches) == 100
    assert len(batches) == -(-100 // quantize.CALIBRATION_BATCH)
    for batch in batches:
        assert batch["series"].shape[-1] == batch["mask"].shape[1] == batch["mask"].sum(1).max()


def test_text_data_without_a_tokenizer_is_refused(tmp_path):
    meta = make_prepared(tmp_path / "data", "text")
    (tmp_path / "data" / TOKENIZER_FILE).unlink()
    with pytest.raises(StageError, match=r"tokenizer.json not found; rerun the prepare stage"):
        export_sequence.preprocessing(meta, tmp_path / "data")
