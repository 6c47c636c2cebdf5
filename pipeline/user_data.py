"""Bring your own data: ``data.source: "package.module:loader"``.

The prepare stage imports the loader (``pipeline.user_code``: from the Python path, which
starts with the working directory under ``dvc repro``) and calls it as
``loader(data.path, data.options)``; it returns a ``UserData``. Then the data goes the
way of the built-in sources: split, checked, encoded and written as ``dataset.py``
describes, so every later stage, the export and the server treat it as their own.

    # mypackage/data.py, with data.source: "mypackage.data:load"
    import numpy as np
    from pipeline.user_data import UserData

    def load(path: str | None, options: dict) -> UserData:
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        x, y = table[:, :-1], table[:, -1]
        return UserData(task="regression", splits={"all": (x, y)},
                        feature_names=("rooms", "area", "age"))

What it may hold, checked strictly (each problem is one error naming the split):

- ``task``: ``classification`` or ``regression``; ``data.task``, when set, must agree.
- ``splits``: numpy ``(x, y)`` pairs under ``train`` (required), ``val`` and ``test``
  (each carved out of train when absent, with ``data.val_fraction`` and
  ``data.test_fraction``, stratified by class for classification), or one pool under
  ``all`` alone (both carved out of it).
- ``x``: float [N, F] (float32 or float64) for tabular data: every column numeric, named
  by ``feature_names`` (default ``f0`` .. ``f{F-1}``), raw values (the model standardises
  them with the train split's mean and std; NaN cells follow ``data.missing``); or uint8
  [N, C, H, W] images with C 1 or 3, resized or converted by ``data.image_size`` and
  ``data.channels`` as the built-in image sources are. Every split has the same F (or
  C, H, W).
- ``y``: one per row. Classification: integer labels in 0 .. len(class_names) - 1, every
  class present in every split the loader gives; regression: finite floats, in the
  target's own units.
- ``class_names``: one name per label (classification only, at least two).

Anything the loader raises is reported as one line naming the loader. ``data.options``
is recorded in meta.json with the rest of the data params; the loader gets a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.dataset import NUMERIC, TASKS, Column
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.sources import RawData, conform
from pipeline.tabular_data import check_missing, first_line
from pipeline.user_code import import_callable

SPLIT_NAMES = ("train", "val", "test")
ACCEPTED_X = "accepted: float [N, F] (tabular) or uint8 [N, C, H, W] with C 1 or 3 (images)"


@dataclass(frozen=True)
class UserData:
    """What a user's loader returns: the task, the splits, and the names of its labels."""

    task: Literal["classification", "regression"]
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]]  # train[, val, test], or all
    class_names: tuple[str, ...] = ()  # classification: label i is class_names[i]
    feature_names: tuple[str, ...] = ()  # tabular: one per column (default f0, f1, ...)


def load_user(params: DataParams) -> RawData:
    """Import and call the loader ``data.source`` names; its UserData, checked."""
    for param, value in (
        ("data.feature_columns", params.feature_columns),
        ("data.categorical_columns", params.categorical_columns or None),
    ):
        if value is not None:
            raise StageError(
                f"{param} applies to tabular files; data.source {params.source!r} is a loader, "
                "whose x is already its features"
            )
    loader = import_callable(params.source, "data.source")
    try:
        data = loader(params.path, copy.deepcopy(params.options))
    except Exception as exc:  # the user's code may raise anything
        raise StageError(f"data.source {params.source!r} raised {first_line(exc)}") from None
    return from_user_data(data, params)


def from_user_data(data: object, params: DataParams) -> RawData:
    """The loader's result as RawData, or the first thing wrong with it."""
    where = f"data.source {params.source!r}"
    if not isinstance(data, UserData):
        raise StageError(f"{where} returned {type(data).__name__}, not pipeline.user_data.UserData")
    if data.task not in TASKS:
        raise StageError(f"{where}: task must be one of {', '.join(TASKS)}, got {data.task!r}")
    splits = _split_pairs(data.splits, where)
    class_names = _class_names(data, where)
    reference = "train" if "train" in splits else "all"
    kind = _kind(splits[reference][0], f"{where}: splits[{reference!r}]")
    for name, (x, y) in splits.items():
        at = f"{where}: splits[{name!r}]"
        _check_x(x, splits[reference][0], kind, at, reference)
        _check_y(y, len(x), data.task, class_names, at)
    if kind == "image":
        return _images(splits, data, class_names, params, where)
    return _tabular(splits, data, class_names, params, where)


