from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import load_meta, load_split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.prepare import prepare
from tests.conftest import run_prepare


def ts_file(path: Path, cases: list[tuple[list[list[float]], str]], labels: str = "a b") -> Path:
    """A .ts file in the UCR/UEA text format: channels split by ':', the label last."""
    channels = len(cases[0][0])
    header = [
        "# written by the test",
        "@problemName Tiny",
        "@timeStamps false",
        "@missing true",
        f"@univariate {'true' if channels == 1 else 'false'}",
        f"@dimensions {channels}",
        "@equalLength false",
        f"@classLabel true {labels}",
        "@data",
    ]
    lines = [
        ":".join(",".join(str(v) for v in channel) for channel in series) + f":{label}"
        for series, label in cases
    ]
    path.write_text("\n".join(header + lines) + "\n")
    return path


def varying(n: int, channels: int = 2, offset: int = 0) -> list[tuple[list[list[float]], str]]:
    """n series alternating labels a/b, 3..6 steps long, channel c valued near 10 * c (the
    series of another offset start elsewhere)."""
    cases = []
    for i in range(n):
        steps = 3 + (i + offset) % 4
        series = [
            [10.0 * c + i + 100 * offset + 0.5 * t for t in range(steps)] for c in range(channels)
        ]
        cases.append((series, "ab"[i % 2]))
    return cases


