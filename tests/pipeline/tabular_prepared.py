"""Tiny prepared tabular directories in the prepare stage's format, made on the fly.

Written directly in the data contract (pipeline/dataset.py): x float32 [N, F] raw values
in column order, categorical columns as codes into the train split's sorted categories
(-1 for one the train split lacks), NaN for a missing cell under impute; y int64 labels or
float32 targets; meta.json with the columns' train statistics and fills.

Regression: y = 3 x1 - 0.2 x2 + an offset per colour + 100 + noise (sd 0.5), so the
target's mean and scale are far from 0 and 1 and un-standardising matters. Classification:
three classes by where x1 + x2 lies, nudged by the colour. The same call writes the same
files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.dataset import CATEGORICAL, NUMERIC, SPLITS, Column, Meta, Split, save_split

COLOURS = ("blue", "green", "red")
OFFSETS = {"blue": 0.0, "green": 5.0, "red": -4.0}
CLASSES = ("low", "mid", "high")
SIZES = {"train": 160, "val": 40, "test": 60}
NAMES = ("x1", "colour", "x2")  # a categorical column between numeric ones


def _features(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x1 = rng.normal(5.0, 2.0, n)
    x2 = rng.normal(-3.0, 10.0, n)
    colours = [COLOURS[i] for i in rng.integers(0, len(COLOURS), n)]
    return x1, x2, colours


def _regression_target(x1: np.ndarray, x2: np.ndarray, colours: list[str], rng) -> np.ndarray:  # noqa: ANN001
    offset = np.array([OFFSETS[c] for c in colours])
    return (3 * x1 - 0.2 * x2 + offset + 100 + rng.normal(0, 0.5, len(x1))).astype(np.float32)


def _class_labels(x1: np.ndarray, x2: np.ndarray, colours: list[str]) -> np.ndarray:
    score = x1 + 0.1 * x2 + np.array([OFFSETS[c] / 5 for c in colours])
    return np.digitize(score, [3.5, 5.5]).astype(np.int64)


def _column_stats(train_x: np.ndarray, impute: bool) -> tuple[Column, ...]:
    """The columns as the prepare stage describes them from the train split."""
    columns = []
    for index, name in enumerate(NAMES):
        values = train_x[:, index]
        if name == "colour":
            codes = values[~np.isnan(values)].astype(np.int64)
            fill = float(np.bincount(codes).argmax()) if impute else None
            columns.append(Column(name, CATEGORICAL, categories=COLOURS, fill=fill))
        else:
            fill = float(np.nanmedian(values)) if impute else None
            mean, std = float(np.nanmean(values)), float(np.nanstd(values))
            columns.append(Column(name, NUMERIC, mean=mean, std=std, fill=fill))
    return tuple(columns)


def _rows(x1: np.ndarray, x2: np.ndarray, colours: list[str]) -> np.ndarray:
    codes = np.array([COLOURS.index(c) for c in colours], dtype=np.float64)
    return np.stack([x1, codes, x2], axis=1).astype(np.float32)


def write_tabular_prepared(
    directory: Path, task: str = "regression", impute: bool = False, seed: int = 0
) -> Path:
    """``directory`` with {train,val,test}.npz (kind tabular) and meta.json.

    impute: a few NaN cells in every split (x1 and colour) and the columns' fills. The
    test split also has rows of a colour the train split never had (code -1).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for name in SPLITS:
        x1, x2, colours = _features(SIZES[name], rng)
        if task == "regression":
            y = _regression_target(x1, x2, colours, rng)
        else:
            y = _class_labels(x1, x2, colours)
        x = _rows(x1, x2, colours)
        if impute:
            x[rng.choice(len(x), 6, replace=False), 0] = np.nan
            x[rng.choice(len(x), 4, replace=False), 1] = np.nan
        if name == "test":
            x[:3, 1] = -1  # a colour the train split lacks
        splits[name] = Split(x=x, y=y)
        save_split(directory / f"{name}.npz", splits[name])
    train_y = splits["train"].y
    meta = Meta(
        class_names=() if task == "regression" else CLASSES,
        input_shape=(len(NAMES),),
        mean=(),
        std=(),
        split_sizes={name: len(split.y) for name, split in splits.items()},
        fingerprint=_fingerprint(splits),
        source={"name": "synthetic", "task": task, "impute": impute},
        kind="tabular",
        task=task,
        columns=_column_stats(splits["train"].x, impute),
        target_mean=float(train_y.mean()) if task == "regression" else 0.0,
        target_std=float(train_y.std()) if task == "regression" else 1.0,
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json(), indent=2))
    return directory


def rename_column(directory: Path, old: str, new: str) -> None:
    """Rewrite ``directory``'s meta.json with column ``old`` called ``new``."""
    from pipeline.dataset import load_meta

    meta = load_meta(directory)
    columns = tuple(dataclasses.replace(c, name=new) if c.name == old else c for c in meta.columns)
    meta = dataclasses.replace(meta, columns=columns)
    (directory / "meta.json").write_text(json.dumps(meta.to_json(), indent=2))


def _fingerprint(splits: dict[str, Split]) -> str:
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(splits[name].x.tobytes())
        digest.update(splits[name].y.tobytes())
    return digest.hexdigest()
