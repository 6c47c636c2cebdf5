"""Shared fixtures: small real data sets made on the fly (no downloads, no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests run on 2-core CI machines; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pattern_image(label: int, index: int, size: int = 20, channels: int = 1) -> np.ndarray:
    """A noisy bar whose position encodes the class: easy to learn, not trivial."""
    rng = np.random.default_rng(label * 10_000 + index)
    img = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
    start = 2 + label * 4 + int(rng.integers(0, 2))
    img[:, start : start + 3] = 230
    return np.repeat(img[None], channels, axis=0)


def write_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "owl"),
    per_class: int = 12,
    splits: tuple[str, ...] | None = ("train", "test"),
    size: int = 20,
    suffix: str = ".png",
) -> Path:
    """ROOT/<split>/<class>/*.png (or ROOT/<class>/* when splits is None)."""
    from PIL import Image

    for split in splits or (None,):
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = pattern_image(label, i + (1000 if split == "test" else 0), size)[0]
                Image.fromarray(pixels, "L").convert("RGB").save(folder / f"{i:03d}{suffix}")
    return root


def write_prepared(directory: Path, per_class: int = 40, size: int = 20) -> Path:
    """A prepared-data directory in the stage's own format, via the prepare stage."""
    from pipeline.params import DataParams
    from pipeline.prepare import prepare

    root = write_imagefolder(directory.parent / "images", per_class=per_class, size=size)
    prepare(DataParams(source="imagefolder", path=str(root), channels=1), directory)
    return directory


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


def run_prepare(params: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m pipeline.prepare --params PARAMS --out OUT`, its output captured."""
    command = [sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True)
