"""Tabular ONNX models carrying the tabular contract, built with onnx.helper (no torch).

Each takes ``features`` FP32 [N, F] as the pipeline's TabularPreprocess does: NaN filled
with the column's fill (IsNaN/Where, impute only), numeric columns standardised, each
categorical code one-hot encoded by Equal against 0..K-1 (so -1, unseen, is all zeros),
then a linear head: ``prediction`` FP32 [N] for the regressor, ``logits`` and
``probabilities`` [N, K] for the classifier. ``expected`` is the same in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.contract import (
    CATEGORICAL,
    NUMERIC,
    REGRESSION,
    TABULAR_CLASSIFICATION,
    ModelContract,
    TabularColumn,
    TabularPreprocessing,
)

COLUMNS = (
    TabularColumn("age", NUMERIC),
    TabularColumn("city", CATEGORICAL, ("berlin", "paris", "rome")),
    TabularColumn("income", NUMERIC),
    TabularColumn("rooms", CATEGORICAL, ("1", "2", "3", "4")),  # numbers as strings
)
MEAN, STD = {"age": 40.0, "income": 3000.0}, {"age": 12.0, "income": 900.0}
# impute: the numeric median, the most frequent categorical code
FILL = {"age": 38.0, "city": 1.0, "income": 2800.0, "rooms": 2.0}
CLASSES = ("low", "mid", "high")


def contract(task: str, impute: bool, name: str) -> ModelContract:
    return ModelContract(
        model_name=name,
        task=task,
        class_names=CLASSES if task == TABULAR_CLASSIFICATION else (),
        tabular=TabularPreprocessing("features", COLUMNS, impute),
        precision="fp32",
    )


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _encode_nodes(impute: bool) -> tuple[list, list]:
    """Nodes from ``features`` to ``encoded`` [N, D], and their initializers."""
    node = helper.make_node
    source = "features"
    nodes, inits = [], []
    if impute:
        fill = np.array([FILL[c.name] for c in COLUMNS], np.float32)
        inits.append(_const("fill", fill))
        nodes += [
            node("IsNaN", ["features"], ["missing"]),
            node("Where", ["missing", "fill", "features"], ["filled"]),
        ]
        source = "filled"
    parts = []
    for i, column in enumerate(COLUMNS):
        inits.append(_const(f"at_{i}", np.array([i], np.int64)))
        nodes.append(node("Gather", [source, f"at_{i}"], [f"col_{i}"], axis=1))  # [N, 1]
        if column.type == NUMERIC:
            inits += [
                _const(f"mean_{i}", np.array(MEAN[column.name], np.float32)),
                _const(f"std_{i}", np.array(STD[column.name], np.float32)),
            ]
            nodes += [
                node("Sub", [f"col_{i}", f"mean_{i}"], [f"centred_{i}"]),
                node("Div", [f"centred_{i}", f"std_{i}"], [f"part_{i}"]),
            ]
        else:
            codes = np.arange(len(column.categories), dtype=np.float32)
            inits.append(_const(f"codes_{i}", codes))
            nodes += [
                node("Equal", [f"col_{i}", f"codes_{i}"], [f"hot_{i}"]),  # [N, K] bool
                node("Cast", [f"hot_{i}"], [f"part_{i}"], to=TensorProto.FLOAT),
            ]
        parts.append(f"part_{i}")
    nodes.append(node("Concat", parts, ["encoded"], axis=1))
    return nodes, inits


def weights(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = sum(1 if c.type == NUMERIC else len(c.categories) for c in COLUMNS)
    rng = np.random.default_rng(seed)
    outputs = len(CLASSES) if task == TABULAR_CLASSIFICATION else 1
    w = rng.standard_normal((width, outputs)).astype(np.float32)
    return w, rng.standard_normal(outputs).astype(np.float32)


def build(path: Path, task: str, impute: bool, name: str) -> Path:
    """A regressor (task REGRESSION) or classifier over COLUMNS, saved with its contract."""
    nodes, inits = _encode_nodes(impute)
    w, b = weights(task)
    batch = "batch"
    if task == REGRESSION:
        inits += [_const("w", w[:, 0]), _const("b", b)]
        nodes += [
            helper.make_node("MatMul", ["encoded", "w"], ["weighted"]),  # [N]
            helper.make_node("Add", ["weighted", "b"], ["prediction"]),
        ]
        outputs = [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, [batch])]
    else:
        inits += [_const("w", w), _const("b", b)]
        nodes += [
            helper.make_node("Gemm", ["encoded", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ]
        outputs = [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, len(CLASSES)])
            for n in ("logits", "probabilities")
        ]
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, len(COLUMNS)])
    graph = helper.make_graph(nodes, name, [features], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, contract(task, impute, name).to_metadata())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def expected(task: str, impute: bool, features: np.ndarray) -> np.ndarray:
    """The model's answer in numpy: prediction [N], or probabilities [N, K]."""
    x = features.astype(np.float64)
    if impute:
        fill = np.array([FILL[c.name] for c in COLUMNS])
        x = np.where(np.isnan(x), fill, x)
    parts = []
    for i, column in enumerate(COLUMNS):
        if column.type == NUMERIC:
            parts.append(((x[:, i] - MEAN[column.name]) / STD[column.name])[:, None])
        else:
            parts.append(x[:, i : i + 1] == np.arange(len(column.categories)))
    encoded = np.concatenate(parts, axis=1).astype(np.float64)
    w, b = weights(task)
    scores = encoded @ w + b
    if task == REGRESSION:
        return scores[:, 0]
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