def _split_pairs(splits: object, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(splits, Mapping):
        raise StageError(f"{where}: splits must be a mapping of split name to (x, y)")
    names = list(splits)
    for name in names:
        if name not in (*SPLIT_NAMES, "all"):
            raise StageError(
                f"{where}: unknown split {name!r} (splits: train, val, test; or all alone)"
            )
    if "all" in names and len(names) > 1:
        raise StageError(f"{where}: split 'all' must be the only one, got {', '.join(names)}")
    if "all" not in names and "train" not in names:
        raise StageError(f"{where}: no 'train' split (or 'all', to split it here)")
    pairs = {}
    for name in names:
        pair = splits[name]
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(a, np.ndarray) for a in pair)
        ):
            raise StageError(f"{where}: splits[{name!r}] must be a tuple (x, y) of numpy arrays")
        pairs[name] = pair
    return pairs


def _class_names(data: UserData, where: str) -> tuple[str, ...]:
    names = tuple(data.class_names)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise StageError(f"{where}: class_names must be distinct strings, got {names!r}")
    if data.task == "regression" and names:
        raise StageError(f"{where}: class_names must be empty for regression, got {names!r}")
    if data.task == "classification" and len(names) < 2:
        raise StageError(
            f"{where}: classification needs class_names, one per label (at least two), "
            f"got {names!r}"
        )
    return names


def _kind(x: np.ndarray, at: str) -> str:
    if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] in (1, 3):
        return "image"
    if np.issubdtype(x.dtype, np.floating) and x.ndim == 2:
        return "tabular"
    raise StageError(f"{at} x is {x.dtype} with shape {x.shape}; {ACCEPTED_X}")


def _check_x(x: np.ndarray, reference: np.ndarray, kind: str, at: str, ref_name: str) -> None:
    if _kind(x, at) != kind:
        raise StageError(f"{at} x is {x.dtype} [{x.ndim} dims], {ref_name}'s is {reference.dtype}")
    if x.shape[1:] != reference.shape[1:]:
        what = "features" if kind == "tabular" else "C, H, W"
        raise StageError(f"{at} x has {what} {x.shape[1:]}, {ref_name}'s has {reference.shape[1:]}")
    if len(x) == 0:
        raise StageError(f"{at} is empty")


def _check_y(y: np.ndarray, rows: int, task: str, class_names: tuple[str, ...], at: str) -> None:
    if y.ndim != 1 or len(y) != rows:
        raise StageError(f"{at}: x has {rows} rows, y has shape {y.shape} (want ({rows},))")
    if task == "regression":
        if not np.issubdtype(y.dtype, np.floating):
            raise StageError(f"{at}: y must hold float targets for regression, got {y.dtype}")
        bad = int((~np.isfinite(y)).sum())
        if bad:
            raise StageError(f"{at}: y holds {bad} targets that are NaN or infinite")
        return
    if not np.issubdtype(y.dtype, np.integer):
        raise StageError(
            f"{at}: y must hold integer class labels for classification, got {y.dtype}"
        )
    outside = y[(y < 0) | (y >= len(class_names))]
    if len(outside):
        raise StageError(
            f"{at}: label {int(outside[0])} is outside 0..{len(class_names) - 1} "
            f"(class_names has {len(class_names)})"
        )
    present = set(np.unique(y).tolist())
    for label, name in enumerate(class_names):
        if label not in present:
            raise StageError(f"{at}: class {name!r} (label {label}) has no examples")


def _y(y: np.ndarray, task: str) -> np.ndarray:
    return y.astype(np.float32 if task == "regression" else np.int64)


def _images(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    data: UserData,
    class_names: tuple[str, ...],
    params: DataParams,
    where: str,
) -> RawData:
    if data.feature_names:
        raise StageError(f"{where}: feature_names apply to tabular x only, not to images")
    conformed, notes = {}, ()
    for name, (x, y) in splits.items():
        x, notes = conform(x, params.channels, params.image_size)
        conformed[name] = (x, _y(y, data.task))
    return RawData(class_names, conformed, notes, kind="image", task=data.task)


def _tabular(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    data: UserData,
    class_names: tuple[str, ...],
    params: DataParams,
    where: str,
) -> RawData:
    features = next(iter(splits.values()))[0].shape[1]
    names = tuple(data.feature_names) or tuple(f"f{i}" for i in range(features))
    if len(names) != features or len(set(names)) != len(names):
        raise StageError(
            f"{where}: feature_names must be {features} distinct names (x has {features} "
            f"columns), got {len(names)}: {', '.join(map(str, names))}"
        )
    columns = tuple(Column(str(name), NUMERIC) for name in names)
    rows = {}
    for name, (x, y) in splits.items():
        x = x.astype(np.float64)
        if np.isinf(x).any():
            row, col = (int(i[0]) for i in np.nonzero(np.isinf(x)))
            raise StageError(
                f"{where}: splits[{name!r}] x[{row}, {col}] ({names[col]!r}) is infinite"
            )
        check_missing(x, columns, params.missing, f"{where}: splits[{name!r}]")
        rows[name] = (x, _y(y, data.task))
    return RawData(class_names, rows, kind="tabular", task=data.task, columns=columns)
