"""Data sources for the prepare stage: the image ones return uint8 NCHW images with labels.

A source yields either ready-made splits (``train``, often ``test``, sometimes ``val``) or
one pool (``all``) that the prepare stage splits itself. The sequence sources (text_data,
series_data) yield object arrays of one row each, encoded only after the split; the
tabular ones (tabular_data, user_data) yield float64 [N, F] rows whose categorical
columns are still coded over every split's categories, re-coded from train after it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.dataset import Column, Split
from pipeline.errors import StageError
from pipeline.params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# scikit-learn's digits are 8x8, below what the convolutional models take (seed_cnn needs
# 18x18), so this source presents them at 32x32 unless data.image_size says otherwise.
DIGITS_SIZE = 32
GRAY_MODES = ("1", "L", "I", "I;16", "F")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CACHE = Path.home() / ".cache" / "tensorferry" / "cifar-10-python.tar.gz"


@dataclass(frozen=True)
class RawData:
    class_names: tuple[str, ...]  # () for regression
    # name -> (x, y); y: int64 labels or float32 targets (regression); x: uint8 NCHW
    # images, an object array of texts or series, or float64 [N, F] tabular rows
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    conversions: tuple[str, ...] = ()  # what was done to the source's data, for the log
    kind: str = "image"  # one of dataset.LAYOUTS
    task: str = "classification"  # one of dataset.TASKS
    # tabular: each x column's name and type; a categorical column's categories are every
    # split's (its x holds indices into them, NaN for a missing cell) until encoding
    columns: tuple[Column, ...] = ()


@dataclass(frozen=True)
class Encoded:
    """Split rows in the prepared layout of their kind, with what meta.json says of them."""

    splits: dict[str, Split]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    vocab_size: int = 0
    files: dict[str, str] = field(default_factory=dict)  # more files for the prepared dir
    conversions: tuple[str, ...] = ()
    columns: tuple[Column, ...] = ()  # tabular: as the train split describes them


def load_source(params: DataParams) -> RawData:
    loaders: dict[str, Callable[[DataParams], RawData]] = {
        "digits": load_digits,
        "cifar10": load_cifar10,
        "imagefolder": load_imagefolder,
    }
    return loaders[params.source](params)


# ---------------------------------------------------------------- digits


def load_digits(params: DataParams) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    size, size_from = params.image_size, "data.image_size"
    if size is None:
        size, size_from = DIGITS_SIZE, "this source's size; data.image_size changes it"
    x, conversions = conform(pixels, params.channels, size, size_from)
    names = tuple(str(n) for n in bunch.target_names)
    return RawData(names, {"all": (x, bunch.target.astype(np.int64))}, conversions)


# ---------------------------------------------------------------- cifar10


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 ships pickles; allow only the numpy reconstruction they need, no code."""

    ALLOWED = {
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles spell bytes this way
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_member(archive: tarfile.TarFile, name: str) -> dict:
    try:
        member = archive.extractfile(f"cifar-10-batches-py/{name}")
    except KeyError:
        raise StageError(f"CIFAR-10 archive lacks cifar-10-batches-py/{name}") from None
    assert member is not None
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(member.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise StageError(f"CIFAR-10 member {name} is corrupt: {exc}") from None


def _cifar_batch(archive: tarfile.TarFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_member(archive, name)
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(params: DataParams) -> RawData:
    """The official python archive: data_batch_1..5 are train, test_batch is test."""
    path = Path(params.path) if params.path else download_cifar10()
    if not path.is_file():
        raise StageError(f"data.path {path} not found (expected cifar-10-python.tar.gz)")
    try:
        with tarfile.open(path, "r:gz") as archive:
            meta = _read_cifar_member(archive, "batches.meta")
            train = [_cifar_batch(archive, f"data_batch_{i}") for i in range(1, 6)]
            test = _cifar_batch(archive, "test_batch")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise StageError(f"{path} is not a readable .tar.gz archive: {exc}") from None
    names = tuple(n.decode() for n in meta[b"label_names"])
    x_train, conversions = conform(
        np.concatenate([x for x, _ in train]), params.channels, params.image_size
    )
    x_test, _ = conform(test[0], params.channels, params.image_size)
    y_train = np.concatenate([y for _, y in train])
    return RawData(names, {"train": (x_train, y_train), "test": (x_test, test[1])}, conversions)


def md5_file(path: Path) -> str:
    digest = hashlib.md5()  # the checksum CIFAR-10's authors publish
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(target: Path = CIFAR10_CACHE) -> Path:
    """Fetch the archive once into the user cache and verify the published MD5."""
    if target.is_file() and md5_file(target) == CIFAR10_MD5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(CIFAR10_URL, partial)
    except OSError as exc:
        raise StageError(
            f"cannot download CIFAR-10 from {CIFAR10_URL} ({exc}); "
            "download it yourself and set data.path"
        ) from None
    actual = md5_file(partial)
    if actual != CIFAR10_MD5:
        partial.unlink()
        raise StageError(f"CIFAR-10 download has MD5 {actual}, expected {CIFAR10_MD5}")
    partial.replace(target)
    return target


# ---------------------------------------------------------------- imagefolder


def load_imagefolder(params: DataParams) -> RawData:
    """ROOT/<split>/<class>/*.png|jpg when ROOT/train exists, else ROOT/<class>/*."""
    if not params.path:
        raise StageError("data.path must name the image folder root for source imagefolder")
    root = Path(params.path)
    if not root.is_dir():
        raise StageError(f"data.path {root} is not a directory")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and "test" not in split_dirs:
        raise StageError(f"{root} has a train/ folder but no test/ folder")
    split_dirs = split_dirs or {"all": root}
    class_names = folder_class_names(split_dirs)
    decoder = _ImageDecoder(params.channels, params.image_size)
    splits = {
        split: _read_class_folders(folder, class_names, decoder)
        for split, folder in split_dirs.items()
    }
    return RawData(class_names, splits, decoder.conversions())


def folder_class_names(split_dirs: dict[str, Path]) -> tuple[str, ...]:
    per_split = {
        split: sorted(p.name for p in folder.iterdir() if p.is_dir())
        for split, folder in split_dirs.items()
    }
    reference_split = "train" if "train" in per_split else "all"
    names = per_split[reference_split]
    if not names:
        raise StageError(f"{split_dirs[reference_split]} has no class folders")
    for split, found in per_split.items():
        for missing in sorted(set(names) - set(found)):
            raise StageError(f"class {missing!r} is in {reference_split} but not in {split}")
        for extra in sorted(set(found) - set(names)):
            raise StageError(f"class {extra!r} is in {split} but not in {reference_split}")
    return tuple(names)


def _read_class_folders(
    folder: Path, class_names: tuple[str, ...], decoder: _ImageDecoder
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise StageError(f"class folder {folder / name} has no PNG or JPEG images")
        images += [decoder(p) for p in files]
        labels += [label] * len(files)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


class _ImageDecoder:
    """Decode one file to uint8 CHW with one channel count and size for the whole set.

    Without data.channels the first image's channel count holds for the set; without
    data.image_size, so does its size (a different one is an error). Every conversion is
    counted, so the stage can say what it did to the user's images.
    """

    def __init__(self, channels: int | None, size: int | None) -> None:
        self.channels = channels
        self.channels_from = "data.channels" if channels else "the first image's"
        self.resize = size is not None
        self.size: tuple[int, int] | None = (size, size) if size else None
        self.converted: Counter[str] = Counter()

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                native = _native_channels(image.mode)
                self.channels = self.channels or native
                converted = image.convert("L" if self.channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise StageError(f"cannot decode image {path}: {exc}") from None
        if native != self.channels:
            self.converted[("converted", _CHANNELS[native], _CHANNELS[self.channels])] += 1
        self.size = self.size or converted.size
        if converted.size != self.size:
            if not self.resize:
                raise StageError(
                    f"image {path} is {converted.size[0]}x{converted.size[1]}, others are "
                    f"{self.size[0]}x{self.size[1]}; set data.image_size to resize"
                )
            self.converted[("resized", _size(converted.size), _size(self.size))] += 1
            converted = converted.resize(self.size, Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.uint8)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def conversions(self) -> tuple[str, ...]:
        why = {"converted": self.channels_from, "resized": "data.image_size"}
        return tuple(
            f"{verb} {count} images from {native} to {target} ({why[verb]})"
            for (verb, native, target), count in sorted(self.converted.items())
        )


_CHANNELS = {1: "grayscale", 3: "RGB"}


def _native_channels(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------- shared


def conform(
    x: np.ndarray, channels: int | None, size: int | None, size_from: str = "data.image_size"
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Convert uint8 NCHW images to the channel count and square size asked for (None keeps
    the images' own); returns them and a note per conversion applied."""
    n, c, h, w = x.shape
    target_c = channels or c
    notes = []
    if target_c != c:
        notes.append(
            f"converted every image from {_CHANNELS[c]} to {_CHANNELS[target_c]} (data.channels)"
        )
    if size is not None and (h, w) != (size, size):
        notes.append(
            f"resized every image from {_size((w, h))} to {_size((size, size))} ({size_from})"
        )
    if not notes:
        return x, ()
    from PIL import Image

    mode_in = "L" if c == 1 else "RGB"
    mode_out = "L" if target_c == 1 else "RGB"
    out = np.empty((n, target_c, size or h, size or w), dtype=np.uint8)
    for i in range(n):
        pixels = x[i, 0] if c == 1 else x[i].transpose(1, 2, 0)
        image = Image.fromarray(pixels, mode_in).convert(mode_out)
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.uint8)
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out, tuple(notes)
