"""Models no tensorferry stage wrote, as users bring them: onnx.helper graphs and plain
``torch.onnx.export`` files, with no tensorferry metadata at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# OIP datatype -> ONNX element type: every type the server serves.
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _tensor(name: str, datatype: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ONNX_TYPES[datatype], shape)


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list = ()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _axis(name: str, value: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], np.int64), name)


def two_inputs_three_outputs(path: Path) -> Path:
    """features FP32 [N, 3] and counts INT64 [N, 2] -> total FP32 [N, 1], doubled FP32
    [N, 3], next_counts INT64 [N, 2]."""
    node = helper.make_node
    nodes = [
        node("ReduceSum", ["features", "axis1"], ["total"], keepdims=1),
        node("Mul", ["features", "two"], ["doubled"]),
        node("Add", ["counts", "one"], ["next_counts"]),
    ]
    inits = [
        _axis("axis1", 1),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ]
    inputs = [_tensor("features", "FP32", ["N", 3]), _tensor("counts", "INT64", ["N", 2])]
    outputs = [
        _tensor("total", "FP32", ["N", 1]),
        _tensor("doubled", "FP32", ["N", 3]),
        _tensor("next_counts", "INT64", ["N", 2]),
    ]
    return _save(path, nodes, inputs, outputs, inits)


def every_datatype(path: Path) -> Path:
    """in_<TYPE> [N, 2] -> out_<TYPE> = Identity, for every datatype."""
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in ONNX_TYPES]
    inputs = [_tensor(f"in_{t}", t, ["N", 2]) for t in ONNX_TYPES]
    outputs = [_tensor(f"out_{t}", t, ["N", 2]) for t in ONNX_TYPES]
    return _save(path, nodes, inputs, outputs)


def no_batch_dim(path: Path) -> Path:
    """x FP32 [3, 4] -> column_sums FP32 [4]: nothing to batch on."""
    nodes = [helper.make_node("ReduceSum", ["x", "axis0"], ["column_sums"], keepdims=0)]
    inputs, outputs = [_tensor("x", "FP32", [3, 4])], [_tensor("column_sums", "FP32", [4])]
    return _save(path, nodes, inputs, outputs, [_axis("axis0", 0)])


def dynamic_length(path: Path) -> Path:
    """x FP32 [N, T] -> total FP32 [N, 1] and doubled FP32 [N, T]: T varies by request."""
    node = helper.make_node
    nodes = [
        node("ReduceSum", ["x", "axis1"], ["total"], keepdims=1),
        node("Mul", ["x", "two"], ["doubled"]),
    ]
    inits = [_axis("axis1", 1), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    inputs = [_tensor("x", "FP32", ["N", "T"])]
    outputs = [_tensor("total", "FP32", ["N", 1]), _tensor("doubled", "FP32", ["N", "T"])]
    return _save(path, nodes, inputs, outputs, inits)


def strings(path: Path) -> Path:
    """text BYTES [N, 1] -> echo BYTES [N, 1] and is_spam BOOL [N, 1] (text == "spam")."""
    node = helper.make_node
    nodes = [
        node("Identity", ["text"], ["echo"]),
        node("Equal", ["text", "spam"], ["is_spam"]),
    ]
    spam = helper.make_tensor("spam", TensorProto.STRING, [1], [b"spam"])
    inputs = [_tensor("text", "BYTES", ["N", 1])]
    outputs = [_tensor("echo", "BYTES", ["N", 1]), _tensor("is_spam", "BOOL", ["N", 1])]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, [spam])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def torch_cnn(path: Path) -> Path:
    """A small CNN taking float [N, 1, 8, 8], exported as a user would: torch.onnx.export."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 8, 8),),
        str(path),
        input_names=["pixels"],
        output_names=["scores"],
        dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


def torch_gru(path: Path) -> Path:
    """A GRU text classifier: ids INT64 [N, T] and mask INT64 [N, T] -> logits FP32 [N, 2]."""
    import torch
    from torch import nn

    class GruClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            states, _ = self.gru(self.embed(ids))
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return self.head(pooled)

    torch.manual_seed(0)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=2, max=512)
    example = (torch.zeros(2, 5, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64))
    torch.onnx.export(
        GruClassifier().eval(),
        example,
        str(path),
        input_names=["ids", "mask"],
        output_names=["logits"],
        dynamic_shapes={"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path
