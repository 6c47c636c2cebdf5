"""Reduced-precision variants of the fp32 ONNX model: int8 (static Q/DQ, or dynamic for
sequence and tabular models) and fp16.

All keep the contract's I/O (uint8 ``images``, int64 ids/masks, float32 series or tabular
features in; float32 ``logits`` and ``probabilities``, or ``prediction``, out), so a
server feeds every variant the same way, and all keep the graph's ends in fp32
(``float_ends``): the raw inputs' preprocessing and what follows the last heavy layer.
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
# The layers that hold a model's weights and cost its time (with an embedding's Gather);
# what comes before the first and after the last stays in float (float_ends).
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "GRU", "LSTM", "RNN"})


def calibration_sample(x: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """A seeded sample of ``samples`` rows (all of them when the split is smaller)."""
    if samples < 1:
        raise StageError(f"params: export.calibration_samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(x), size=min(samples, len(x)), replace=False))
    return x[index]


def image_batches(calibration: np.ndarray, name: str) -> list[dict[str, np.ndarray]]:
    """The calibration rows (images, tabular features) as feeds of CALIBRATION_BATCH rows
    of input ``name``."""
    return [
        {name: calibration[i : i + CALIBRATION_BATCH]}
        for i in range(0, len(calibration), CALIBRATION_BATCH)
    ]


def quantize_int8(src: Path, dst: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Static int8 quantization in Q/DQ form, calibrated with MinMax on the feeds ``batches``.

    Per-channel weights and symmetric activations and weights (zero point 0): TensorRT
    only accepts symmetric Q/DQ, and a Q/DQ model is what TensorRT 11 needs for int8.
    Softmax stays in float: quantizing ``probabilities`` to 8 bits would cost resolution
    and buys no speed, and so do the rest of the graph's ends (``float_ends``): a tabular
    input's NaN would make its MinMax range NaN, and a regressor's prediction in target
    units needs more than 255 steps.
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
        # Nodes are picked by name after the optimiser has run, which may fuse and rename.
        model = onnx.load(str(pre))
        name_nodes(model.graph)
        onnx.save(model, str(pre))
        softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=sorted({*softmax, *float_ends(model.graph)}),
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
    """fp16 weights and activations between the first and the last heavy layer, the
    inputs' and outputs' types kept; the graph's ends stay fp32 (``float_ends``).

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
    name_nodes(graph)
    output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    blocked = {
        n.name
        for n in graph.node
        if (n.op_type == "Cast" and _casts_to_float(n)) or any(i in output_types for i in n.input)
    }
    blocked |= set(float_ends(graph))
    kept = _read_only_by(graph, blocked)
    with _quiet():
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=sorted(blocked)
        )
    _restore_output_types(half, output_types)
    _restore_initializers(half.graph, kept)
    _drop_round_trips(half.graph, blocked)
    onnx.save(half, str(dst))


def _drop_round_trips(graph: Any, blocked: set[str]) -> None:
    """Let fp32 nodes read each other's outputs directly.

    The converter wraps every blocked node in casts, to fp16 after it and back to fp32
    before the next, and removes such a pair only when one cast follows the other alone:
    a value read by several fp32 nodes (the NaN-filled features, read by each column's
    slice) went through fp16 on the way and an income of 80 000 came out infinite.
    """
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    renamed = {}
    for cast in (n for n in graph.node if n.op_type == "Cast" and _casts_to_float(n)):
        half = producer.get(cast.input[0])
        origin = None if half is None or half.op_type != "Cast" else producer.get(half.input[0])
        if origin is not None and origin.name in blocked and cast.output[0] not in outputs:
            renamed[cast.output[0]] = half.input[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    _drop_unread_casts(graph)


def _drop_unread_casts(graph: Any) -> None:
    """Remove casts whose output nobody reads (and their value_info), until none is left."""
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {o.name for o in graph.output}
        unread = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & read]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    produced = {name for node in graph.node for name in node.output}
    for info in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(info)


def _read_only_by(graph: Any, nodes: set[str]) -> dict[str, Any]:
    """Copies of the float initializers that only ``nodes`` read."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    return {
        i.name: type(i).FromString(i.SerializeToString())
        for i in graph.initializer
        if i.data_type == 1 and i.name in readers and readers[i.name] <= nodes
    }


def _restore_initializers(graph: Any, kept: dict[str, Any]) -> None:
    """Put back the fp32 initializers of nodes kept in fp32, and drop their casts.

    onnxconverter-common 1.16 halves every initializer, also those only blocked nodes read
    (the cast it puts in front of a blocked node renames the input it checks), and clamps
    them to +-1e4 first: a target mean of 150 000 came back as 10 000.
    """
    for initializer in graph.initializer:
        if initializer.name in kept:
            initializer.CopyFrom(kept[initializer.name])
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in kept]
    renamed = {n.output[0]: n.input[0] for n in casts if _casts_to_float(n)}
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    for node in [n for n in casts if n.output[0] in renamed]:
        graph.node.remove(node)


def float_ends(graph: Any) -> list[str]:
    """Names of the nodes before the first heavy layer (HEAVY_OPS, or an embedding's
    Gather) and after the last one: what reduced-precision variants keep in float.

    Those ends see raw inputs and produce what a server returns, in their own units: a
    tabular income of 80 000 or a regressor's price of 150 000 overflows fp16 (largest
    value 65 504) and loses its last digits below that, and int8's 255 steps over a
    prediction's range cost more than the model's error. They are a few element-wise ops
    (NaN fill, standardisation, one-hot, softmax, ``* target_std + target_mean``), cheap
    in fp32; nodes must be in topological order, as onnx.checker requires.
    """
    nodes = list(graph.node)
    weights = {i.name for i in graph.initializer if i.data_type == 1}  # float tensors
    heavy = [
        n.op_type in HEAVY_OPS or (n.op_type == "Gather" and n.input[0] in weights) for n in nodes
    ]
    after = _reaches(nodes, heavy, reverse=False)
    before = _reaches(nodes, heavy, reverse=True)
    return [n.name for n, a, b in zip(nodes, after, before, strict=True) if not (a and b)]


def _reaches(nodes: list[Any], heavy: list[bool], reverse: bool) -> list[bool]:
    """Per node: it is heavy or reads (``reverse``: feeds) a heavy node's output, at any
    distance."""
    found = list(heavy)
    marked: set[str] = set()  # tensors downstream (reverse: upstream) of a heavy node
    order = range(len(nodes) - 1, -1, -1) if reverse else range(len(nodes))
    for i in order:
        near, far = (
            (nodes[i].output, nodes[i].input) if reverse else (nodes[i].input, nodes[i].output)
        )
        found[i] = found[i] or any(name in marked for name in near)
        if found[i]:
            marked.update(far)
    return found


def name_nodes(graph: Any) -> None:
    """Give unnamed nodes a unique name: the converter and the quantizer select by name."""
    taken = {n.name for n in graph.node}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"tensorferry_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


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
