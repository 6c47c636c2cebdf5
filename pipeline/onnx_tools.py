"""ONNX helpers shared by the export and engine stages (and the benchmark): no torch here.

Reading a model's contract, writing its metadata, and running it in ONNX Runtime over a
split in batches: images in fixed-size batches, sequences sorted by length and each batch
trimmed to its longest row (padding costs compute, and a row's answer must not depend on it).
Every failure a user can cause (a corrupt, truncated or foreign file) becomes a one-line StageError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError
from serving import denormals
from serving.contract import (
    LOGITS_NAME,
    PREDICTION_NAME,
    REGRESSION,
    SERIES_MASK,
    SERIES_VALUES,
    TEXT_IDS,
    TEXT_MASK,
    ContractError,
    ModelContract,
    Signature,
    TensorSpec,
)

# The export stage's output directory and its file per precision; the engine reads them.
ONNX_DIR = Path("models/onnx")
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}

# ONNX Runtime type strings -> the protocol datatype names the sidecar uses.
ORT_DATATYPES = {
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(bool)": "BOOL",
}
# A sequence model's two inputs per kind: the padded values (ids or series) and the mask.
SEQUENCE_INPUTS = {"text": (TEXT_IDS, TEXT_MASK), "series": (SERIES_VALUES, SERIES_MASK)}

Feeds = Mapping[str, np.ndarray]


def load_model(path: Path) -> Any:
    """The ModelProto at ``path`` (self-contained), or a StageError naming what is wrong."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise StageError(f"ONNX model {path} not found; run the export stage first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(
            f"{path} is not a readable ONNX model (corrupt or truncated?): {first}"
        ) from None
    if not model.graph.node:
        raise StageError(f"{path} is not a readable ONNX model (corrupt or truncated?): no graph")
    return model


def read_contract(path: Path, model: Any | None = None) -> ModelContract:
    """The tensorferry contract carried in the model's metadata_props: an image, sequence
    or tabular model's, a classifier or a regressor."""
    model = load_model(path) if model is None else model
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    try:
        contract = ModelContract.from_metadata(metadata, source=str(path))
    except ContractError as exc:
        raise StageError(str(exc)) from None
    if contract.image is None and contract.sequence is None and contract.tabular is None:
        raise StageError(
            f"{path} is a {contract.task} model without an image, sequence or tabular "
            "input; the pipeline's stages build those"
        )
    return contract


def set_metadata(model: Any, values: Mapping[str, str]) -> None:
    """Set ``values`` in ``model.metadata_props``, replacing keys already there (no duplicates:
    onnx.checker rejects a model with a key twice)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        model.metadata_props.add(key=key, value=value)


def session(path: Path, threads: int = 0, flush_denormals: bool = False) -> Any:
    """A CPU ONNX Runtime session; ``threads`` intra-op threads (0 = ONNX Runtime's choice).
    ``flush_denormals`` covers its pool threads; a thread calling run flushes itself."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: a stage prints one line, not ORT's chatter
    with denormals.for_session(options, flush_denormals):
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind types for every failure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(f"{path} does not load in ONNX Runtime: {first}") from None


def run_logits(sess: Any, x: np.ndarray | Feeds, batch_size: int) -> np.ndarray:
    """The first output (float32: logits, or a regressor's prediction) for every row of
    ``x`` (a one-input model's rows, or every input of a sequence model by name), batch
    by batch."""
    feeds = x if isinstance(x, Mapping) else {sess.get_inputs()[0].name: x}
    rows = len(next(iter(feeds.values())))
    outputs = [
        sess.run(
            [sess.get_outputs()[0].name],
            {name: value[start : start + batch_size] for name, value in feeds.items()},
        )[0]
        for start in range(0, rows, batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)


def sequence_feeds(kind: str, x: np.ndarray, lengths: np.ndarray, steps: int) -> Feeds:
    """A sequence model's inputs for rows ``x`` cut to ``steps`` (lengths clipped to it)."""
    values, mask = SEQUENCE_INPUTS[kind]
    clipped = np.minimum(lengths, steps)
    return {
        values: np.ascontiguousarray(x[..., :steps]),
        mask: (np.arange(steps)[None, :] < clipped[:, None]).astype(np.int64),
    }


def by_length(
    run: Callable[[Feeds], np.ndarray],
    kind: str,
    x: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Logits for every row, in ``x``'s order, from batches of similar length: rows sorted
    by length, each batch trimmed to its longest row."""
    order = np.argsort(lengths, kind="stable")
    pieces = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        steps = int(lengths[index].max())
        pieces.append(run(sequence_feeds(kind, x[index], lengths[index], steps)))
    logits = np.concatenate(pieces).astype(np.float32)
    restored = np.empty_like(logits)
    restored[order] = logits
    return restored


def signature(sess: Any) -> Signature:
    """The session's tensors as the server reads them (for contract.check_io)."""
    specs = io_specs(sess)

    def tensors(key: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in specs[key])

    return Signature.from_graph(tensors("inputs"), tensors("outputs"))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of images whose top-1 class matches the reference's."""
    return float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean())


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² (1 - SSE / SST; 0 for a constant target) in float64."""
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    errors = predictions - targets
    total = float(((targets - targets.mean()) ** 2).sum())
    r2 = 1.0 - float((errors**2).sum()) / total if total > 0 else 0.0
    return {
        "rmse": float(np.sqrt((errors**2).mean())),
        "mae": float(np.abs(errors).mean()),
        "r2": r2,
    }


def percent_increase(value: float, reference: float) -> float:
    """How many percent ``value`` lies above ``reference`` (a perfect reference: 0 or inf)."""
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return (value - reference) / reference * 100


def primary_output(contract: ModelContract) -> str:
    """The output metrics read: a regressor's prediction, else the logits."""
    return PREDICTION_NAME if contract.task == REGRESSION else LOGITS_NAME


def row_noun(contract: ModelContract) -> str:
    """What one row of the model's input is called in reports."""
    if contract.sequence is not None:
        return "sequences"
    return "images" if contract.image is not None else "rows"


def io_specs(sess: Any) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as the sidecar lists them; dynamic dimensions are -1."""

    def spec(node: Any) -> dict[str, Any]:
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        return {"name": node.name, "dtype": ORT_DATATYPES.get(node.type, node.type), "shape": shape}

    return {
        "inputs": [spec(n) for n in sess.get_inputs()],
        "outputs": [spec(n) for n in sess.get_outputs()],
    }
