"""The artifact contract between the pipeline and the server, version 2.

A served model has a **signature** (its input and output tensors, read from the graph or
the TensorRT engine, never from metadata) and may carry a **contract**: task metadata
that tensorferry's export stage writes into the ONNX ``metadata_props`` and the engine
stage mirrors into the engine sidecar (``<engine>.json``). A model without any
``tensorferry.*`` key is served from its signature alone, as Triton auto-completes a
config. Both sides import this module, so each key is spelled in exactly one place; it
must stay free of torch and onnx, as it runs on serving images.

Version 1 (no ``tensorferry.contract_version`` key, written before the contract had a
task) described one uint8 NCHW image input; it is read as an image classifier, so models
exported then keep serving unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONTRACT_VERSION = 2
INPUT_NAME = "images"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"

# What a model does; the server offers task-specific routes (/v1/classify) only for the
# task they fit.
IMAGE_CLASSIFICATION = "image_classification"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TABULAR_CLASSIFICATION = "tabular_classification"
# Any input kind; the output PREDICTION_NAME holds one value per row in the target's units
# (the graph undoes the training-time standardisation), and class_names is empty.
REGRESSION = "regression"
TASKS = (IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, TABULAR_CLASSIFICATION, REGRESSION, "none")
CLASSIFICATION_TASKS = (IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, TABULAR_CLASSIFICATION)
PREDICTION_NAME = "prediction"  # regression: float32 [N]

# metadata_props keys. Values are strings; lists and objects are JSON-encoded.
KEY_CONTRACT_VERSION = "tensorferry.contract_version"  # "2"
KEY_MODEL_NAME = "tensorferry.model_name"
KEY_TASK = "tensorferry.task"  # one of TASKS
KEY_CLASS_NAMES = "tensorferry.class_names"  # JSON list of str; [] when the task has none
KEY_PREPROCESSING = "tensorferry.preprocessing"  # JSON object, see Preprocessing
KEY_PRECISION = "tensorferry.precision"  # "fp32" | "fp16" | "int8"
KEY_DATA_FINGERPRINT = "tensorferry.data_fingerprint"
KEY_PARAMS_HASH = "tensorferry.params_hash"
KEY_GIT_REVISION = "tensorferry.git_revision"  # "" when unknown
# Text models: the Hugging Face tokenizers JSON (tokenizer.json) the ids come from, so the
# model file alone is enough to classify raw text.
KEY_TOKENIZER = "tensorferry.tokenizer"
# Version 1's image keys, read only.
V1_KEYS = (
    "tensorferry.input_name",
    "tensorferry.input_layout",  # "NCHW"
    "tensorferry.input_shape",  # JSON [C, H, W], batch excluded
    "tensorferry.input_dtype",  # "uint8"
    "tensorferry.value_range",  # JSON [0, 255]
)
PREFIX = "tensorferry."


class ContractError(ValueError):
    """An artifact lacks or garbles the metadata the server needs."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, OIP datatype and shape (-1: a dynamic dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class Signature:
    """A model's tensors. ``batching``: the first dim of every tensor is the batch, so
    requests may merge; otherwise requests send full shapes (Triton's max_batch_size 0)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: bool

    @classmethod
    def from_graph(cls, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        """A batching model iff the first dim is dynamic in every input and output."""
        tensors = inputs + outputs
        return cls(inputs, outputs, all(s.shape and s.shape[0] == -1 for s in tensors))

    @property
    def shapes_vary(self) -> bool:
        """Whether an input has a dynamic dim besides the batch: requests may differ in it."""
        return any(-1 in spec.shape[1 if self.batching else 0 :] for spec in self.inputs)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def describe(self) -> str:
        batching = "batching on the first dim" if self.batching else "no batch dim"
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        return f"inputs {ins}; outputs {outs}; {batching}"


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the model's input: decoded to ``layout`` [C, H, W] ``dtype``
    pixels in ``value_range`` (normalisation is inside the graph)."""

    input_name: str
    layout: str
    shape: tuple[int, int, int]  # C, H, W
    dtype: str
    value_range: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "layout": self.layout,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "value_range": list(self.value_range),
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ImagePreprocessing:
        shape = tuple(int(v) for v in entry["shape"])
        value_range = tuple(float(v) for v in entry["value_range"])
        if len(shape) != 3 or len(value_range) != 2:
            raise ValueError(f"image shape {list(shape)} / value_range {list(value_range)}")
        return cls(
            str(entry["input"]),
            str(entry["layout"]),
            shape,  # type: ignore[arg-type]
            str(entry["dtype"]),
            value_range,  # type: ignore[arg-type]
        )


