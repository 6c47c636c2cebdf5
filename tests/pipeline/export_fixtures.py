"""Tiny, separable prepared data and a briefly trained checkpoint for export/engine tests.

Three classes of 1x20x20 images (horizontal stripes, vertical stripes, a bright square)
with noise: a seed_cnn learns them in a few dozen steps, so accuracies mean something.
``shared_export()`` exports once per test session (torch's first export in a process
costs ~10 s) and both test modules read from it; tests that modify files copy them.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import Checkpoint, save_checkpoint
from pipeline.dataset import Meta
from pipeline.models import Classifier, ModelSpec

CLASS_NAMES = ("horizontal", "vertical", "square")
SHAPE = (1, 20, 20)
SIZES = {"train": 240, "val": 30, "test": 90}


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(60, 25, SHAPE[1:])
    phase = rng.integers(0, 4)
    if label == 0:
        img[phase::4, :] += 150
    elif label == 1:
        img[:, phase::4] += 150
    else:
        top, left = rng.integers(2, 12, size=2)
        img[top : top + 7, left : left + 7] += 150
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def make_prepared(directory: Path, seed: int = 0) -> Meta:
    """Write {train,val,test}.npz and meta.json in the prepare stage's format."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for split, size in SIZES.items():
        y = np.arange(size, dtype=np.int64) % len(CLASS_NAMES)
        rng.shuffle(y)
        x = np.stack([_image(int(label), rng) for label in y])
        np.savez(directory / f"{split}.npz", x=x, y=y)
        digest.update(x.tobytes())
        if split == "train":
            scaled = x.astype(np.float64) / 255
            mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    meta = Meta(
        class_names=CLASS_NAMES,
        input_shape=SHAPE,
        mean=tuple(round(m, 6) for m in mean),
        std=tuple(round(s, 6) for s in std),
        split_sizes=dict(SIZES),
        fingerprint=digest.hexdigest(),
        source={"synthetic": "stripes-and-squares", "seed": seed},
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


def train_checkpoint(data_dir: Path, path: Path, steps: int = 60, name: str = "seed_cnn") -> Path:
    """A checkpoint of ``name`` trained for ``steps`` Adam steps on the train split."""
    meta = json.loads((data_dir / "meta.json").read_text())
    spec = ModelSpec(name, SHAPE, len(CLASS_NAMES), hidden=(32,))
    torch.manual_seed(0)
    model = Classifier(spec, meta["mean"], meta["std"])
    with np.load(data_dir / "train.npz") as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = Checkpoint(
        spec=spec,
        class_names=CLASS_NAMES,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        state_dict=model.eval().state_dict(),
        data_fingerprint=meta["fingerprint"],
        params={"train": {"steps": steps}},
        params_hash="test-params-hash",
    )
    save_checkpoint(checkpoint, path)
    return path


@dataclasses.dataclass(frozen=True)
class SharedExport:
    root: Path
    data_dir: Path
    checkpoint: Path
    onnx_dir: Path
    report_path: Path
    report: dict[str, Any]

    def variant(self, name: str) -> Path:
        return self.onnx_dir / {"fp32": "model.onnx"}.get(name, f"model.{name}.onnx")


@functools.cache
def shared_export() -> SharedExport:
    """Data, checkpoint and all three exported variants, made once per test session."""
    from pipeline.export import export_model
    from pipeline.params import ExportParams

    root = Path(tempfile.mkdtemp(prefix="tensorferry-export-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data_dir = root / "data"
    make_prepared(data_dir)
    checkpoint = train_checkpoint(data_dir, root / "checkpoint.pt")
    params = ExportParams(calibration_samples=96)
    onnx_dir, report_path = root / "onnx", root / "export.json"
    report = export_model(params, checkpoint, data_dir, onnx_dir, report_path)
    return SharedExport(root, data_dir, checkpoint, onnx_dir, report_path, report)
