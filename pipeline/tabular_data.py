"""Tabular data for the prepare stage: scikit-learn's bundled sets, CSV and Parquet files.

Sources (``data.source: tabular``):

- ``data.dataset``: a set bundled with scikit-learn, read offline: ``wine``,
  ``breast_cancer``, ``iris`` (classification; class names are the set's own) or
  ``diabetes`` (regression, in its raw units: age in years, blood pressure in mm Hg...).
  The target is the set's own (``data.label_column`` is not read); ``data.feature_columns``
  may pick some of its features.
- ``data.path``: a ``.csv`` (UTF-8, header row) or ``.parquet`` file, one row per
  example. The target is ``data.label_column``; the features are
  ``data.feature_columns`` (None: every other column, in file order). The features named
  in ``data.categorical_columns`` hold categories (any values, compared as ``str``:
  a CSV's text as written, a Parquet value's ``str()``); every other feature must hold
  numbers. ``data.task`` says what the target is: classification (the default; class
  names are the target's distinct ``str`` values, sorted) or regression (numbers).

Missing cells (a CSV's empty cells and pandas' NA tokens such as ``NA``, ``NaN``,
``null``; a Parquet null or NaN) are refused, naming each column and its count, unless
``data.missing: impute``: then they stay NaN in ``x`` and every column records a
``fill`` (numeric: the train split's median; categorical: its most frequent code) that
the model applies. A missing target is always an error.

Everything learnt from the data is learnt after the split, from the train split only:
a categorical column's categories and codes (a category only val or test has becomes
``dataset.UNSEEN_CODE``, counted in the log), a numeric column's mean and population
std, the fills. A column that is constant in the train split is refused: it can only
mislead a model about rows unlike the train split's. The layout written is
``dataset.py``'s ``tabular`` kind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.dataset import CATEGORICAL, NUMERIC, UNSEEN_CODE, Column, Split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.sources import Encoded, RawData

if TYPE_CHECKING:
    import pandas as pd

# name -> its task; diabetes is loaded unscaled (scikit-learn's default centres and
# scales it), so its features are what a served model would be sent.
BUNDLED = {
    "breast_cancer": "classification",
    "diabetes": "regression",
    "iris": "classification",
    "wine": "classification",
}
SUFFIXES = (".csv", ".parquet")
NUMERIC_HINT = "list the column in data.categorical_columns if it holds categories"
CONSTANT_HINT = "it cannot inform the model: leave it out (data.feature_columns) or check the data"


def load_tabular(params: DataParams) -> RawData:
    """One pool (``all``) of float64 [N, F] rows with their labels or targets."""
    if params.dataset and params.path:
        raise StageError("set data.dataset or data.path for tabular, not both")
    if params.dataset:
        frame, y, class_names, task = _bundled(params.dataset)
        where, label = f"data.dataset {params.dataset!r}", None
    elif params.path:
        frame = read_table(Path(params.path), params)
        where, label = str(params.path), params.label_column
        task = params.task or "classification"
        y, class_names = _target(frame, label, task, where)
    else:
        known = ", ".join(BUNDLED)
        raise StageError(
            f"tabular needs data.dataset ({known}) or data.path (a .csv or .parquet file)"
        )
    names = _feature_names(list(frame.columns), params, label, where)
    columns, x = _feature_matrix(frame, names, params.categorical_columns, where)
    check_missing(x, columns, params.missing, where)
    return RawData(class_names, {"all": (x, y)}, kind="tabular", task=task, columns=columns)


def _bundled(name: str) -> tuple[pd.DataFrame, np.ndarray, tuple[str, ...], str]:
    import pandas as pd
    import sklearn.datasets

    if name not in BUNDLED:
        raise StageError(
            f"data.dataset {name!r} is not a tabular set bundled with scikit-learn "
            f"(bundled: {', '.join(BUNDLED)})"
        )
    load = getattr(sklearn.datasets, f"load_{name}")
    bunch = load(scaled=False) if name == "diabetes" else load()
    frame = pd.DataFrame(bunch.data, columns=[str(c) for c in bunch.feature_names])
    if BUNDLED[name] == "regression":
        return frame, bunch.target.astype(np.float32), (), "regression"
    names = tuple(str(n) for n in bunch.target_names)
    return frame, bunch.target.astype(np.int64), names, "classification"


# ---------------------------------------------------------------- files


def read_table(path: Path, params: DataParams) -> pd.DataFrame:
    """The file as pandas reads it; categorical and class-label columns of a CSV as text."""
    import pandas as pd

    if not path.is_file():
        raise StageError(f"data.path {path} not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StageError(f"data.path {path}: tabular files must end in .csv or .parquet")
    try:
        if suffix == ".csv":
            as_text = [*params.categorical_columns]
            if (params.task or "classification") == "classification":
                as_text.append(params.label_column)
            # utf-8-sig: a spreadsheet export's byte-order mark is not part of a column name
            frame = pd.read_csv(path, dtype=dict.fromkeys(as_text, str), encoding="utf-8-sig")
        else:
            frame = pd.read_parquet(path, dtype_backend="numpy_nullable")
    except pd.errors.EmptyDataError:
        raise StageError(f"{path} is empty (expected a header row)") from None
    except (ValueError, OSError) as exc:  # parser, decoding and Arrow errors are ValueErrors
        raise StageError(f"cannot read {path} as {suffix[1:]}: {first_line(exc)}") from None
    if len(frame) == 0:
        raise StageError(f"{path} has no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _no_column(where: str, name: str, param: str, available: Sequence[str]) -> StageError:
    return StageError(f"{where} has no column {name!r} ({param}); columns: {', '.join(available)}")


def _target(
    frame: pd.DataFrame, label: str, task: str, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """float32 targets (regression) or int64 indices into the sorted class names."""
    import pandas as pd

    if label not in frame.columns:
        raise _no_column(where, label, "data.label_column", list(frame.columns))
    values = frame[label]
    missing = values.isna().to_numpy()
    if missing.any():
        raise StageError(
            f"{where}: the target column {label!r} has {int(missing.sum())} missing cells "
            f"(first at row {int(np.argmax(missing)) + 1}); every row needs a target"
        )
    if task == "regression":
        hint = "a regression target must be a number (or set data.task: classification)"
        return numbers(values, label, where, hint).astype(np.float32), ()
    text = values.map(str)
    class_names = tuple(sorted(set(text)))
    if len(class_names) < 2:
        raise StageError(
            f"{where}: the target column {label!r} has one class, {class_names[0]!r}; "
            "classification needs at least two (or set data.task: regression)"
        )
    codes = pd.Categorical(text, categories=class_names).codes
    return codes.astype(np.int64), class_names


def numbers(values: pd.Series, name: str, where: str, hint: str = NUMERIC_HINT) -> np.ndarray:
    """float64 values of a numeric column, NaN where a cell is missing; the first cell
    that is not a finite number is an error that names its row (1-based, header excluded)."""
    import pandas as pd
    from pandas.api import types

    dtype = values.dtype
    if not (
        types.is_numeric_dtype(dtype)
        or types.is_object_dtype(dtype)
        or types.is_string_dtype(dtype)
    ):
        raise StageError(f"{where}: column {name!r} holds {dtype} values, not numbers; {hint}")
    parsed = pd.to_numeric(values, errors="coerce")
    bad = (parsed.isna() & values.notna()).to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise StageError(
            f"{where}: column {name!r} row {row + 1} holds {values.iloc[row]!r}, "
            f"not a number; {hint}"
        )
    out = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(out)
    if infinite.any():
        row = int(np.argmax(infinite))
        raise StageError(
            f"{where}: column {name!r} row {row + 1} holds {out[row]}; values must be finite "
            "(an empty cell is a missing one)"
        )
    return out


def _feature_names(
    available: list[str], params: DataParams, label: str | None, where: str
) -> list[str]:
    if params.feature_columns is None:
        chosen = [c for c in available if c != label]
    else:
        chosen = list(params.feature_columns)
        _check_listed(chosen, "data.feature_columns", label)
    for name in chosen:
        if name not in available:
            raise _no_column(where, name, "data.feature_columns", available)
    if not chosen:
        raise StageError(f"{where} has no feature columns besides the target {label!r}")
    categorical = list(params.categorical_columns)
    _check_listed(categorical, "data.categorical_columns", label)
    for name in categorical:
        if name not in available:
            raise _no_column(where, name, "data.categorical_columns", available)
        if name not in chosen:
            raise StageError(
                f"data.categorical_columns lists {name!r}, which is not a feature "
                f"(data.feature_columns: {', '.join(chosen)})"
            )
    return chosen


def _check_listed(names: list[str], param: str, label: str | None) -> None:
    for name, count in Counter(names).items():
        if count > 1:
            raise StageError(f"{param} lists {name!r} {count} times")
    if label is not None and label in names:
        raise StageError(f"{param} lists {label!r}, the target column (data.label_column)")


def _feature_matrix(
    frame: pd.DataFrame, names: list[str], categorical: Sequence[str], where: str
) -> tuple[tuple[Column, ...], np.ndarray]:
    columns, arrays = [], []
    for name in names:
        if name in categorical:
            codes, categories = _all_categories(frame[name])
            columns.append(Column(name, CATEGORICAL, categories))
            arrays.append(codes)
        else:
            columns.append(Column(name, NUMERIC))
            arrays.append(numbers(frame[name], name, where))
    return tuple(columns), np.column_stack(arrays)


def _all_categories(values: pd.Series) -> tuple[np.ndarray, tuple[str, ...]]:
    """float64 indices into every split's sorted categories (NaN: missing), and those."""
    import pandas as pd

    present = values.notna().to_numpy()
    text = values[present].map(str)
    categories = tuple(sorted(set(text)))
    codes = np.full(len(values), np.nan)
    codes[present] = pd.Categorical(text, categories=categories).codes
    return codes, categories


