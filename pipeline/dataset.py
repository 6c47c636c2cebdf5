"""The prepared-data contract: ``<dir>/{train,val,test}.npz`` plus ``<dir>/meta.json``.

Each split holds ``x`` and ``y``: int64 class indices (task ``classification``) or float32
targets in their own units (task ``regression``). What ``x`` is depends on the data's
``kind``:

- ``image``: uint8 pixels, N x C x H x W.
- ``text``: int64 token ids, N x L, padded with ``pad_id`` (0) after each row's
  ``lengths`` tokens (truncated to L = ``data.max_length``); ``tokenizer.json`` (Hugging
  Face ``tokenizers``, trained on the train split) sits beside the splits.
- ``series``: float32 raw values, N x C x T, padded with 0 after each row's ``lengths``
  steps; T is the longest series.
- ``tabular``: float32 raw feature values, N x F, in ``columns`` order. A categorical
  column holds its category's code (the index in that column's ``categories``, learnt
  from the train split), -1 for a category the train split never had (it one-hot encodes
  to all zeros, as scikit-learn's ``handle_unknown="ignore"``). NaN marks a missing cell,
  kept only with ``data.missing: impute`` (the model fills it with the column's ``fill``).
  Standardisation and one-hot encoding happen inside the model, so what is stored here is
  what a served model takes.

Sequence splits also hold ``lengths`` (int64, N, each in 1..L). ``meta.json`` holds class
names, the kind, input shape (batch excluded), the train-split mean/std (images: per
channel on the [0, 1] scale; series: per channel over real steps; text: empty), split
sizes, length statistics (sequences), the vocabulary size (text), the columns (tabular),
the task with the train-split target mean/std (regression), the data fingerprint, the
source description and the conversions applied to the source's data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError

SPLITS = ("train", "val", "test")
DEFAULT_DIR = Path("data/prepared")
TOKENIZER_FILE = "tokenizer.json"
PAD_ID = 0  # text: the id of the padding token; the tokenizer is trained to give it id 0
# Per kind: x's dtype and number of dims, batch included.
LAYOUTS = {
    "image": (np.uint8, 4),
    "text": (np.int64, 2),
    "series": (np.float32, 3),
    "tabular": (np.float32, 2),
}
SEQUENCE_KINDS = ("text", "series")
TASKS = ("classification", "regression")
NUMERIC, CATEGORICAL = "numeric", "categorical"
UNSEEN_CODE = -1  # tabular: a category the train split did not have


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray | None = None  # sequences: real steps per row; None otherwise

    def mask(self, steps: int | None = None) -> np.ndarray:
        """int64 [N, steps]: 1 for a row's real steps, 0 for its padding."""
        assert self.lengths is not None, "images have no sequence mask"
        steps = self.x.shape[-1] if steps is None else steps
        return (np.arange(steps)[None, :] < self.lengths[:, None]).astype(np.int64)


@dataclass(frozen=True)
class Column:
    """A tabular feature column, as the train split described it."""

    name: str
    type: str  # NUMERIC or CATEGORICAL
    categories: tuple[str, ...] = ()  # categorical: code i is categories[i]
    mean: float = 0.0  # numeric: the train split's, NaN excluded
    std: float = 1.0
    fill: float | None = None  # data.missing impute: what NaN becomes (median, or a code)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "type": self.type, "fill": self.fill}
        if self.type == CATEGORICAL:
            return entry | {"categories": list(self.categories)}
        return entry | {"mean": self.mean, "std": self.std}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Column:
        fill = entry.get("fill")
        return cls(
            name=str(entry["name"]),
            type=str(entry["type"]),
            categories=tuple(str(c) for c in entry.get("categories", ())),
            mean=float(entry.get("mean", 0.0)),
            std=float(entry.get("std", 1.0)),
            fill=None if fill is None else float(fill),
        )


