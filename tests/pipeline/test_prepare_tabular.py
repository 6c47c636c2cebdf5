import re

import numpy as np
import pytest

from pipeline.dataset import (
    CATEGORICAL,
    NUMERIC,
    SPLITS,
    UNSEEN_CODE,
    Column,
    load_meta,
    load_split,
)
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.prepare import prepare, split_data
from pipeline.sources import RawData
from pipeline.tabular_data import encode_tabular
from tests.conftest import run_prepare
from tests.pipeline.tabular_fixtures import (
    CATEGORICAL_COLUMNS,
    FEATURES,
    tabular_frame,
    write_csv,
    write_parquet,
)


def file_params(path, **kw) -> DataParams:
    return DataParams(
        source="tabular", path=str(path), categorical_columns=CATEGORICAL_COLUMNS, **kw
    )


def splits_of(out):
    meta = load_meta(out)
    return meta, {name: load_split(name, out, meta) for name in SPLITS}


def source_rows(frame, split):
    """The frame's rows in a prepared split's order, found by their unique income."""
    by_income = {np.float32(v): i for i, v in enumerate(frame["income"])}
    return frame.iloc[[by_income[v] for v in split.x[:, FEATURES.index("income")]]]


# ---------------------------------------------------------------- bundled sets


@pytest.mark.parametrize(
    ("name", "rows", "features", "classes"),
    [
        ("wine", 178, 13, ("class_0", "class_1", "class_2")),
        ("breast_cancer", 569, 30, ("malignant", "benign")),
        ("iris", 150, 4, ("setosa", "versicolor", "virginica")),
        ("diabetes", 442, 10, ()),
    ],
)
def test_bundled_sets(tmp_path, name, rows, features, classes):
    out = tmp_path / "out"
    meta = prepare(DataParams(source="tabular", dataset=name), out)
    assert meta.kind == "tabular" and meta.class_names == classes
    assert meta.task == ("classification" if classes else "regression")
    assert meta.input_shape == (features,) and meta.mean == meta.std == ()
    assert sum(meta.split_sizes.values()) == rows
    assert meta.split_sizes["test"] == pytest.approx(0.2 * rows, abs=1)
    assert load_meta(out) == meta
    _, splits = splits_of(out)
    train = splits["train"].x.astype(np.float64)
    assert [c.type for c in meta.columns] == [NUMERIC] * features
    np.testing.assert_allclose([c.mean for c in meta.columns], train.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose([c.std for c in meta.columns], train.std(axis=0), rtol=1e-9)
    assert all(c.fill is None for c in meta.columns)
    for split in splits.values():
        assert split.x.dtype == np.float32 and split.x.shape[1] == features
    if not classes:
        y = splits["train"].y.astype(np.float64)
        assert splits["train"].y.dtype == np.float32
        assert meta.target_mean == pytest.approx(y.mean()) and meta.target_std == pytest.approx(
            y.std()
        )
    else:
        assert meta.target_mean == 0.0 and meta.target_std == 1.0
        for split in splits.values():
            assert set(split.y.tolist()) == set(range(len(classes)))  # stratified


def test_diabetes_is_in_raw_units(tmp_path):
    meta = prepare(DataParams(source="tabular", dataset="diabetes"), tmp_path / "out")
    age = next(c for c in meta.columns if c.name == "age")
    assert 40 < age.mean < 60 and 10 < age.std < 16  # years, not scikit-learn's scaled -0.0..
    assert 100 < meta.target_mean < 200


def test_bundled_set_takes_feature_columns(tmp_path):
    params = DataParams(source="tabular", dataset="iris", feature_columns=("petal width (cm)",))
    meta = prepare(params, tmp_path / "out")
    assert meta.input_shape == (1,) and meta.columns[0].name == "petal width (cm)"


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("writer", [write_csv, write_parquet])
def test_numeric_and_categorical_columns(tmp_path, writer):
    frame = tabular_frame(rows=60)
    path = writer(tmp_path / f"t{'.csv' if writer is write_csv else '.parquet'}", frame)
    out = tmp_path / "out"
    meta = prepare(file_params(path), out)
    assert meta.class_names == ("no", "yes") and meta.task == "classification"
    assert [c.name for c in meta.columns] == list(FEATURES)
    assert [c.type for c in meta.columns] == [NUMERIC, NUMERIC, CATEGORICAL, CATEGORICAL]
    assert meta.split_sizes == {"train": 43, "val": 5, "test": 12}
    _, splits = splits_of(out)
    train_rows = source_rows(frame, splits["train"])
    for split in splits.values():
        rows = source_rows(frame, split)
        np.testing.assert_array_equal(split.x[:, 0], rows["age"].to_numpy(np.float32))
        assert split.y.tolist() == [meta.class_names.index(v) for v in rows["label"]]
        for j, column in enumerate(meta.columns[2:], start=2):
            assert column.categories == tuple(sorted(set(train_rows[column.name])))
            codes = [column.categories.index(v) for v in rows[column.name]]
            assert split.x[:, j].tolist() == codes  # every category is in train here
    numeric = splits["train"].x[:, :2].astype(np.float64)
    assert meta.columns[1].mean == pytest.approx(numeric[:, 1].mean())
    assert meta.columns[1].std == pytest.approx(numeric[:, 1].std())
    assert meta.conversions == ()


def test_category_unseen_in_train_is_coded_minus_one_and_counted(tmp_path):
    frame = tabular_frame(rows=60)
    frame.loc[:7, "color"] = [f"rare{i}" for i in range(8)]  # one row each
    out = tmp_path / "out"
    prepare(file_params(write_csv(tmp_path / "t.csv", frame)), out)
    meta, splits = splits_of(out)
    color = meta.columns[FEATURES.index("color")]
    train_colors = set(source_rows(frame, splits["train"])["color"])
    assert color.categories == tuple(sorted(train_colors))
    unseen = 0
    for name in ("val", "test"):
        rows = source_rows(frame, splits[name])
        for code, value in zip(splits[name].x[:, 2], rows["color"], strict=True):
            expected = color.categories.index(value) if value in train_colors else UNSEEN_CODE
            assert code == expected
            unseen += value not in train_colors
    assert unseen > 0
    assert meta.conversions == (
        f"coded {unseen} val/test cells of categories the train split lacks as -1 (color {unseen})",
    )


def test_encoder_learns_categories_from_train_only():
    columns = (Column("c", CATEGORICAL, ("a", "b", "z")),)  # z: only in test
    splits = {
        "train": (np.array([[0.0], [1.0], [1.0]]), np.zeros(3, np.int64)),
        "val": (np.array([[1.0]]), np.zeros(1, np.int64)),
        "test": (np.array([[2.0], [0.0], [np.nan]]), np.zeros(3, np.int64)),
    }
    encoded = encode_tabular(splits, DataParams(missing="impute"), columns)
    assert encoded.columns == (Column("c", CATEGORICAL, ("a", "b"), fill=1.0),)
    np.testing.assert_array_equal(encoded.splits["test"].x[:, 0], [UNSEEN_CODE, 0, np.nan])
    assert encoded.splits["test"].x.dtype == np.float32


@pytest.mark.parametrize("writer", [write_csv, write_parquet])
def test_impute_keeps_nan_and_records_fills(tmp_path, writer):
    frame = tabular_frame(rows=60, missing=4)
    path = writer(tmp_path / f"t{'.csv' if writer is write_csv else '.parquet'}", frame)
    out = tmp_path / "out"
    meta = prepare(file_params(path, missing="impute"), out)
    _, splits = splits_of(out)
    assert sum(int(np.isnan(s.x).sum()) for s in splits.values()) == 8
    assert meta.conversions == (
        "kept 8 missing cells as NaN for the model to fill (data.missing: impute; "
        "income 4, color 4)",
    )
    train = splits["train"].x.astype(np.float64)
    age, income, color, size = meta.columns
    assert income.fill == pytest.approx(np.nanmedian(train[:, 1]))
    assert income.mean == pytest.approx(np.nanmean(train[:, 1]))
    assert income.std == pytest.approx(np.nanstd(train[:, 1]))
    codes = train[:, 2][~np.isnan(train[:, 2])].astype(int)
    assert color.fill == float(np.bincount(codes).argmax())
    assert age.fill == float(np.median(train[:, 0])) and size.fill is not None


def test_regression_file_splits_randomly_by_seed(tmp_path):
    from sklearn.model_selection import train_test_split

    frame = tabular_frame(rows=50, task="regression")
    path = write_parquet(tmp_path / "r.parquet", frame)
    params = file_params(path, label_column="price", task="regression")
    out = tmp_path / "a"
    meta = prepare(params, out)
    assert meta.task == "regression" and meta.class_names == ()
    _, splits = splits_of(out)
    # Every price is distinct, so a stratified split would have failed; this is sklearn's
    # unstratified split of the same seed.
    rest, test = train_test_split(np.arange(50), test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.1, random_state=0)
    prices = frame["price"].to_numpy(np.float32)
    for name, index in (("train", train), ("val", val), ("test", test)):
        np.testing.assert_array_equal(splits[name].y, prices[index])
    y = splits["train"].y.astype(np.float64)
    assert (meta.target_mean, meta.target_std) == (pytest.approx(y.mean()), pytest.approx(y.std()))
    again = prepare(params, tmp_path / "b")
    other = prepare(DataParams(**{**params.__dict__, "seed": 1}), tmp_path / "c")
    assert again.fingerprint == meta.fingerprint != other.fingerprint
    assert load_split("test", tmp_path / "c").y.tolist() != splits["test"].y.tolist()


def test_fingerprint_covers_category_names(tmp_path):
    frame = tabular_frame(rows=40)
    first = prepare(file_params(write_csv(tmp_path / "a.csv", frame)), tmp_path / "a")
    frame["color"] = frame["color"].replace("blue", "azure")  # same order, same codes
    renamed = prepare(file_params(write_csv(tmp_path / "b.csv", frame)), tmp_path / "b")
    x = [load_split(s, tmp_path / d).x for d in "ab" for s in SPLITS]
    assert all(np.array_equal(a, b) for a, b in zip(x[:3], x[3:], strict=True))
    assert first.fingerprint != renamed.fingerprint


def test_split_data_keeps_tabular_rows_whole():
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    raw = RawData((), {"all": (x, x[:, 0].astype(np.float32))}, kind="tabular", task="regression")
    splits = split_data(raw, DataParams())
    for rows, y in splits.values():
        np.testing.assert_array_equal(rows[:, 0], y)
        np.testing.assert_array_equal(rows[:, 1], rows[:, 0] + 1)


def test_cli_on_a_csv(tmp_path):
    csv = write_csv(tmp_path / "t.csv", rows=40)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data:\n  source: tabular\n  path: {csv}\n  categorical_columns: [color, size]\n"
    )
    result = run_prepare(params, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "prepared 2 classes, shape (4,): train 28, val 4, test 8" in result.stdout
    assert load_meta(tmp_path / "out").source["categorical_columns"] == ["color", "size"]


def test_cli_regression_line_and_error_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    def run(dataset: str, out: str):
        params = tmp_path / f"{dataset}.yaml"
        params.write_text(f"data:\n  source: tabular\n  dataset: {dataset}\n")
        return CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", out])

    result = run("diabetes", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert re.search(
        r"prepared a regression target \(train mean [\d.]+, std [\d.]+\), shape \(10,\)",
        result.output,
    )
    result = run("titanic", str(tmp_path / "bad"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: data.dataset 'titanic' is not a tabular set bundled")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- bad input


def _edit(cells):
    def edit(frame):
        for (column, row), value in cells.items():
            frame[column] = frame[column].astype(object)
            frame.loc[row, column] = value
        return frame

    return edit


def _add(column, value):
    def edit(frame):
        frame[column] = value
        return frame

    return edit


BAD_FRAMES = {
    "feature column missing": (
        None,
        {"feature_columns": ("age", "nope")},
        r"t.csv has no column 'nope' \(data.feature_columns\); columns: age, income, color",
    ),
    "categorical column missing": (
        None,
        {"categorical_columns": ("color", "shade")},
        r"has no column 'shade' \(data.categorical_columns\)",
    ),
    "label column missing": (
        None,
        {"label_column": "target"},
        r"has no column 'target' \(data.label_column\); columns: age, income, color, size, label",
    ),
    "text in a numeric column": (
        _edit({("age", 4): "forty"}),
        {},
        r"t.csv: column 'age' row 5 holds 'forty', not a number; list the column in "
        r"data.categorical_columns",
    ),
    "infinite value": (
        _edit({("income", 2): "inf"}),
        {},
        r"column 'income' row 3 holds inf; values must be finite",
    ),
    "constant numeric column": (
        _add("flat", 7),
        {},
        r"column 'flat' is constant in the train split \(every value 7\); it cannot inform",
    ),
    "single category": (
        _add("kind", "same"),
        {"categorical_columns": ("color", "size", "kind")},
        r"column 'kind' is constant in the train split \(only 'same'\)",
    ),
    "missing cells refused": (
        lambda f: tabular_frame(rows=60, missing=3),
        {},
        r"t.csv has missing \(NaN or empty\) cells: 'income' 3, 'color' 3; "
        r"set data.missing: impute",
    ),
    "missing target": (
        _edit({("label", 2): None, ("label", 6): None}),
        {"missing": "impute"},
        r"the target column 'label' has 2 missing cells \(first at row 3\); every row needs",
    ),
    "one class": (
        _add("label", "yes"),
        {},
        r"the target column 'label' has one class, 'yes'; classification needs at least two",
    ),
    "regression target not numeric": (
        None,
        {"task": "regression"},
        r"column 'label' row 1 holds '(yes|no)', not a number; a regression target",
    ),
    "regression with max_per_class": (
        None,
        {
            "task": "regression",
            "label_column": "age",
            "feature_columns": ("income",),
            "categorical_columns": (),
            "max_per_class": 5,
        },
        r"data.max_per_class caps examples per class, and a regression target has no classes",
    ),
    "feature listed twice": (
        None,
        {"feature_columns": ("age", "income", "age")},
        r"data.feature_columns lists 'age' 2 times",
    ),
    "feature is the label": (
        None,
        {"feature_columns": ("age", "label")},
        r"data.feature_columns lists 'label', the target column \(data.label_column\)",
    ),
    "categorical is the label": (
        None,
        {"categorical_columns": ("label",)},
        r"data.categorical_columns lists 'label', the target column",
    ),
    "categorical not a feature": (
        None,
        {"feature_columns": ("age", "income")},
        r"data.categorical_columns lists 'color', which is not a feature "
        r"\(data.feature_columns: age, income\)",
    ),
    "categorical listed twice": (
        None,
        {"categorical_columns": ("color", "color")},
        r"data.categorical_columns lists 'color' 2 times",
    ),
    "only the target": (
        lambda f: f[["label"]],
        {"categorical_columns": ()},
        r"has no feature columns besides the target 'label'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frames_are_named(tmp_path, case):
    edit, params, message = BAD_FRAMES[case]
    frame = tabular_frame(rows=60)
    frame = edit(frame) if edit else frame
    path = write_csv(tmp_path / "t.csv", frame)
    kw = {"categorical_columns": CATEGORICAL_COLUMNS, **params}
    with pytest.raises(StageError, match=message):
        prepare(DataParams(source="tabular", path=str(path), **kw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write(name, content: bytes):
    def write(folder):
        path = folder / name
        path.write_bytes(content)
        return path

    return write


BAD_FILES = {
    "unsupported suffix": (_write("t.xlsx", b"a,b\n1,2\n"), r"t.xlsx: tabular files must end in "),
    "empty csv": (_write("t.csv", b""), r"t.csv is empty \(expected a header row\)"),
    "header only": (_write("t.csv", b"age,label\n"), r"t.csv has no rows"),
    "not utf-8": (
        _write("t.csv", b"age,label\n1,\xff\xfe\n"),
        r"cannot read .*t.csv as csv: UnicodeDecodeError",
    ),
    "ragged csv": (
        _write("t.csv", b"age,label\n1,a\n2,b,3,4\n"),
        r"cannot read .*t.csv as csv: ParserError: Error tokenizing data",
    ),
    "not parquet": (_write("t.parquet", b"PAR1 not really"), r"cannot read .*t.parquet as parquet"),
    "not found": (lambda folder: folder / "absent.csv", r"data.path .*absent.csv not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_named(tmp_path, case):
    write, message = BAD_FILES[case]
    path = write(tmp_path)
    with pytest.raises(StageError, match=message):
        prepare(DataParams(source="tabular", path=str(path)), tmp_path / "out")


def test_datetime_column_is_not_numeric(tmp_path):
    import pandas as pd

    frame = tabular_frame(rows=20)
    frame["when"] = pd.date_range("2024-01-01", periods=20)
    path = write_parquet(tmp_path / "t.parquet", frame)
    with pytest.raises(StageError, match=r"column 'when' holds datetime64\[ns\] values, not"):
        prepare(file_params(path), tmp_path / "out")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, r"tabular needs data.dataset \(breast_cancer, diabetes, iris, wine\) or data.path"),
        (
            {"dataset": "iris", "path": "x.csv"},
            r"set data.dataset or data.path for tabular, not both",
        ),
        (
            {"dataset": "Iris"},
            r"data.dataset 'Iris' is not a tabular set bundled with scikit-learn "
            r"\(bundled: breast_cancer, diabetes, iris, wine\)",
        ),
        (
            {"dataset": "diabetes", "task": "classification"},
            r"data.task is classification, but diabetes is a regression data set; "
            r"set data.task: regression or null",
        ),
        ({"dataset": "wine", "task": "regression"}, r"but wine is a classification data set"),
        (
            {"dataset": "iris", "categorical_columns": ("petal",)},
            r"data.dataset 'iris' has no column 'petal' \(data.categorical_columns\)",
        ),
    ],
)
def test_bad_params(tmp_path, params, message):
    with pytest.raises(StageError, match=message):
        prepare(DataParams(source="tabular", **params), tmp_path / "out")


def test_task_on_an_image_source_is_refused(tmp_path):
    with pytest.raises(StageError, match=r"data.task is regression, but digits is a classif"):
        prepare(DataParams(task="regression"), tmp_path / "out")