def check_missing(x: np.ndarray, columns: Sequence[Column], missing: str, where: str) -> None:
    """With ``data.missing: refuse``, any NaN cell is an error naming each column's count."""
    counts = np.isnan(x).sum(axis=0)
    if missing == "impute" or not counts.any():
        return
    listed = ", ".join(f"{c.name!r} {n}" for c, n in zip(columns, counts, strict=True) if n)
    raise StageError(
        f"{where} has missing (NaN or empty) cells: {listed}; set data.missing: impute to "
        "fill them from the train split, or fill them in the data"
    )


# ---------------------------------------------------------------- encode


def encode_tabular(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    params: DataParams,
    columns: tuple[Column, ...],
) -> Encoded:
    """float32 [N, F] raw rows; categories, codes, stats and fills learnt from train."""
    train = splits["train"][0]
    fitted = [_fit(train[:, j], column, params.missing) for j, column in enumerate(columns)]
    encoded, unseen = {}, Counter()
    for name, (x, y) in splits.items():
        out = np.empty(x.shape, dtype=np.float32)
        for j, (column, lookup) in enumerate(fitted):
            out[:, j] = x[:, j] if lookup is None else _recode(x[:, j], lookup)
            if name != "train" and lookup is not None:
                unseen[column.name] += int((out[:, j] == UNSEEN_CODE).sum())
        encoded[name] = Split(out, y)
    described = tuple(column for column, _ in fitted)
    return Encoded(encoded, columns=described, conversions=_notes(encoded, described, unseen))


