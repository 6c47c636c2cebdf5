"""Time series for the prepare stage: UCR/UEA ``.ts`` files read with aeon.

Sources: ``data.dataset`` names a classification set bundled in the aeon wheel (its
published TRAIN/TEST split is kept; no download), or ``data.path`` names a
``<Name>_TRAIN.ts`` file (its ``_TEST.ts`` sibling is the test split), a folder holding
one such pair, or any other ``.ts`` file (one pool). Series may be multivariate and of
varying length; trailing NaN steps (how some UCR files pad short series) are padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.dataset import Split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.sources import Encoded, RawData

STD_FLOOR = 1e-6  # a constant channel must not divide by 0


def load_series(params: DataParams) -> RawData:
    files = _files(params)
    loaded = {split: _read_ts(path) for split, path in files.items()}
    reference = "train" if "train" in loaded else "all"
    class_names = _sorted_labels(set(loaded[reference][1]))
    channels = loaded[reference][0][0].shape[0]
    splits, trimmed = {}, 0
    for split, (rows, labels) in loaded.items():
        if rows[0].shape[0] != channels:
            raise StageError(
                f"{files[split]} has {rows[0].shape[0]} channels, {files[reference]} has {channels}"
            )
        for label in sorted(set(labels) - set(class_names)):
            raise StageError(
                f"class {label!r} of {files[split]} is not in {reference} "
                f"(classes: {', '.join(class_names)})"
            )
        y = np.asarray([class_names.index(label) for label in labels], dtype=np.int64)
        kept = [_real_steps(row, files[split], i) for i, row in enumerate(rows)]
        trimmed += sum(k.shape[1] < r.shape[1] for k, r in zip(kept, rows, strict=True))
        array = np.empty(len(kept), dtype=object)
        array[:] = kept
        splits[split] = (array, y)
    notes = (f"read trailing NaN steps of {trimmed} series as padding",) if trimmed else ()
    return RawData(class_names, splits, notes, kind="series")


def bundled_dir() -> Path:
    import aeon.datasets

    return Path(aeon.datasets.__file__).parent / "data"


def bundled_classification_sets() -> list[str]:
    """The aeon wheel's sets with a TRAIN/TEST pair whose header declares class labels."""
    names = []
    for folder in sorted(bundled_dir().iterdir()):
        train = folder / f"{folder.name}_TRAIN.ts"
        if train.is_file() and (folder / f"{folder.name}_TEST.ts").is_file():
            with open(train, encoding="utf-8", errors="replace") as fh:
                if any(line.lower().startswith("@classlabel true") for line in fh):
                    names.append(folder.name)
    return names


def _files(params: DataParams) -> dict[str, Path]:
    """split -> .ts file: train and test, or all (one pool)."""
    if params.dataset and params.path:
        raise StageError("set data.dataset or data.path for series, not both")
    if params.dataset:
        known = bundled_classification_sets()
        if params.dataset not in known:
            raise StageError(
                f"data.dataset {params.dataset!r} is not a classification set bundled with "
                f"aeon (bundled: {', '.join(known)})"
            )
        folder = bundled_dir() / params.dataset
        return _pair(folder / f"{params.dataset}_TRAIN.ts")
    if not params.path:
        raise StageError("series needs data.dataset (bundled with aeon) or data.path (.ts)")
    path = Path(params.path)
    if path.is_dir():
        trains = sorted(path.glob("*_TRAIN.ts"))
        if len(trains) != 1:
            found = ", ".join(p.name for p in trains) or "none"
            raise StageError(f"{path} must hold one <Name>_TRAIN.ts file, found: {found}")
        return _pair(trains[0])
    if not path.is_file():
        raise StageError(f"data.path {path} not found")
    if path.suffix != ".ts":
        raise StageError(f"data.path {path}: series files must be .ts (UCR/UEA format)")
    return _pair(path) if path.name.endswith("_TRAIN.ts") else {"all": path}


def _pair(train: Path) -> dict[str, Path]:
    test = train.with_name(train.name.removesuffix("_TRAIN.ts") + "_TEST.ts")
    if not test.is_file():
        raise StageError(f"{train} has no {test.name} beside it")
    return {"train": train, "test": test}


def _read_ts(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """Float64 [C, T_i] per series and its label, as the file states them."""
    from aeon.datasets import load_from_ts_file

    try:
        x, y, meta = load_from_ts_file(str(path), return_meta_data=True)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise StageError(f"cannot read {path} as a .ts file: {message}") from None
    if len(x) == 0:
        raise StageError(f"{path} holds no series (is it a .ts file?)")
    if not meta.get("classlabel"):
        raise StageError(f"{path} has no class labels (@classLabel false)")
    return [np.asarray(row, dtype=np.float64) for row in x], [str(label) for label in y]


def _real_steps(row: np.ndarray, path: Path, index: int) -> np.ndarray:
    finite = ~np.isnan(row)
    steps = np.flatnonzero(finite.any(axis=0))
    if len(steps) == 0:
        raise StageError(f"{path}: series {index + 1} has no values")
    kept = row[:, : steps[-1] + 1]
    if np.isnan(kept).any():
        channel, step = (int(v[0]) for v in np.nonzero(np.isnan(kept)))
        raise StageError(
            f"{path}: series {index + 1} has NaN at channel {channel + 1}, step {step + 1}, "
            "before its last value"
        )
    return kept


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Numeric labels ("1" .. "10") in numeric order, any others alphabetically."""
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


# ---------------------------------------------------------------- pad


def encode_series(splits: dict[str, tuple[np.ndarray, np.ndarray]], _: DataParams) -> Encoded:
    """float32 [N, C, T] right-padded with 0 (T: the longest series of any split)."""
    steps = max(row.shape[1] for rows, _ in splits.values() for row in rows)
    encoded = {}
    for name, (rows, y) in splits.items():
        x = np.zeros((len(rows), rows[0].shape[0], steps), dtype=np.float32)
        lengths = np.asarray([row.shape[1] for row in rows], dtype=np.int64)
        for i, row in enumerate(rows):
            x[i, :, : lengths[i]] = row
        encoded[name] = Split(x, y, lengths)
    train = splits["train"][0]
    real = np.concatenate([row.astype(np.float32) for row in train], axis=1).astype(np.float64)
    return Encoded(
        encoded,
        mean=tuple(round(float(m), 6) + 0.0 for m in real.mean(axis=1)),  # no -0.0
        std=tuple(round(float(s), 6) for s in np.maximum(real.std(axis=1), STD_FLOOR)),
    )