def pair(folder: Path, train, test, name: str = "Tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ts_file(folder / f"{name}_TEST.ts", test)
    return ts_file(folder / f"{name}_TRAIN.ts", train)


def series_params(**kw) -> DataParams:
    return DataParams(source="series", **kw)


def test_variable_length_multivariate_pair(tmp_path):
    train = pair(tmp_path / "ts", varying(20), varying(6, offset=1))
    out = tmp_path / "out"
    meta = prepare(series_params(path=str(train), val_fraction=0.2), out)
    assert meta.kind == "series" and meta.class_names == ("a", "b")
    assert meta.split_sizes == {"train": 16, "val": 4, "test": 6}  # published test kept
    assert meta.input_shape == (2, 6)
    assert meta.length_stats == {"min": 3, "median": 4, "max": 6}
    assert load_meta(out) == meta
    splits = [load_split(name, out) for name in ("train", "val", "test")]
    originals = {tuple(np.float32(s[0][:3])): s for s, _ in varying(20) + varying(6, offset=1)}
    for split in splits:
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (2, 6)
        padding = np.broadcast_to(split.mask()[:, None, :] == 0, split.x.shape)
        assert np.all(split.x[padding] == 0.0)
        for row, length in zip(split.x, split.lengths, strict=True):
            source = originals[tuple(row[0, :3])]
            assert length == len(source[0])
            np.testing.assert_array_equal(row[:, :length], np.float32(source))  # raw values
    train_split = splits[0]
    real = [row[:, :length] for row, length in zip(train_split.x, train_split.lengths, strict=True)]
    steps = np.concatenate(real, axis=1).astype(np.float64)
    np.testing.assert_allclose(meta.mean, steps.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(meta.std, steps.std(axis=1), atol=1e-6)
    assert meta.mean[1] - meta.mean[0] == pytest.approx(10.0)  # padding left out


def test_folder_with_a_pair_and_a_single_pool_file(tmp_path):
    pair(tmp_path / "ts", varying(20), varying(6))
    meta = prepare(series_params(path=str(tmp_path / "ts")), tmp_path / "a")
    assert meta.split_sizes["test"] == 6
    pool = ts_file(tmp_path / "pool.ts", varying(30, channels=1))
    meta = prepare(series_params(path=str(pool)), tmp_path / "b")
    assert meta.split_sizes == {"train": 21, "val": 3, "test": 6}
    assert meta.input_shape == (1, 6)


def test_trailing_nan_is_padding_and_noted(tmp_path):
    cases = [([[1.0 + i, 2.0, 3.0, "NaN", "NaN"]], "ab"[i % 2]) for i in range(10)]
    cases += [([[1.0, 2.0, 3.0, 4.0, 5.0 + i]], "ab"[i % 2]) for i in range(10)]
    pool = ts_file(tmp_path / "pool.ts", cases)
    out = tmp_path / "out"
    meta = prepare(series_params(path=str(pool)), out)
    assert meta.conversions == ("read trailing NaN steps of 10 series as padding",)
    assert meta.length_stats == {"min": 3, "median": 4, "max": 5}
    for name in ("train", "val", "test"):
        split = load_split(name, out)
        assert not np.isnan(split.x).any()
        assert set(split.lengths.tolist()) <= {3, 5}


def test_same_params_same_fingerprint(tmp_path):
    train = pair(tmp_path / "ts", varying(20), varying(6))
    first = prepare(series_params(path=str(train)), tmp_path / "a")
    again = prepare(series_params(path=str(train)), tmp_path / "b")
    other = prepare(series_params(path=str(train), seed=3), tmp_path / "c")
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_gunpoint_is_bundled(tmp_path):
    meta = prepare(series_params(dataset="GunPoint"), tmp_path / "out")
    assert meta.class_names == ("1", "2")
    assert meta.input_shape == (1, 150)
    assert meta.split_sizes["train"] + meta.split_sizes["val"] == 50
    assert meta.split_sizes["test"] == 150
    assert meta.length_stats == {"min": 150, "median": 150, "max": 150}


def test_japanese_vowels_is_multivariate_of_varying_length(tmp_path):
    out = tmp_path / "out"
    meta = prepare(series_params(dataset="JapaneseVowels"), out)
    assert meta.class_names == tuple(str(i) for i in range(1, 10))
    assert meta.input_shape == (12, 29) and len(meta.mean) == len(meta.std) == 12
    assert meta.split_sizes == {"train": 243, "val": 27, "test": 370}
    assert meta.length_stats["min"] == 7 and meta.length_stats["max"] == 29
    test = load_split("test", out)
    assert len(np.unique(test.lengths)) > 10


def test_max_per_class_caps_series(tmp_path):
    meta = prepare(series_params(dataset="GunPoint", max_per_class=3), tmp_path / "out")
    assert meta.split_sizes == {"train": 6, "val": 5, "test": 6}  # val: 5 in all


# ---------------------------------------------------------------- bad input


def test_unknown_bundled_set_lists_the_bundled_ones(tmp_path):
    with pytest.raises(
        StageError, match=r"'Gunpoint' is not .*\(bundled: .*GunPoint.*JapaneseVowels"
    ):
        prepare(series_params(dataset="Gunpoint"), tmp_path / "out")


def test_nan_inside_a_series(tmp_path):
    cases = varying(10, channels=2)
    cases[3] = ([[1.0, 2.0, 3.0], [1.0, "NaN", 3.0]], "b")
    pool = ts_file(tmp_path / "pool.ts", cases)
    with pytest.raises(StageError, match=r"pool.ts: series 4 has NaN at channel 2, step 2"):
        prepare(series_params(path=str(pool)), tmp_path / "out")


def test_channel_count_mismatch_between_files(tmp_path):
    train = pair(tmp_path / "ts", varying(10, channels=2), varying(4, channels=3))
    with pytest.raises(StageError, match=r"Tiny_TEST.ts has 3 channels, .*Tiny_TRAIN.ts has 2"):
        prepare(series_params(path=str(train)), tmp_path / "out")


def test_class_only_in_test(tmp_path):
    test = varying(4) + [([[1.0, 2.0], [3.0, 4.0]], "c")]
    train = pair(tmp_path / "ts", varying(10), test)
    (train.parent / "Tiny_TEST.ts").write_text(
        (train.parent / "Tiny_TEST.ts")
        .read_text()
        .replace("@classLabel true a b", "@classLabel true a b c")
    )
    with pytest.raises(StageError, match=r"class 'c' of .*Tiny_TEST.ts is not in train"):
        prepare(series_params(path=str(train)), tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("@classLabel true a b\n@data\n1,2,3:4,5:a\n", r"cannot read .*bad.ts as a .ts file: .*"),
        ("just some text\n", r"bad.ts holds no series"),
        (
            "@classLabel false\n@targetLabel true\n@data\n1,2,3:1.5\n",
            r"bad.ts has no class labels",
        ),
    ],
)
def test_unparseable_ts_names_the_file(tmp_path, text, message):
    bad = tmp_path / "bad.ts"
    bad.write_text(text)
    with pytest.raises(StageError, match=message):
        prepare(series_params(path=str(bad)), tmp_path / "out")


def test_bad_paths(tmp_path):
    def fails(message: str, **kw) -> None:
        with pytest.raises(StageError, match=message):
            prepare(series_params(**kw), tmp_path / "out")

    fails("series needs data.dataset")
    fails("not both", dataset="GunPoint", path="x.ts")
    fails("not found", path=str(tmp_path / "absent.ts"))
    (tmp_path / "x.csv").write_text("1,2\n")
    fails(r"must be .ts", path=str(tmp_path / "x.csv"))
    ts_file(tmp_path / "Solo_TRAIN.ts", varying(4))
    fails(r"Solo_TRAIN.ts has no Solo_TEST.ts beside it", path=str(tmp_path / "Solo_TRAIN.ts"))
    (tmp_path / "empty").mkdir()
    fails(r"must hold one <Name>_TRAIN.ts file, found: none", path=str(tmp_path / "empty"))


def test_cli_prints_one_line_for_bad_input(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: series\n  dataset: NoSuchSet\n")
    result = run_prepare(params, tmp_path / "o")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: data.dataset 'NoSuchSet' is not a classification set")
    assert not (tmp_path / "o").exists()