def _fit(values: np.ndarray, column: Column, missing: str) -> tuple[Column, np.ndarray | None]:
    """The column as train describes it, and (categorical) the map from every split's
    category index to train's code."""
    present = values[~np.isnan(values)]
    impute = missing == "impute"
    if column.type == CATEGORICAL:
        seen = np.unique(present.astype(np.int64))
        if len(seen) < 2:
            only = f"only {column.categories[seen[0]]!r}" if len(seen) else "no values"
            _constant(column.name, only)
        lookup = np.full(len(column.categories), UNSEEN_CODE, dtype=np.int64)
        lookup[seen] = np.arange(len(seen))
        fill = float(np.bincount(lookup[present.astype(np.int64)]).argmax()) if impute else None
        categories = tuple(column.categories[i] for i in seen)
        return Column(column.name, CATEGORICAL, categories, fill=fill), lookup
    stored = present.astype(np.float32).astype(np.float64)  # the stats of what x holds
    if len(stored) == 0 or stored.min() == stored.max():
        _constant(column.name, f"every value {stored[0]:g}" if len(stored) else "no values")
    fill = float(np.median(stored)) if impute else None
    return Column(
        column.name, NUMERIC, mean=float(stored.mean()), std=float(stored.std()), fill=fill
    ), None


def _constant(name: str, detail: str) -> None:
    raise StageError(f"column {name!r} is constant in the train split ({detail}); {CONSTANT_HINT}")


def _recode(codes: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    out = np.full(len(codes), np.nan)
    present = ~np.isnan(codes)
    out[present] = lookup[codes[present].astype(np.int64)]
    return out


def _notes(
    splits: dict[str, Split], columns: tuple[Column, ...], unseen: Counter[str]
) -> tuple[str, ...]:
    notes = []
    if sum(unseen.values()):
        counts = ", ".join(f"{name} {n}" for name, n in unseen.items() if n)
        notes.append(
            f"coded {sum(unseen.values())} val/test cells of categories the train split lacks "
            f"as {UNSEEN_CODE} ({counts})"
        )
    missing = sum((np.isnan(split.x).sum(axis=0) for split in splits.values()), start=0)
    if np.any(missing):
        counts = ", ".join(f"{c.name} {int(n)}" for c, n in zip(columns, missing, strict=True) if n)
        notes.append(
            f"kept {int(np.sum(missing))} missing cells as NaN for the model to fill "
            f"(data.missing: impute; {counts})"
        )
    return tuple(notes)
