"""Reduced-precision variants of the fp32 ONNX model: int8 (static Q/DQ, or dynamic for
sequence models) and fp16.

All keep the contract's I/O (uint8 ``images``, or int64 ids/masks and float32 series, in;
float32 ``logits`` and ``probabilities`` out), so a server feeds every variant the same way.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError, step

CALIBRATION_BATCH = 64


def calibration_sample(x: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """A seeded sample of ``samples`` images (all of them when the split is smaller)."""
    if samples < 1:
        raise StageError(f"params: export.calibration_samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(x), size=min(samples, len(x)), replace=False))
    return x[index]


def image_batches(calibration: np.ndarray, name: str) -> list[dict[str, np.ndarray]]:
    """The calibration images as feeds of CALIBRATION_BATCH images of input ``name``."""
    return [
        {name: calibration[i : i + CALIBRATION_BATCH]}
        for i in range(0, len(calibration), CALIBRATION_BATCH)
    ]


def quantize_int8(src: Path, dst: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Static int8 quantization in Q/DQ form, calibrated with MinMax on the feeds ``batches``.

    Per-channel weights and symmetric activations and weights (zero point 0): TensorRT
    only accepts symmetric Q/DQ, and a Q/DQ model is what TensorRT 11 needs for int8.
    Softmax stays in float: quantizing ``probabilities`` to 8 bits would cost resolution
    and buys no speed.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> Mapping[str, np.ndarray] | None:
            return next(self._batches, None)

    import onnx

    model = onnx.load(str(src))
    softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        # ONNX's own shape inference, which quant_pre_process runs after its optimiser, is
        # enough here: the symbolic dims (batch, length) are named by the exporter.
        # onnxruntime's symbolic inference can't type a Reduce{Max,Min,L2,...} at opset 18+,
        # where axes became an input (no handler, and its single-node fallback drops the
        # axes initializer; microsoft/onnxruntime#32376), so resnet's global max pool left
        # its Flatten Reshape untyped and _infer_Reshape raised a TypeError. seed_cnn and
        # mlp quantize to byte-identical graphs either way.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=softmax,
            # Float biases: TensorRT fuses them itself and has no int32 DequantizeLinear.
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
            },
        )


def quantize_int8_dynamic(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization: int8 weights, activations quantized per batch at run time.

    No calibration, and what ONNX Runtime's CPU kernels run fastest for the MatMul/Gemm of
    sequence models (benchmarks/bench_sequence_int8.py). Only MatMul and Gemm: its
    DynamicQuantizeLSTM would change the LSTM's numerics and it has no GRU kernel, and a
    quantized Gather (embedding) saves memory, not time. Not a Q/DQ graph, so TensorRT
    cannot build it (export.sequence_int8=static gives one it can).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,
            weight_type=QuantType.QInt8,
        )


@step("ReLU folding")
def fold_relus_for_cpu(model: Any) -> int:
    """Rewrite ``X -> Q/DQ -> Relu -> Q(s, 0)/DQ`` into ``X -> Q(s * 127/255, -128)/DQ``.

    TensorRT needs symmetric activations, but with a zero point of 0 ONNX Runtime cannot
    fold a ReLU into the QLinearConv/QGemm before it: every ReLU then costs a dequantize,
    a float ReLU and a requantize over the whole activation (~1.35x instead of ~2x over
    fp32 at batch 64 on our CPU). A zero point of -128 clamps negatives to exactly 0, so
    the quantizer does the ReLU's work, over the same range [0, 127 s] at twice the
    resolution. Scales and zero points are shared by name, so the MaxPool and Reshape
    Q/DQ pairs downstream follow. Returns the number of ReLUs folded; edits in place.
    """
    from onnx import numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    # Nodes by position: protobuf wrappers are not guaranteed to keep their identity.
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    initializers = {i.name: i for i in graph.initializer}
    dropped: set[int] = set()
    requantized: set[str] = set()
    for index in [i for i, n in enumerate(nodes) if n.op_type == "Relu"]:
        chain = _relu_chain(index, nodes, producer, consumers, initializers)
        if chain is None:
            continue
        quant, dequant, after = chain
        graph.node[after].input[0] = nodes[quant].input[0]
        dropped |= {quant, dequant, index}
        scale_name, zero_name = nodes[after].input[1], nodes[after].input[2]
        if scale_name not in requantized:
            scale = numpy_helper.to_array(initializers[scale_name]) * (127 / 255)
            zero = np.full_like(numpy_helper.to_array(initializers[zero_name]), -128)
            initializers[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
            initializers[zero_name].CopyFrom(numpy_helper.from_array(zero, zero_name))
            requantized.add(scale_name)
    for index in sorted(dropped, reverse=True):
        del graph.node[index]
    _prune_initializers(graph)
    return len(dropped) // 3


def _relu_chain(
    relu: int,
    nodes: list[Any],
    producer: dict[str, int],
    consumers: dict[str, list[int]],
    initializers: dict[str, Any],
) -> tuple[int, int, int] | None:
    """Positions of (Q, DQ, Q-after) around the ReLU at ``relu`` when safe to fold, else None."""
    from onnx import numpy_helper

    dequant = producer.get(nodes[relu].input[0])
    quant = producer.get(nodes[dequant].input[0]) if dequant is not None else None
    after = consumers.get(nodes[relu].output[0], [])
    if (
        quant is None
        or (nodes[quant].op_type, nodes[dequant].op_type) != ("QuantizeLinear", "DequantizeLinear")
        or len(after) != 1
        or nodes[after[0]].op_type != "QuantizeLinear"
        or len(nodes[after[0]].input) < 3
        or nodes[after[0]].input[2] not in initializers
        or consumers.get(nodes[dequant].output[0]) != [relu]
        or consumers.get(nodes[quant].output[0]) != [dequant]
    ):
        return None
    zero = numpy_helper.to_array(initializers[nodes[after[0]].input[2]])
    if zero.dtype != np.int8 or np.any(zero != 0):
        return None
    return quant, dequant, after[0]


def _prune_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)


@step("fp16 conversion")
def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations, the inputs' and outputs' types kept.

    onnxconverter-common mistypes two spots of our graphs (seen with 1.16): a Cast to float
    (the input's uint8 -> float, a mask's int64 -> float) keeps ``to=FLOAT`` while its
    output is declared fp16, and Softmax, which reads the ``logits`` graph output, gets an
    fp16 output while it computes fp32. onnx.checker's full check rejects both. So those
    nodes stay in fp32 (the converter inserts the casts), and the graph outputs are
    restored to their types. Ops without an fp16 CPU kernel need no block list: ONNX
    Runtime's CPU provider casts around them itself (seen with 1.32 on an fp16 GRU).
    """
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    graph = model.graph
    output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    blocked = [
        n.name
        for n in graph.node
        if (n.op_type == "Cast" and _casts_to_float(n)) or any(i in output_types for i in n.input)
    ]
    with _quiet():
        half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    _restore_output_types(half, output_types)
    onnx.save(half, str(dst))


def _casts_to_float(node: Any) -> bool:
    import onnx

    return any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)


def _restore_output_types(model: Any, output_types: dict[str, int]) -> None:
    for output in model.graph.output:
        output.type.tensor_type.elem_type = output_types[output.name]
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in output_types:
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = output_types[node.output[0]]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizer's and converter's progress logging and warnings."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
