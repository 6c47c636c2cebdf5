import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import load_meta, load_split
from pipeline.errors import StageError
from pipeline.params import DataParams
from pipeline.prepare import prepare
from pipeline.sources import md5_file
from tests.conftest import run_prepare, write_imagefolder


def test_digits_default_is_stratified_and_described(tmp_path):
    meta = prepare(DataParams(), tmp_path / "out")
    assert meta.input_shape == (1, 32, 32)  # the source's own size: its 8x8 scans upscaled
    assert meta.conversions == (
        "resized every image from 8x8 to 32x32 (this source's size; data.image_size changes it)",
    )
    assert meta.class_names == tuple(str(d) for d in range(10))
    assert sum(meta.split_sizes.values()) == 1797
    assert meta.split_sizes["test"] == 360
    test = load_split("test", tmp_path / "out")
    assert test.x.dtype == np.uint8 and test.x.shape == (360, 1, 32, 32)
    counts = np.bincount(test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert 0.0 < meta.mean[0] < 1.0 and meta.std[0] > 0.0
    assert (
        json.loads((tmp_path / "out" / "meta.json").read_text())["fingerprint"] == meta.fingerprint
    )


def test_same_params_same_fingerprint_other_seed_other_split(tmp_path):
    first = prepare(DataParams(), tmp_path / "a")
    again = prepare(DataParams(), tmp_path / "b")
    other = prepare(DataParams(seed=1), tmp_path / "c")
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_imagefolder_with_splits_converts_channels_and_size(tmp_path):
    root = write_imagefolder(tmp_path / "img", per_class=10, size=20)
    meta = prepare(
        DataParams(
            source="imagefolder", path=str(root), channels=3, image_size=24, val_fraction=0.2
        ),
        tmp_path / "out",
    )
    assert meta.class_names == ("cat", "dog", "owl")
    assert meta.input_shape == (3, 24, 24)
    assert meta.split_sizes == {"train": 24, "val": 6, "test": 30}
    assert meta.conversions == ("resized 60 images from 20x20 to 24x24 (data.image_size)",)


def test_imagefolder_flat_layout_keeps_the_images_own_channels_and_size(tmp_path):
    root = write_imagefolder(tmp_path / "img", per_class=10, splits=None, suffix=".jpg")
    meta = prepare(DataParams(source="imagefolder", path=str(root)), tmp_path / "out")
    assert meta.input_shape == (3, 20, 20)  # JPEGs were saved as RGB
    assert sum(meta.split_sizes.values()) == 30
    assert meta.conversions == ()


def test_every_conversion_is_printed_and_recorded(tmp_path):
    from PIL import Image

    root = write_imagefolder(tmp_path / "img", per_class=10)  # RGB PNGs, 20x20
    Image.new("L", (30, 30)).save(root / "train" / "cat" / "big.png")
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: imagefolder\n  path: {root}\n  image_size: 20\n")
    out = tmp_path / "out"
    result = run_prepare(params, out)
    assert result.returncode == 0, result.stderr
    notes = [
        "converted 1 images from grayscale to RGB (the first image's)",
        "resized 1 images from 30x30 to 20x20 (data.image_size)",
    ]
    assert [f"imagefolder: {note}" for note in notes] == result.stdout.splitlines()[:2]
    assert json.loads((out / "meta.json").read_text())["conversions"] == notes


def test_max_per_class_caps_every_split(tmp_path):
    meta = prepare(DataParams(max_per_class=5), tmp_path / "out")
    assert meta.split_sizes == {"train": 50, "val": 50, "test": 50}


# ---------------------------------------------------------------- cifar10


def cifar_archive(path: Path, per_batch: int = 20, evil: bool = False) -> Path:
    rng = np.random.default_rng(0)

    def member(name: str, payload: object) -> tuple[str, bytes]:
        return f"cifar-10-batches-py/{name}", pickle.dumps(payload, protocol=2)

    def batch(n: int, offset: int) -> dict:
        labels = [(i + offset) % 10 for i in range(n)]
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": labels}

    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    members = [member("batches.meta", {b"label_names": names})]
    members += [member(f"data_batch_{i}", batch(per_batch, i)) for i in range(1, 6)]
    members.append(member("test_batch", batch(per_batch, 0) if not evil else Path("x")))
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_archive_is_read_in_the_official_layout(tmp_path):
    archive = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    meta = prepare(DataParams(source="cifar10", path=str(archive)), tmp_path / "out")
    assert meta.class_names[0] == "airplane" and len(meta.class_names) == 10
    assert meta.input_shape == (3, 32, 32) and meta.conversions == ()  # colour kept
    assert meta.split_sizes["test"] == 20
    assert meta.split_sizes["train"] + meta.split_sizes["val"] == 100


def test_cifar10_refuses_pickled_code(tmp_path):
    archive = cifar_archive(tmp_path / "evil.tar.gz", evil=True)
    with pytest.raises(StageError, match="refusing to load pathlib"):
        prepare(DataParams(source="cifar10", path=str(archive)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cifar10_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(StageError, match="not a readable .tar.gz"):
        prepare(DataParams(source="cifar10", path=str(bad)), tmp_path / "out")


def test_md5_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"tensorferry" * 1000)
    assert md5_file(path) == hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(StageError, match="is not a directory"):
        prepare(DataParams(source="imagefolder", path=str(tmp_path / "nope")), tmp_path / "out")
    with pytest.raises(StageError, match="not found"):
        prepare(DataParams(source="cifar10", path=str(tmp_path / "nope.tgz")), tmp_path / "out")


def test_corrupt_image_is_named(tmp_path):
    root = write_imagefolder(tmp_path / "img")
    bad = root / "train" / "dog" / "005.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(StageError, match=f"cannot decode image {bad}"):
        prepare(DataParams(source="imagefolder", path=str(root)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_class_folder(tmp_path):
    root = write_imagefolder(tmp_path / "img")
    for f in (root / "test" / "owl").iterdir():
        f.unlink()
    with pytest.raises(StageError, match=r"class folder .*test/owl has no PNG or JPEG"):
        prepare(DataParams(source="imagefolder", path=str(root)), tmp_path / "out")


def test_class_in_train_but_not_test(tmp_path):
    root = write_imagefolder(tmp_path / "img")
    (root / "train" / "emu").mkdir()
    (root / "train" / "owl").rename(root / "train" / "emu" / "x")
    (root / "train" / "emu" / "x").rename(tmp_path / "moved")
    write_imagefolder(tmp_path / "tmp2", classes=("emu",), splits=("train",))
    for f in (tmp_path / "tmp2" / "train" / "emu").iterdir():
        f.rename(root / "train" / "emu" / f.name)
    with pytest.raises(StageError, match="class 'emu' is in train but not in test"):
        prepare(DataParams(source="imagefolder", path=str(root)), tmp_path / "out")


def test_mixed_sizes_need_image_size(tmp_path):
    root = write_imagefolder(tmp_path / "img")
    from PIL import Image

    Image.new("L", (30, 30)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(StageError, match="set data.image_size"):
        prepare(DataParams(source="imagefolder", path=str(root)), tmp_path / "out")
    meta = prepare(DataParams(source="imagefolder", path=str(root), image_size=20), tmp_path / "o")
    assert meta.input_shape == (3, 20, 20)


def test_failed_run_keeps_the_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    good = prepare(DataParams(max_per_class=5), out)
    with pytest.raises(StageError):
        prepare(DataParams(source="imagefolder", path=str(tmp_path / "nope")), out)
    assert load_meta(out) == good
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp leftovers
