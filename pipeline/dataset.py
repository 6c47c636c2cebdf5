"""The prepared-data contract: ``<dir>/{train,val,test}.npz`` plus ``<dir>/meta.json``.

Each split holds ``x`` (uint8, N x C x H x W) and ``y`` (int64 class indices).
``meta.json`` holds class names, input shape, train-split mean/std (on the [0, 1]
scale), split sizes, the data fingerprint, the source description and the conversions
applied to the source's images (channels, resize).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError

SPLITS = ("train", "val", "test")
DEFAULT_DIR = Path("data/prepared")


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Meta:
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_sizes: dict[str, int]
    fingerprint: str
    source: dict[str, Any]
    conversions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
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
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path} is malformed: {exc}") from None


def load_split(name: str, directory: Path = DEFAULT_DIR) -> Split:
    path = Path(directory) / f"{name}.npz"
    if not path.is_file():
        raise StageError(f"{path} not found; run the prepare stage first")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{path} cannot be read: {exc}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
        raise StageError(f"{path} does not hold uint8 NCHW images with one label each")
    return Split(x=x, y=y.astype(np.int64))
