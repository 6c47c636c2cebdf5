"""Typed, frozen views of ``params.yaml``: one dataclass per section, one strict loader.

The dataclass defaults are the defaults: ``params.yaml`` repeats them so that `dvc params
diff` and experiments show every value, and a test keeps the two (and the README's params
reference) equal, so a stage run without a params file behaves as `dvc repro` does.

The loader rejects unknown keys and wrong types and names the offending key, so a typo
in ``params.yaml`` fails the stage instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.errors import StageError

DEFAULT_PARAMS = Path("params.yaml")
DATA_SOURCES = ("digits", "cifar10", "imagefolder", "text", "series", "tabular")
MODEL_NAMES = ("seed_cnn", "resnet", "mlp", "gru", "lstm", "transformer", "cnn1d")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DataParams:
    # one of DATA_SOURCES, or "package.module:loader" (pipeline/user_data.py)
    source: str = "digits"
    path: str | None = None  # archive (cifar10), root directory (imagefolder), file or folder
    image_size: int | None = None  # square resize; None keeps the source's own size
    channels: Literal[1, 3] | None = None  # None keeps the source's own channel count
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # used only when the source has no test split
    max_per_class: int | None = None  # cap per class and split, for quick runs
    seed: int = 0
    text_columns: tuple[str, ...] = ("text",)  # text: joined with " " (e.g. title, body)
    label_column: str = "label"  # text: column (or JSON key) of the class name
    vocab_size: int = 8000  # text: BPE vocabulary, [PAD] and [UNK] included
    max_length: int = 64  # text: tokens per row; longer texts are truncated
    lowercase: bool = True  # text: also strips accents
    # series: a classification set bundled with aeon, e.g. GunPoint; tabular: a set bundled
    # with scikit-learn (wine, breast_cancer, iris, diabetes)
    dataset: str | None = None
    # tabular files: the feature columns (None: every column but label_column), which of
    # them are categorical (one-hot encoded; the rest must be numeric), and what a file's
    # target is (None: classification; a bundled set or a user loader says its own)
    feature_columns: tuple[str, ...] | None = None
    categorical_columns: tuple[str, ...] = ()
    task: Literal["classification", "regression"] | None = None
    missing: Literal["refuse", "impute"] = "refuse"  # tabular: NaN / empty cells
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # user loader's, verbatim

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES and not is_import_path(self.source):
            choices = ", ".join(repr(s) for s in DATA_SOURCES)
            raise StageError(
                f"params: data.source must be one of {choices} or 'package.module:loader', "
                f"got {self.source!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelParams:
    # seed_cnn, resnet: images; mlp: images and tabular; gru, lstm, transformer, cnn1d: text
    # and series; or "package.module:factory", a user's model (pipeline/user_model.py)
    name: str = "seed_cnn"
    # resnet: channels of the first stage; gru/lstm: hidden size; transformer: model dims;
    # cnn1d: a quarter of the first conv's channels; text: also the embedding size
    width: int = 32
    hidden: tuple[int, ...] = (256, 128)  # mlp: hidden layer sizes (their count is its depth)
    layers: int = 2  # gru/lstm: stacked RNN layers; transformer: encoder blocks
    bidirectional: bool = True  # gru/lstm: add a backward direction
    dropout: float = 0.1  # sequence models and mlp: dropout rate
    heads: int = 4  # transformer: attention heads (width must be a multiple)
    batch_norm: bool = True  # mlp: BatchNorm1d after each hidden layer
    # A user factory's own settings: the one untyped section, passed through verbatim
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES and not is_import_path(self.name):
            choices = ", ".join(repr(s) for s in MODEL_NAMES)
            raise StageError(
                f"params: model.name must be one of {choices} or 'package.module:factory', "
                f"got {self.name!r}"
            )


@dataclasses.dataclass(frozen=True)
class TrainParams:
    epochs: int = 20
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    label_smoothing: float = 0.0
    # auto: cross-entropy for classification, mse for regression; huber: on standardised
    # targets with delta 1 (one train-split standard deviation)
    loss: Literal["auto", "cross_entropy", "mse", "huber"] = "auto"
    augment: bool = True  # images only: random translation by up to 2 pixels
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256


def is_import_path(value: str) -> bool:
    """``package.module:attribute``, how a user's loader or model factory is named."""
    module, sep, attribute = value.partition(":")
    parts = module.split(".")
    return bool(sep) and all(p.isidentifier() for p in parts) and attribute.isidentifier()


