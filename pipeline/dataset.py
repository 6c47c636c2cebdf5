"""The prepared-data contract: ``<dir>/{train,val,test}.npz`` plus ``<dir>/meta.json``.

Each split holds ``x`` and ``y`` (int64 class indices); what ``x`` is depends on the
data's ``kind``:

- ``image``: uint8 pixels, N x C x H x W.
- ``text``: int64 token ids, N x L, padded with ``pad_id`` (0) after each row's
  ``lengths`` tokens (truncated to L = ``data.max_length``); ``tokenizer.json`` (Hugging
  Face ``tokenizers``, trained on the train split) sits beside the splits.
- ``series``: float32 raw values, N x C x T, padded with 0 after each row's ``lengths``
  steps; T is the longest series.

Sequence splits also hold ``lengths`` (int64, N, each in 1..L). ``meta.json`` holds class
names, the kind, input shape (batch excluded), the train-split mean/std (images: per
channel on the [0, 1] scale; series: per channel over real steps; text: empty), split
sizes, length statistics (sequences), the vocabulary size (text), the data fingerprint,
the source description and the conversions applied to the source's data.
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
LAYOUTS = {"image": (np.uint8, 4), "text": (np.int64, 2), "series": (np.float32, 3)}


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray | None = None  # sequences: real steps per row; None for images

    def mask(self, steps: int | None = None) -> np.ndarray:
        """int64 [N, steps]: 1 for a row's real steps, 0 for its padding."""
        assert self.lengths is not None, "images have no sequence mask"
        steps = self.x.shape[-1] if steps is None else steps
        return (np.arange(steps)[None, :] < self.lengths[:, None]).astype(np.int64)


@dataclass(frozen=True)
class Meta:
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # image: C, H, W; text: L; series: C, T
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

    @property
    def is_sequence(self) -> bool:
        return self.kind != "image"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
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
        raw = json.loads(path.read_text())
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
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path} is malformed: {exc}") from None


def save_split(path: Path, split: Split) -> None:
    arrays = {"x": split.x, "y": split.y}
    if split.lengths is not None:
        arrays["lengths"] = split.lengths
    np.savez(path, **arrays)


def load_split(name: str, directory: Path = DEFAULT_DIR, kind: str | None = None) -> Split:
    """One split, checked against its kind's layout (``kind`` None: meta.json's)."""
    kind = load_meta(directory).kind if kind is None else kind
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
    if kind != "image":
        steps = x.shape[-1]
        if (
            lengths is None
            or lengths.shape != y.shape
            or not np.all((lengths >= 1) & (lengths <= steps))
        ):
            raise StageError(f"{path} lacks one length in 1..{steps} per {kind} row")
        lengths = lengths.astype(np.int64)
    return Split(x=x, y=y.astype(np.int64), lengths=lengths)
