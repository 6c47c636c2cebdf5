"""The artifact contract between the pipeline and the server.

The export stage writes these keys into the ONNX model's ``metadata_props`` and the
engine stage mirrors them into the engine sidecar (``<engine>.json``); the server reads
them back. Both sides import this module, so a key is spelled in exactly one place.
The module must stay free of torch and onnx: it runs on serving images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from serving.protocol import TensorSpec

INPUT_NAME = "images"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"

# metadata_props keys. Values are strings; lists and objects are JSON-encoded.
KEY_MODEL_NAME = "tensorferry.model_name"
KEY_CLASS_NAMES = "tensorferry.class_names"  # JSON list of str
KEY_INPUT_NAME = "tensorferry.input_name"
KEY_INPUT_LAYOUT = "tensorferry.input_layout"  # "NCHW"
KEY_INPUT_SHAPE = "tensorferry.input_shape"  # JSON [C, H, W], batch excluded
KEY_INPUT_DTYPE = "tensorferry.input_dtype"  # "uint8"
KEY_VALUE_RANGE = "tensorferry.value_range"  # JSON [0, 255]
KEY_PRECISION = "tensorferry.precision"  # "fp32" | "fp16" | "int8"
KEY_DATA_FINGERPRINT = "tensorferry.data_fingerprint"
KEY_PARAMS_HASH = "tensorferry.params_hash"
KEY_GIT_REVISION = "tensorferry.git_revision"  # "" when unknown

REQUIRED_KEYS = (
    KEY_MODEL_NAME,
    KEY_CLASS_NAMES,
    KEY_INPUT_NAME,
    KEY_INPUT_LAYOUT,
    KEY_INPUT_SHAPE,
    KEY_INPUT_DTYPE,
    KEY_VALUE_RANGE,
    KEY_PRECISION,
)


class ContractError(ValueError):
    """An artifact lacks or garbles the metadata the server needs."""


@dataclass(frozen=True)
class ModelContract:
    """What a server needs to know to feed a model and label its answers."""

    model_name: str
    class_names: tuple[str, ...]
    input_name: str
    input_layout: str
    input_shape: tuple[int, int, int]
    input_dtype: str
    value_range: tuple[float, float]
    precision: str
    data_fingerprint: str = ""
    params_hash: str = ""
    git_revision: str = ""

    def to_metadata(self) -> dict[str, str]:
        return {
            KEY_MODEL_NAME: self.model_name,
            KEY_CLASS_NAMES: json.dumps(list(self.class_names)),
            KEY_INPUT_NAME: self.input_name,
            KEY_INPUT_LAYOUT: self.input_layout,
            KEY_INPUT_SHAPE: json.dumps(list(self.input_shape)),
            KEY_INPUT_DTYPE: self.input_dtype,
            KEY_VALUE_RANGE: json.dumps(list(self.value_range)),
            KEY_PRECISION: self.precision,
            KEY_DATA_FINGERPRINT: self.data_fingerprint,
            KEY_PARAMS_HASH: self.params_hash,
            KEY_GIT_REVISION: self.git_revision,
        }

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "model") -> ModelContract:
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
        if missing:
            raise ContractError(
                f"{source} lacks tensorferry metadata {', '.join(missing)}; "
                "export it with `tensorferry export`"
            )
        try:
            shape = tuple(int(v) for v in json.loads(metadata[KEY_INPUT_SHAPE]))
            value_range = tuple(float(v) for v in json.loads(metadata[KEY_VALUE_RANGE]))
            class_names = tuple(str(v) for v in json.loads(metadata[KEY_CLASS_NAMES]))
        except (ValueError, TypeError) as exc:
            raise ContractError(f"{source} has malformed tensorferry metadata: {exc}") from exc
        if len(shape) != 3 or len(value_range) != 2 or not class_names:
            raise ContractError(
                f"{source} has malformed tensorferry metadata: input_shape {list(shape)}, "
                f"value_range {list(value_range)}, {len(class_names)} class names"
            )
        return cls(
            model_name=metadata[KEY_MODEL_NAME],
            class_names=class_names,
            input_name=metadata[KEY_INPUT_NAME],
            input_layout=metadata[KEY_INPUT_LAYOUT],
            input_shape=shape,  # type: ignore[arg-type]
            input_dtype=metadata[KEY_INPUT_DTYPE],
            value_range=value_range,  # type: ignore[arg-type]
            precision=metadata[KEY_PRECISION],
            data_fingerprint=metadata.get(KEY_DATA_FINGERPRINT, ""),
            params_hash=metadata.get(KEY_PARAMS_HASH, ""),
            git_revision=metadata.get(KEY_GIT_REVISION, ""),
        )


def check_io(contract: ModelContract, inputs: tuple[TensorSpec, ...], source: str) -> None:
    """The graph must take what the contract says: one uint8 [N, C, H, W] input, batch dynamic."""
    want = TensorSpec(
        contract.input_name, contract.input_dtype.upper(), (-1, *contract.input_shape)
    )
    if len(inputs) != 1 or inputs[0] != want:
        got = [f"{i.name} {i.datatype} {list(i.shape)}" for i in inputs]
        raise ContractError(
            f"{source} inputs {got} do not match its metadata "
            f"({want.name} {want.datatype} {list(want.shape)} with a dynamic batch)"
        )


# The engine sidecar (<engine file>.json) is a JSON object with these top-level keys:
#   "format": "tensorrt" | "onnxruntime"
#   "metadata": the metadata_props above (ModelContract.to_metadata())
#   "onnx_sha256": hash of the ONNX file the engine was built from
#   "precision", "inputs"/"outputs": [{"name", "dtype", "shape"}]
#   onnxruntime only: "flush_denormals": bool, what the accuracy run used (serving/denormals.py)
#   TensorRT only: "tensorrt_version", "gpu_name", "compute_capability" ("8.6"),
#                  "profile": {"min": [..], "opt": [..], "max": [..]}
SIDECAR_SUFFIX = ".json"
