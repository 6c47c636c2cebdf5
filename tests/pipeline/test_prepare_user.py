import numpy as np
import pytest

from pipeline.dataset import NUMERIC, SPLITS, load_meta, load_split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.prepare import prepare
from tests.pipeline.tabular_fixtures import IMAGE_LOADER, TABULAR_LOADER, write_user_package


@pytest.fixture
def loader(tmp_path, monkeypatch):
    """Write a loader module from its source; returns its import path."""
    monkeypatch.syspath_prepend(str(tmp_path / "code"))

    def write(body: str) -> str:
        return write_user_package(tmp_path / "code", body)

    return write


def test_tabular_loader_regression(tmp_path, loader):
    source = loader(TABULAR_LOADER)
    options = {"regression": True, "rows": 50}
    out = tmp_path / "out"
    meta = prepare(DataParams(source=source, options=options, seed=2), out)
    assert meta.kind == "tabular" and meta.task == "regression" and meta.class_names == ()
    assert meta.split_sizes == {"train": 36, "val": 4, "test": 10}
    assert [(c.name, c.type) for c in meta.columns] == [
        ("a", NUMERIC),
        ("b", NUMERIC),
        ("c", NUMERIC),
    ]
    assert meta.source["options"] == options and meta.source["source"] == source
    assert load_meta(out) == meta
    splits = {name: load_split(name, out, meta) for name in SPLITS}
    train = splits["train"].x.astype(np.float64)
    np.testing.assert_allclose([c.mean for c in meta.columns], train.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose([c.std for c in meta.columns], train.std(axis=0), rtol=1e-9)
    assert meta.columns[2].std > 50  # raw values: the model standardises them
    for split in splits.values():
        assert split.x.dtype == np.float32 and split.y.dtype == np.float32
        np.testing.assert_allclose(split.y, split.x[:, 0] * 3.0 + 7.0, rtol=1e-5)
    assert meta.target_mean == pytest.approx(splits["train"].y.astype(np.float64).mean())
    again = prepare(DataParams(source=source, options=options, seed=2), tmp_path / "again")
    assert again.fingerprint == meta.fingerprint


def test_tabular_loader_classification_default_names_and_impute(tmp_path, loader):
    source = loader(TABULAR_LOADER)
    params = DataParams(source=source, options={"nan": True}, missing="impute")
    out = tmp_path / "out"
    meta = prepare(params, out)
    assert meta.class_names == ("neg", "pos") and meta.task == "classification"
    assert [c.name for c in meta.columns] == ["f0", "f1", "f2"]
    train = load_split("train", out, meta).x.astype(np.float64)
    assert meta.columns[1].fill == pytest.approx(np.nanmedian(train[:, 1]))
    assert meta.conversions[-1].startswith("kept 2 missing cells as NaN")
    with pytest.raises(StageError, match=r"splits\['all'\] has missing .* cells: 'f1' 2; set"):
        prepare(DataParams(source=source, options={"nan": True}), tmp_path / "refused")


def test_loader_gets_the_path_and_a_copy_of_the_options(tmp_path, loader):
    source = loader(
        """
        def load(path, options):
            assert path == "some/where", path
            options["added"] = True
            x = np.arange(40.0).reshape(20, 2) ** 1.5
            return UserData("regression", {"all": (x, x[:, 0])})
        """
    )
    meta = prepare(DataParams(source=source, path="some/where", options={"k": 1}), tmp_path / "o")
    assert meta.source["options"] == {"k": 1} and meta.source["path"] == "some/where"


def test_image_loader_with_its_own_test_split(tmp_path, loader):
    out = tmp_path / "out"
    meta = prepare(DataParams(source=loader(IMAGE_LOADER), val_fraction=0.2), out)
    assert meta.kind == "image" and meta.class_names == ("a", "b", "c")
    assert meta.input_shape == (1, 12, 12) and len(meta.mean) == len(meta.std) == 1
    assert meta.split_sizes == {"train": 24, "val": 6, "test": 9}
    test = load_split("test", out, meta)
    assert test.x.dtype == np.uint8 and test.y.tolist() == [0, 1, 2] * 3


def test_image_loader_is_conformed_like_builtin_images(tmp_path, loader):
    params = DataParams(source=loader(IMAGE_LOADER), channels=3, image_size=16)
    meta = prepare(params, tmp_path / "out")
    assert meta.input_shape == (3, 16, 16)
    assert any("resized every image from 12x12 to 16x16" in c for c in meta.conversions)


def test_image_regression_from_train_only(tmp_path, loader):
    source = loader(
        """
        def load(path, options):
            x = np.random.default_rng(0).integers(0, 255, (40, 3, 8, 8), dtype=np.uint8)
            return UserData("regression", {"train": (x, x.mean(axis=(1, 2, 3)))})
        """
    )
    out = tmp_path / "out"
    meta = prepare(DataParams(source=source), out)
    assert meta.kind == "image" and meta.task == "regression"
    assert meta.split_sizes == {"train": 28, "val": 4, "test": 8}  # both carved out of train
    assert load_split("val", out, meta).y.dtype == np.float32


# ---------------------------------------------------------------- bad loaders

X = "(np.ones((12, 3)) * np.arange(12)[:, None])"  # float [12, 3], no constant column
Y = "(np.arange(12) % 2)"
NAMES = "class_names=('a', 'b')"

BAD = {
    "not UserData": ("return 42", r"returned int, not pipeline.user_data.UserData"),
    "unknown task": (
        f"return UserData('ranking', {{'all': ({X}, {Y})}})",
        r"task must be one of classification, regression, got 'ranking'",
    ),
    "unknown split": (
        f"return UserData('classification', {{'train': ({X}, {Y}), 'dev': ({X}, {Y})}}, {NAMES})",
        r"unknown split 'dev' \(splits: train, val, test; or all alone\)",
    ),
    "no train": (
        f"return UserData('classification', {{'test': ({X}, {Y})}}, {NAMES})",
        r"no 'train' split \(or 'all', to split it here\)",
    ),
    "all and train": (
        f"return UserData('classification', {{'all': ({X}, {Y}), 'train': ({X}, {Y})}}, {NAMES})",
        r"split 'all' must be the only one, got all, train",
    ),
    "not a pair": (
        f"return UserData('classification', {{'all': [{X}, {Y}]}}, {NAMES})",
        r"splits\['all'\] must be a tuple \(x, y\) of numpy arrays",
    ),
    "length mismatch": (
        f"return UserData('classification', {{'all': ({X}, {Y}[:-1])}}, {NAMES})",
        r"splits\['all'\]: x has 12 rows, y has shape \(11,\) \(want \(12,\)\)",
    ),
    "integer x": (
        f"return UserData('classification', {{'all': ({X}.astype(int), {Y})}}, {NAMES})",
        r"splits\['all'\] x is int64 with shape \(12, 3\); accepted: float \[N, F\] \(tabular\) "
        r"or uint8 \[N, C, H, W\] with C 1 or 3 \(images\)",
    ),
    "float 3-D x": (
        f"return UserData('classification', {{'all': ({X}[:, :, None], {Y})}}, {NAMES})",
        r"x is float64 with shape \(12, 3, 1\); accepted",
    ),
    "4-channel images": (
        f"return UserData('classification', {{'all': (np.zeros((12, 4, 5, 5), np.uint8), {Y})}}, "
        f"{NAMES})",
        r"x is uint8 with shape \(12, 4, 5, 5\); accepted",
    ),
    "feature count differs": (
        f"return UserData('classification', {{'train': ({X}, {Y}), 'test': ({X}[:, :2], {Y})}}, "
        f"{NAMES})",
        r"splits\['test'\] x has features \(2,\), train's has \(3,\)",
    ),
    "float labels": (
        f"return UserData('classification', {{'all': ({X}, {Y} * 1.0)}}, {NAMES})",
        r"y must hold integer class labels for classification, got float64",
    ),
    "integer targets": (
        f"return UserData('regression', {{'all': ({X}, {Y})}})",
        r"y must hold float targets for regression, got int64",
    ),
    "non-finite targets": (
        f"return UserData('regression', {{'all': ({X}, np.where({Y}, np.nan, 1.0))}})",
        r"y holds 6 targets that are NaN or infinite",
    ),
    "label out of range": (
        f"return UserData('classification', {{'all': ({X}, {Y} * 2)}}, {NAMES})",
        r"label 2 is outside 0..1 \(class_names has 2\)",
    ),
    "no class names": (
        f"return UserData('classification', {{'all': ({X}, {Y})}})",
        r"classification needs class_names, one per label \(at least two\), got \(\)",
    ),
    "class names for regression": (
        f"return UserData('regression', {{'all': ({X}, {Y} * 1.0)}}, {NAMES})",
        r"class_names must be empty for regression",
    ),
    "class missing from a split": (
        f"return UserData('classification', {{'train': ({X}, {Y}), 'test': ({X}, {Y} * 0)}}, "
        f"{NAMES})",
        r"splits\['test'\]: class 'b' \(label 1\) has no examples",
    ),
    "feature names count": (
        f"return UserData('classification', {{'all': ({X}, {Y})}}, {NAMES}, "
        "feature_names=('p', 'q'))",
        r"feature_names must be 3 distinct names \(x has 3 columns\), got 2: p, q",
    ),
    "empty split": (
        f"return UserData('classification', {{'train': ({X}, {Y}), 'val': ({X}[:0], {Y}[:0])}}, "
        f"{NAMES})",
        r"splits\['val'\] is empty",
    ),
    "infinite x": (
        f"return UserData('regression', {{'all': (np.where({X} == 0, np.inf, {X}), {Y} * 1.0)}})",
        r"splits\['all'\] x\[0, 0\] \('f0'\) is infinite",
    ),
    "loader raises": (
        "raise ValueError('no such table\\nsecond line')",
        r"^data.source 'tf_user_loader_\d+.loader:load' raised ValueError: no such table$",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_user_data_is_named(tmp_path, loader, case):
    body, message = BAD[case]
    source = loader(f"def load(path, options):\n    {body}\n")
    with pytest.raises(StageError, match=message) as caught:
        prepare(DataParams(source=source), tmp_path / "out")
    assert str(caught.value).startswith(f"data.source {source!r}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"task": "regression"}, r"data.task is regression, but .* is a classification data set"),
        ({"max_per_class": 3, "options": {"regression": True}}, r"data.max_per_class caps"),
        ({"categorical_columns": ("f0",)}, r"data.categorical_columns applies to tabular files"),
        ({"feature_columns": ("f0",)}, r"data.feature_columns applies to tabular files"),
    ],
)
def test_params_that_do_not_fit_a_loader(tmp_path, loader, params, message):
    with pytest.raises(StageError, match=message):
        prepare(DataParams(source=loader(TABULAR_LOADER), **params), tmp_path / "out")


def test_unimportable_loader(tmp_path):
    with pytest.raises(StageError, match=r"data.source 'no_such_pkg.data:load': cannot import"):
        prepare(DataParams(source="no_such_pkg.data:load"), tmp_path / "out")
