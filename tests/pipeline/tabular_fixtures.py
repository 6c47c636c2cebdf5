"""Small tabular fixtures for any test: a frame with numeric and categorical columns, its
CSV and Parquet files, a prepared directory made from one, and a user-loader package.

The frame's label is learnable (income and colour decide it) and balanced; ``income`` is
unique per row, so a test can find a prepared row's source row by it.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

NUMERIC_COLUMNS = ("age", "income")
CATEGORICAL_COLUMNS = ("color", "size")
FEATURES = ("age", "income", "color", "size")  # file order
COLORS = ("blue", "green", "red")
SIZES = ("L", "M", "S")
_packages = itertools.count()


def tabular_frame(
    rows: int = 60, seed: int = 0, task: str = "classification", missing: int = 0
) -> pd.DataFrame:
    """Columns age (int), income (float, unique), color, size (categories) and the target:
    ``label`` ("no"/"yes") for classification, ``price`` (float) for regression. ``missing``
    cells of income and of color are emptied (rows 1, 4, 7, ... and 2, 5, 8, ...)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    income = np.round(20.0 + np.arange(rows) * 1.37 + rng.uniform(0, 1, rows), 3)
    rng.shuffle(income)
    color = rng.choice(COLORS, rows)
    size = rng.choice(SIZES, rows)
    frame = pd.DataFrame({"age": age, "income": income, "color": color, "size": size})
    score = income + 25.0 * (color == "red")
    if task == "regression":
        frame["price"] = np.round(2.0 * age + score + rng.normal(0, 3, rows), 2)
    else:
        frame["label"] = np.where(score > np.median(score), "yes", "no")
    frame.loc[1 : 3 * missing : 3, "income"] = np.nan
    frame.loc[2 : 3 * missing + 1 : 3, "color"] = None
    return frame


def write_csv(path: Path, frame: pd.DataFrame | None = None, **frame_kw: Any) -> Path:
    """``frame`` (default ``tabular_frame(**frame_kw)``) as CSV, missing cells empty."""
    frame = tabular_frame(**frame_kw) if frame is None else frame
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def write_parquet(path: Path, frame: pd.DataFrame | None = None, **frame_kw: Any) -> Path:
    """``frame`` (default ``tabular_frame(**frame_kw)``) as Parquet (pyarrow)."""
    frame = tabular_frame(**frame_kw) if frame is None else frame
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def prepare_tabular(
    directory: Path, task: str = "classification", rows: int = 120, **data_kw: Any
) -> Path:
    """A prepared directory from ``tabular_frame`` (its CSV beside it), via the stage."""
    from pipeline.params import DataParams
    from pipeline.prepare import prepare

    csv = write_csv(directory.parent / f"{directory.name}.csv", rows=rows, task=task)
    label = "price" if task == "regression" else "label"
    params = DataParams(
        source="tabular",
        path=str(csv),
        label_column=label,
        task=task,
        categorical_columns=CATEGORICAL_COLUMNS,
        **data_kw,
    )
    prepare(params, directory)
    return directory


def write_user_package(root: Path, body: str, package: str | None = None) -> str:
    """``root/<package>/loader.py`` holding ``body`` (dedented; it imports numpy as np and
    UserData for you); returns the import path of its ``load``. The package name is new
    for every call unless given, so an earlier test's module is never reused from
    ``sys.modules``; put ``root`` on the path (``monkeypatch.syspath_prepend(root)``)."""
    package = package or f"tf_user_loader_{next(_packages)}"
    folder = root / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    header = "import numpy as np\n\nfrom pipeline.user_data import UserData\n\n\n"
    (folder / "loader.py").write_text(header + textwrap.dedent(body))
    return f"{package}.loader:load"


# A loader of options["rows"] tabular rows (3 features, NaN in f1 at rows 0 and 5 when
# options["nan"]), classification by default, regression with options["regression"].
TABULAR_LOADER = """
def load(path, options):
    rng = np.random.default_rng(options.get("seed", 0))
    rows = options.get("rows", 60)
    x = rng.normal(size=(rows, 3)) * [1.0, 10.0, 100.0] + [0.0, 5.0, -50.0]
    if options.get("nan"):
        x[[0, 5], 1] = np.nan
    if options.get("regression"):
        y = (x[:, 0] * 3.0 + 7.0).astype(np.float64)
        return UserData("regression", {"all": (x, y)}, feature_names=("a", "b", "c"))
    y = (x[:, 0] > 0).astype(np.int64)
    return UserData("classification", {"all": (x, y)}, class_names=("neg", "pos"))
"""

# A loader of uint8 images with its own train and test splits (val carved out of train).
IMAGE_LOADER = """
def load(path, options):
    rng = np.random.default_rng(0)
    def split(n):
        x = rng.integers(0, 255, size=(n, options.get("channels", 1), 12, 12), dtype=np.uint8)
        y = np.arange(n, dtype=np.int64) % 3
        return x, y
    return UserData("classification", {"train": split(30), "test": split(9)},
                    class_names=("a", "b", "c"))
"""