FEATURES_NAME = "features"  # tabular models' one input, float32 [N, F]
NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class TabularColumn:
    name: str
    type: str  # NUMERIC or CATEGORICAL
    categories: tuple[str, ...] = ()  # categorical: the value of code i is categories[i]


@dataclass(frozen=True)
class TabularPreprocessing:
    """How a record becomes the model's input: one float32 [N, F] tensor, a value per
    column in ``columns`` order. Numeric columns take raw values (standardisation is in
    the graph); categorical ones the category's code (its index in ``categories``), and
    any other code, -1 by convention, for a category the model never saw, which the graph
    one-hot encodes as all zeros. NaN is a missing value: with ``impute`` the graph fills
    it with the train split's median or most frequent category; without, the model was
    trained on complete rows and its answer for one is undefined (NaN)."""

    input_name: str
    columns: tuple[TabularColumn, ...]
    impute: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "columns": [
                {"name": c.name, "type": c.type}
                | ({"categories": list(c.categories)} if c.type == CATEGORICAL else {})
                for c in self.columns
            ],
            "missing": "impute" if self.impute else "refuse",
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> TabularPreprocessing:
        columns = tuple(
            TabularColumn(
                str(c["name"]), str(c["type"]), tuple(str(v) for v in c.get("categories", ()))
            )
            for c in entry["columns"]
        )
        unknown = [c.type for c in columns if c.type not in (NUMERIC, CATEGORICAL)]
        if unknown or not columns:
            raise ValueError(f"tabular columns must be numeric or categorical, got {unknown}")
        return cls(str(entry["input"]), columns, entry.get("missing") == "impute")


# The exported sequence models' inputs: HF-style token ids and mask, or raw series values.
TEXT_IDS, TEXT_MASK = "input_ids", "attention_mask"
SERIES_VALUES, SERIES_MASK = "series", "mask"
SEQUENCE_KINDS = ("text", "series")


@dataclass(frozen=True)
class PaddedInput:
    """An input with a sequence axis (batch included: [N, L] -> 1, [N, C, T] -> 2) that
    is filled with ``pad_value`` past each row's length."""

    name: str
    axis: int
    pad_value: float


@dataclass(frozen=True)
class SequencePreprocessing:
    """How a sequence becomes the model's inputs: every ``padded`` input right-padded
    along its axis, ``mask_input`` holding 1 for real steps and 0 for padding (int64).
    The model's answer for a row does not depend on how far it is padded, so requests of
    different lengths may share a batch padded to the longest.

    Text: ``tokenizer`` (tokenizer.json) turns a string into ids, truncated to
    ``max_length``. Series: the graph standardises each channel with ``mean``/``std``
    itself (recorded for clients that want to know); values are sent raw.
    """

    kind: str  # one of SEQUENCE_KINDS
    padded: tuple[PaddedInput, ...]
    mask_input: str
    min_length: int
    max_length: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    tokenizer: str | None = None

    def padded_input(self, name: str) -> PaddedInput | None:
        return next((p for p in self.padded if p.name == name), None)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "inputs": {
                p.name: {"sequence_axis": p.axis, "pad_value": p.pad_value} for p in self.padded
            },
            "mask": self.mask_input,
            "min_length": self.min_length,
            "max_length": self.max_length,
        }
        if self.kind == "series":
            entry |= {"mean": list(self.mean), "std": list(self.std)}
        return entry

    @classmethod
    def from_json(
        cls, kind: str, entry: Mapping[str, Any], tokenizer: str | None
    ) -> SequencePreprocessing:
        padded = tuple(
            PaddedInput(str(name), int(spec["sequence_axis"]), float(spec["pad_value"]))
            for name, spec in entry["inputs"].items()
        )
        mask = str(entry["mask"])
        if not any(p.name == mask for p in padded):
            raise ValueError(f"mask input {mask!r} is not among the padded inputs")
        if kind == "text" and tokenizer is None:
            raise ValueError(f"a text model needs {KEY_TOKENIZER}")
        return cls(
            kind=kind,
            padded=padded,
            mask_input=mask,
            min_length=int(entry["min_length"]),
            max_length=int(entry["max_length"]),
            mean=tuple(float(v) for v in entry.get("mean", ())),
            std=tuple(float(v) for v in entry.get("std", ())),
            tokenizer=tokenizer,
        )


