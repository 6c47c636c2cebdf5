"""Every model in the registry goes through every stage: prepare -> train -> export -> engine.

Parametrized over ``pipeline.models.REGISTRY``, so a model added there is covered without
touching this file. The data is the shared ``prepared_dir`` (the prepare stage run on
three classes of 20x20 bars); one epoch at lr 1e-2 takes today's networks to 100% there,
with top-2 logit margins far above the int8 error, so the default accuracy gate holds.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.engine import build_engine
from pipeline.export import export_model
from pipeline.models import REGISTRY
from pipeline.params import EngineParams, ExportParams, ModelParams, TrainParams
from pipeline.train import train

QUICK = TrainParams(epochs=1, batch_size=16, lr=1e-2)


def op_count(path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_model_goes_through_every_stage(name, prepared_dir, tmp_path):
    checkpoint, onnx_dir, engine_dir = tmp_path / "ckpt.pt", tmp_path / "onnx", tmp_path / "engine"
    history = train(
        ModelParams(name=name, width=8, hidden=(32,)),
        QUICK,
        prepared_dir,
        checkpoint,
        tmp_path / "live",
    )
    assert len(history) == 1 and checkpoint.is_file()

    exported = export_model(
        ExportParams(), checkpoint, prepared_dir, onnx_dir, tmp_path / "export.json"
    )
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
    ]
    assert json.loads((tmp_path / "export.json").read_text())["model"] == name
    assert exported["parity"]["top1_agreement"] == 1.0
    variants = exported["variants"]
    assert set(variants) == {"fp32", "int8", "fp16"}
    assert variants["fp32"]["accuracy"] >= 0.9, "one epoch should learn the bars"
    assert all(v["accuracy_drop_pp"] <= 1.0 for v in variants.values())

    int8 = onnx_dir / "model.int8.onnx"
    assert op_count(int8, "QuantizeLinear") > 0 and op_count(int8, "DequantizeLinear") > 0
    x = np.load(prepared_dir / "test.npz")["x"]
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    logits, probabilities = sess.run(None, {"images": x})
    assert logits.shape == (len(x), 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)

    engine = build_engine(EngineParams(precision="int8"), onnx_dir, engine_dir, prepared_dir, None)
    assert sorted(p.name for p in engine_dir.iterdir()) == [
        "model.optimized.onnx",
        "model.optimized.onnx.json",
    ]
    assert engine["source"] == "model.int8.onnx" and engine["images"] == len(x)
    assert engine["accuracy_drop_pp"] <= 1.0 and engine["top1_agreement_fp32"] >= 0.99
    folded = json.loads((engine_dir / "model.optimized.onnx.json").read_text())[
        "relus_folded_into_quantization"
    ]
    relus = op_count(onnx_dir / "model.onnx", "Relu")
    # A ReLU folds when one Q reads it (all of ours do); one feeding two ops would stay.
    assert (0 < folded <= relus) if relus else folded == 0