def load_params(section: str, cls: type[T], path: Path = DEFAULT_PARAMS) -> T:
    """Load one section of ``params.yaml`` into ``cls``, strictly."""
    import yaml

    if not path.is_file():
        raise StageError(f"params file {path} not found")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise StageError(f"params file {path} must be a mapping of sections")
    return from_mapping(cls, document.get(section) or {}, prefix=section)


def load_with_overrides(
    section: str, cls: type[T], params_file: Path | None, **overrides: Any
) -> T:
    """A section for a CLI command: from ``params_file`` (or ./params.yaml when it exists,
    else the defaults), then every override that is not None, all strictly checked."""
    path = DEFAULT_PARAMS if params_file is None else params_file
    use_file = params_file is not None or path.is_file()
    params = load_params(section, cls, path) if use_file else cls()
    given = {k: v for k, v in overrides.items() if v is not None}
    return from_mapping(cls, {**as_dict(params), **given}, prefix=section)


def from_mapping(cls: type[T], values: Any, prefix: str) -> T:
    """Build ``cls`` from a mapping, naming the first unknown key or mistyped value."""
    if not isinstance(values, dict):
        raise StageError(f"params: {prefix} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StageError(
            f"params: unknown key {prefix}.{unknown[0]} (known keys: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    converted = {
        name: _coerce(value, hints[name], f"{prefix}.{name}") for name, value in values.items()
    }
    return cls(**converted)


def as_dict(params: Any) -> dict[str, Any]:
    """Plain-data form of a params dataclass (for checkpoints and reports)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()
    }


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise StageError(f"params: {key} must be one of {choices}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise StageError(f"params: {key} must be a mapping, got {value!r}")
        return dict(value)  # untyped by design: the user's code reads it
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise StageError(f"params: {key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: type, key: str) -> Any:
    # bool is an int subclass in Python, but `epochs: true` is a typo, not a number.
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise StageError(f"params: {key} must be {hint.__name__}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExportParams:
    # 17-20: ONNX Runtime static int8 quantization fails at opset >= 21, and torch's dynamo
    # exporter emits 18 natively (17 goes through the version converter).
    opset: int = 18
    variants: tuple[Literal["fp32", "int8", "fp16"], ...] = ("fp32", "int8", "fp16")
    max_accuracy_drop: float = 1.0  # percentage points of test accuracy, per variant vs fp32
    parity_atol: float = 1e-4  # max |logit diff| between PyTorch and the fp32 ONNX model
    # regression: |output diff| <= parity_atol + parity_rtol * |PyTorch output|
    parity_rtol: float = 1e-5
    max_rmse_increase: float = 5.0  # regression: percent of fp32's test RMSE, per variant
    calibration_samples: int = 512  # int8: images drawn from the train split
    calibration_seed: int = 0
    batch_size: int = 256  # for parity and accuracy runs
    # Sequence models: auto tries dynamo and falls back to the legacy exporter when the
    # graph fails or differs at other lengths (torch 2.13's dynamo can bake a bidirectional
    # GRU/LSTM's length in). Image models always use dynamo.
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"
    # Sequence models' int8: dynamic (ORT CPU's fastest, benchmarks/bench_sequence_int8.py)
    # or static Q/DQ (what TensorRT needs).
    sequence_int8: Literal["dynamic", "static"] = "dynamic"


@dataclasses.dataclass(frozen=True)
class EngineParams:
    # Never guessed from the host: DVC caches outputs by params, and a machine-dependent
    # choice behind unchanged params would let it serve one host's artifact to another.
    target: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8"] = "int8"
    min_batch: int = 1  # tensorrt: optimisation profile of the batch dimension
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mib: int = 1024  # tensorrt: builder memory-pool limit
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False  # tensorrt: plan runs on later TensorRT of this major
    timing_cache: str | None = ".cache/tensorrt"  # tensorrt: directory; None disables it
    threads: int = 0  # onnxruntime: intra-op threads for the accuracy run (0 = all cores)
    # onnxruntime: compute float32 subnormals as 0 in the accuracy run, recorded in the
    # sidecar for the server to follow. Off: the engine computes exactly what the
    # parity-checked export does, and the seed CNN has no subnormals to gain from; turn it
    # on for a model whose values underflow (benchmarks/bench_denormals.py).
    flush_denormals: bool = False