@dataclass(frozen=True)
class ModelContract:
    """Task metadata a tensorferry artifact carries beside its signature."""

    model_name: str
    task: str = "none"
    class_names: tuple[str, ...] = ()
    image: ImagePreprocessing | None = None  # image models only
    sequence: SequencePreprocessing | None = None  # text and series models only
    tabular: TabularPreprocessing | None = None  # tabular models only
    precision: str = ""
    data_fingerprint: str = ""
    params_hash: str = ""
    git_revision: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ContractError(f"task {self.task!r} is not one of {', '.join(TASKS)}")

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing JSON object, keyed by kind ("image", "text", "series" or
        "tabular")."""
        if self.image:
            return {"image": self.image.to_json()}
        if self.sequence:
            return {self.sequence.kind: self.sequence.to_json()}
        if self.tabular:
            return {"tabular": self.tabular.to_json()}
        return {}

    def to_metadata(self) -> dict[str, str]:
        metadata = {
            KEY_CONTRACT_VERSION: str(CONTRACT_VERSION),
            KEY_MODEL_NAME: self.model_name,
            KEY_TASK: self.task,
            KEY_CLASS_NAMES: json.dumps(list(self.class_names)),
            KEY_PREPROCESSING: json.dumps(self.preprocessing()),
            KEY_PRECISION: self.precision,
            KEY_DATA_FINGERPRINT: self.data_fingerprint,
            KEY_PARAMS_HASH: self.params_hash,
            KEY_GIT_REVISION: self.git_revision,
        }
        if self.sequence and self.sequence.tokenizer is not None:
            metadata[KEY_TOKENIZER] = self.sequence.tokenizer
        return metadata

    def to_json(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "task": self.task,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing(),
            "precision": self.precision,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "model") -> ModelContract:
        """The contract in ``metadata``; ContractError naming what is missing or garbled."""
        version = metadata.get(KEY_CONTRACT_VERSION)
        if version is None:
            return _from_v1(metadata, source)
        if version != str(CONTRACT_VERSION):
            raise ContractError(
                f"{source} has tensorferry contract version {version!r}; this server reads "
                f"versions 1 and {CONTRACT_VERSION}"
            )
        _require(metadata, (KEY_MODEL_NAME, KEY_TASK), source)
        try:
            preprocessing = json.loads(metadata.get(KEY_PREPROCESSING, "{}"))
            image, tabular = preprocessing.get("image"), preprocessing.get("tabular")
            return cls(
                model_name=metadata[KEY_MODEL_NAME],
                task=metadata[KEY_TASK],
                class_names=_class_names(metadata),
                image=None if image is None else ImagePreprocessing.from_json(image),
                sequence=_sequence(preprocessing, metadata.get(KEY_TOKENIZER)),
                tabular=None if tabular is None else TabularPreprocessing.from_json(tabular),
                **_provenance(metadata),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ContractError(f"{source} has malformed tensorferry metadata: {exc}") from None


def read_contract(metadata: Mapping[str, str], source: str) -> ModelContract | None:
    """The contract, or None for a model without any tensorferry key (a bare graph)."""
    if not any(key.startswith(PREFIX) for key in metadata):
        return None
    return ModelContract.from_metadata(metadata, source)


def _sequence(
    preprocessing: Mapping[str, Any], tokenizer: str | None
) -> SequencePreprocessing | None:
    kinds = [kind for kind in SEQUENCE_KINDS if kind in preprocessing]
    if len(kinds) > 1:
        raise ValueError(f"preprocessing names both {' and '.join(kinds)}")
    if not kinds:
        return None
    return SequencePreprocessing.from_json(kinds[0], preprocessing[kinds[0]], tokenizer)


def _require(metadata: Mapping[str, str], keys: tuple[str, ...], source: str) -> None:
    missing = [key for key in keys if key not in metadata]
    if missing and not any(key.startswith(PREFIX) for key in metadata):
        raise ContractError(
            f"{source} lacks tensorferry metadata {', '.join(missing)}; "
            "export it with `tensorferry export`"
        )
    if missing:
        raise ContractError(
            f"{source} has partial tensorferry metadata: it lacks {', '.join(missing)}; "
            "re-export it with `tensorferry export`, or strip the tensorferry.* keys to "
            "serve it from its graph alone"
        )


def _class_names(metadata: Mapping[str, str]) -> tuple[str, ...]:
    names = json.loads(metadata.get(KEY_CLASS_NAMES, "[]"))
    if not isinstance(names, list):
        raise ValueError(f"class_names must be a JSON list, not {names!r}")
    return tuple(str(v) for v in names)


def _provenance(metadata: Mapping[str, str]) -> dict[str, str]:
    return {
        "precision": metadata.get(KEY_PRECISION, ""),
        "data_fingerprint": metadata.get(KEY_DATA_FINGERPRINT, ""),
        "params_hash": metadata.get(KEY_PARAMS_HASH, ""),
        "git_revision": metadata.get(KEY_GIT_REVISION, ""),
    }


def _from_v1(metadata: Mapping[str, str], source: str) -> ModelContract:
    _require(metadata, (KEY_MODEL_NAME, KEY_CLASS_NAMES, *V1_KEYS, KEY_PRECISION), source)
    name, layout, shape, dtype, value_range = (metadata[key] for key in V1_KEYS)
    try:
        image = ImagePreprocessing.from_json(
            {
                "input": name,
                "layout": layout,
                "shape": json.loads(shape),
                "dtype": dtype,
                "value_range": json.loads(value_range),
            }
        )
        class_names = _class_names(metadata)
    except (ValueError, TypeError) as exc:
        raise ContractError(f"{source} has malformed tensorferry metadata: {exc}") from None
    if not class_names:
        raise ContractError(f"{source} has malformed tensorferry metadata: no class names")
    return ModelContract(
        model_name=metadata[KEY_MODEL_NAME],
        task=IMAGE_CLASSIFICATION,
        class_names=class_names,
        image=image,
        **_provenance(metadata),
    )


def check_io(contract: ModelContract | None, signature: Signature, source: str) -> None:
    """The graph must take what the contract's preprocessing produces.

    An image model's input is uint8 [N, C, H, W] with a dynamic batch; a sequence model
    batches, and each padded input has a dynamic sequence axis; a tabular model's input
    is float32 [N, F] with a dynamic batch and F its columns; a regressor has an output
    PREDICTION_NAME; other contracts constrain nothing the graph does not already say.
    """
    if contract is None:
        return
    if contract.sequence is not None:
        _check_sequence_io(contract.sequence, signature, source)
    if contract.task == REGRESSION and not any(
        s.name == PREDICTION_NAME for s in signature.outputs
    ):
        raise ContractError(f"{source} is a regression model without a {PREDICTION_NAME!r} output")
    want = _fixed_input(contract)
    if want is None:
        return
    if signature.input(want.name) != want or not signature.batching:
        got = [s.describe() for s in signature.inputs]
        raise ContractError(
            f"{source} inputs {got} do not match its metadata "
            f"({want.describe()} with a dynamic batch)"
        )


def _fixed_input(contract: ModelContract) -> TensorSpec | None:
    """The one input an image or tabular contract implies, batch dim dynamic."""
    if contract.image is not None:
        image = contract.image
        return TensorSpec(image.input_name, image.dtype.upper(), (-1, *image.shape))
    if contract.tabular is not None:
        tabular = contract.tabular
        return TensorSpec(tabular.input_name, "FP32", (-1, len(tabular.columns)))
    return None


def _check_sequence_io(sequence: SequencePreprocessing, signature: Signature, source: str) -> None:
    for padded in sequence.padded:
        spec = signature.input(padded.name)
        if spec is None or len(spec.shape) <= padded.axis or spec.shape[padded.axis] != -1:
            got = "no such input" if spec is None else spec.describe()
            raise ContractError(
                f"{source} metadata pads input {padded.name!r} along axis {padded.axis}, "
                f"but the graph has {got} (the axis must be dynamic)"
            )
    if not signature.batching:
        raise ContractError(f"{source} is a sequence model without a dynamic batch dim")


# The engine sidecar (<engine file>.json) is a JSON object with these top-level keys:
#   "format": "tensorrt" | "onnxruntime"
#   "metadata": the metadata_props above (ModelContract.to_metadata())
#   "onnx_sha256": hash of the ONNX file the engine was built from
#   "precision", "inputs"/"outputs": [{"name", "dtype", "shape"}]
#   onnxruntime only: "flush_denormals": bool, what the accuracy run used (serving/denormals.py)
#   TensorRT only: "tensorrt_version", "gpu_name", "compute_capability" ("8.6"),
#                  "profile": {"min": [..], "opt": [..], "max": [..]} (images: the input's
#                  shapes); sequence models: {<input name>: {"min", "opt", "max"}} per input
# A TensorRT plan without a sidecar is served from the engine's own I/O and profile, with
# no host check before deserializing (TensorRT's own error says what mismatched).
SIDECAR_SUFFIX = ".json"