@dataclass(frozen=True)
class Meta:
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # image: C, H, W; text: L; series: C, T; tabular: F
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_sizes: dict[str, int]
    fingerprint: str
    source: dict[str, Any]
    conversions: tuple[str, ...] = ()
    kind: str = "image"  # one of LAYOUTS
    vocab_size: int = 0  # text only
    # sequences: {"min", "median", "max"} of the lengths over every split
    length_stats: dict[str, int] = field(default_factory=dict)
    task: str = "classification"  # one of TASKS
    columns: tuple[Column, ...] = ()  # tabular only
    target_mean: float = 0.0  # regression: the train split's targets
    target_std: float = 1.0

    @property
    def is_sequence(self) -> bool:
        return self.kind in SEQUENCE_KINDS

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def num_outputs(self) -> int:
        """What the network's head produces: one logit per class, or one value."""
        return 1 if self.is_regression else len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task": self.task,
            "columns": [c.to_json() for c in self.columns],
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "vocab_size": self.vocab_size,
            "length_stats": self.length_stats,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "split_sizes": self.split_sizes,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "conversions": list(self.conversions),
        }


def load_meta(directory: Path = DEFAULT_DIR) -> Meta:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise StageError(f"{path} not found; run the prepare stage first")
    try:
        return meta_from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path} is malformed: {exc}") from None


def meta_from_json(raw: dict[str, Any]) -> Meta:
    """Meta from its JSON form (meta.json, or the copy a checkpoint keeps); files written
    before a key existed get its default."""
    return Meta(
        class_names=tuple(raw["class_names"]),
        input_shape=tuple(raw["input_shape"]),  # type: ignore[arg-type]
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        split_sizes=dict(raw["split_sizes"]),
        fingerprint=str(raw["fingerprint"]),
        source=dict(raw["source"]),
        conversions=tuple(raw.get("conversions", ())),
        kind=str(raw.get("kind", "image")),
        vocab_size=int(raw.get("vocab_size", 0)),
        length_stats={k: int(v) for k, v in raw.get("length_stats", {}).items()},
        task=str(raw.get("task", "classification")),
        columns=tuple(Column.from_json(c) for c in raw.get("columns", ())),
        target_mean=float(raw.get("target_mean", 0.0)),
        target_std=float(raw.get("target_std", 1.0)),
    )


def save_split(path: Path, split: Split) -> None:
    arrays = {"x": split.x, "y": split.y}
    if split.lengths is not None:
        arrays["lengths"] = split.lengths
    np.savez(path, **arrays)


def load_split(name: str, directory: Path = DEFAULT_DIR, meta: Meta | None = None) -> Split:
    """One split, checked against its kind's layout and task (``meta`` None: meta.json's)."""
    meta = load_meta(directory) if meta is None else meta
    kind = meta.kind
    path = Path(directory) / f"{name}.npz"
    if not path.is_file():
        raise StageError(f"{path} not found; run the prepare stage first")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            lengths = arrays.get("lengths")
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{path} cannot be read: {exc}") from None
    dtype, ndim = LAYOUTS[kind]
    if x.dtype != dtype or x.ndim != ndim or len(x) != len(y):
        raise StageError(
            f"{path} does not hold {kind} data ({np.dtype(dtype).name}, {ndim} dims) "
            "with one label each"
        )
    regression = meta.is_regression
    if regression != np.issubdtype(y.dtype, np.floating) or y.ndim != 1:
        want = "float targets" if regression else "integer class labels"
        raise StageError(f"{path} does not hold one of the {meta.task} task's {want} per row")
    if kind in SEQUENCE_KINDS:
        steps = x.shape[-1]
        if (
            lengths is None
            or lengths.shape != y.shape
            or not np.all((lengths >= 1) & (lengths <= steps))
        ):
            raise StageError(f"{path} lacks one length in 1..{steps} per {kind} row")
        lengths = lengths.astype(np.int64)
    return Split(x=x, y=y.astype(np.float32 if regression else np.int64), lengths=lengths)
