"""Tiny prepared tabular (and image regression) data with stand-in models for export tests.

The stand-ins have the shape the model contract promises (tab-spec: "The model contract"),
built here because pipeline.models' own TabularModel lives on another branch: raw float32
[N, F] in, NaN filled, numeric columns standardised, categorical ones one-hot encoded, a
Linear/BatchNorm/ReLU MLP, and logits [N, K] or, for regression, ``head * target_std +
target_mean`` [N] in target units.

Tabular data: three numeric columns (one, ``income``, with raw values above fp16's 65504)
and two categorical ones, 8% of cells missing under ``impute``, a few test codes unseen
(-1). Classes are thirds of a score of those columns with a margin left out around each
boundary, so a briefly trained MLP is confident; the regression target is that score
around 150000 (fp16 cannot hold it) plus noise. Image regression: 1x8x8 images whose
target is their mean brightness plus 1000. Series regression: the sequence fixtures'
two-channel series, whose target is 100 times channel 1's mean over its real steps.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.dataset import (
    CATEGORICAL,
    NUMERIC,
    SPLITS,
    Column,
    Meta,
    Split,
    load_split,
    save_split,
)
from pipeline.params import ExportParams
from tests.pipeline.export_sequence_fixtures import export_standin

CLASS_NAMES = ("low", "mid", "high")
SIZES = {"train": 600, "val": 60, "test": 300}
NUMERIC_COLUMNS = {"age": (40.0, 10.0), "income": (80_000.0, 30_000.0), "rate": (0.5, 0.2)}
CATEGORIES = {"color": ("blue", "green", "red"), "size": ("L", "S")}
MISSING = 0.08
TARGET_MEAN, TARGET_SCALE = 150_000.0, 20_000.0
IMAGE_SHAPE = (1, 8, 8)
IMAGE_SIZES = {"train": 240, "val": 24, "test": 96}


# Data


def _raw_columns(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    values = {name: rng.normal(m, s, rows) for name, (m, s) in NUMERIC_COLUMNS.items()}
    values |= {name: rng.integers(0, len(c), rows).astype(float) for name, c in CATEGORIES.items()}
    return values


def _score(values: dict[str, np.ndarray]) -> np.ndarray:
    z = {name: (values[name] - m) / s for name, (m, s) in NUMERIC_COLUMNS.items()}
    red, large = values["color"] == 2, values["size"] == 0
    return z["income"] + 1.2 * red - 0.8 * large + 0.5 * z["age"]


def _rows(rng: np.random.Generator, size: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``size`` rows: for classification, drawn until enough lie clear of the boundaries."""
    values = _raw_columns(rng, size * 3)
    score = _score(values)
    if task == "classification":
        keep = np.flatnonzero(np.minimum(np.abs(score + 0.45), np.abs(score - 0.45)) > 0.15)
        index = keep[:size]
        y = np.digitize(score[index], [-0.45, 0.45]).astype(np.int64)
    else:
        index = np.arange(size)
        noise = rng.normal(0, 0.1, size)
        y = (TARGET_MEAN + TARGET_SCALE * (score[index] + noise)).astype(np.float32)
    names = [*NUMERIC_COLUMNS, *CATEGORIES]
    x = np.stack([values[name][index] for name in names], axis=1).astype(np.float32)
    return x, y


def _columns(train_x: np.ndarray, impute: bool) -> tuple[Column, ...]:
    columns = []
    for i, name in enumerate(NUMERIC_COLUMNS):
        values = train_x[:, i][~np.isnan(train_x[:, i])]
        fill = float(np.median(values)) if impute else None
        columns.append(Column(name, NUMERIC, (), float(values.mean()), float(values.std()), fill))
    for i, (name, categories) in enumerate(CATEGORIES.items(), start=len(NUMERIC_COLUMNS)):
        codes = train_x[:, i][~np.isnan(train_x[:, i])].astype(int)
        fill = float(np.bincount(codes).argmax()) if impute else None
        columns.append(Column(name, CATEGORICAL, categories, fill=fill))
    return tuple(columns)


def make_tabular(directory: Path, task: str = "classification", impute: bool = True) -> Meta:
    """Write {train,val,test}.npz and meta.json in the prepare stage's tabular format."""
    rng = np.random.default_rng(0 if task == "classification" else 1)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {name: _rows(rng, size, task) for name, size in SIZES.items()}
    if impute:
        for x, _ in splits.values():
            x[rng.random(x.shape) < MISSING] = np.nan
    test_x = splits["test"][0]
    test_x[:4, len(NUMERIC_COLUMNS)] = -1  # colours the train split never had
    digest = hashlib.sha256()
    for name, (x, y) in splits.items():
        save_split(directory / f"{name}.npz", Split(x, y))
        digest.update(x.tobytes())
    train_y = splits["train"][1]
    regression = task == "regression"
    meta = Meta(
        class_names=() if regression else CLASS_NAMES,
        input_shape=(len(NUMERIC_COLUMNS) + len(CATEGORIES),),
        mean=(),
        std=(),
        split_sizes=dict(SIZES),
        fingerprint=digest.hexdigest(),
        source={"synthetic": f"tabular-{task}"},
        kind="tabular",
        task=task,
        columns=_columns(splits["train"][0], impute),
        target_mean=float(train_y.mean()) if regression else 0.0,
        target_std=float(train_y.std()) if regression else 1.0,
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


def make_image_regression(directory: Path) -> Meta:
    """1x8x8 uint8 images whose float32 target is their mean brightness + 1000 + noise."""
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, size in IMAGE_SIZES.items():
        level = rng.integers(20, 220, (size, 1, 1, 1))
        x = np.clip(level + rng.normal(0, 20, (size, *IMAGE_SHAPE)), 0, 255).astype(np.uint8)
        noise = rng.normal(0, 4, size)
        y = (x.reshape(size, -1).mean(axis=1) + 1000 + noise).astype(np.float32)
        save_split(directory / f"{name}.npz", Split(x, y))
        digest.update(x.tobytes())
        if name == "train":
            scaled, train_y = x / 255.0, y
    meta = Meta(
        class_names=(),
        input_shape=IMAGE_SHAPE,
        mean=(round(float(scaled.mean()), 6),),
        std=(round(float(scaled.std()), 6),),
        split_sizes=dict(IMAGE_SIZES),
        fingerprint=digest.hexdigest(),
        source={"synthetic": "brightness"},
        task="regression",
        target_mean=float(train_y.mean()),
        target_std=float(train_y.std()),
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


def make_series_regression(directory: Path) -> Meta:
    """The sequence fixtures' series with float32 targets: 100 x channel 1's mean + noise."""
    from tests.pipeline.export_sequence_fixtures import make_prepared

    meta = make_prepared(directory, "series")
    rng = np.random.default_rng(3)
    targets = {}
    for name in SPLITS:
        split = load_split(name, directory, meta)
        real = split.mask().astype(np.float32)
        level = (split.x[:, 1] * real).sum(axis=1) / real.sum(axis=1)
        targets[name] = (100 * level + rng.normal(0, 5, len(level))).astype(np.float32)
        save_split(directory / f"{name}.npz", Split(split.x, targets[name], split.lengths))
    meta = dataclasses.replace(
        meta,
        class_names=(),
        task="regression",
        target_mean=float(targets["train"].mean()),
        target_std=float(targets["train"].std()),
        source={"synthetic": "series-level"},
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


# Models


class TabularPreprocess(nn.Module):
    """NaN -> fill, numeric columns standardised, categorical ones one-hot (any code outside
    0..K-1 all zeros), in plain ops: what the spec's TabularPreprocess promises."""

    def __init__(self, columns: tuple[Column, ...]) -> None:
        super().__init__()
        numeric = [i for i, c in enumerate(columns) if c.type == NUMERIC]
        fill = [np.nan if c.fill is None else c.fill for c in columns]
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32))
        self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long))
        self.register_buffer("mean", torch.tensor([columns[i].mean for i in numeric]))
        self.register_buffer("std", torch.tensor([columns[i].std or 1.0 for i in numeric]))
        self.categorical = [
            (i, len(c.categories)) for i, c in enumerate(columns) if c.type == CATEGORICAL
        ]
        self.width = len(numeric) + sum(k for _, k in self.categorical)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.fill, x)
        parts = [(x.index_select(1, self.numeric) - self.mean) / self.std]
        for index, size in self.categorical:
            codes = x[:, index : index + 1]
            parts.append((codes == torch.arange(size, dtype=x.dtype)).to(x.dtype))
        return torch.cat(parts, dim=1)


def mlp(width: int, hidden: tuple[int, ...], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(0.1)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, outputs))


class Unstandardise(nn.Module):
    """[N, 1] standardised -> [N] in target units, as the regression unit ends."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0] * self.std + self.mean


class TabularNet(nn.Module):
    def __init__(self, meta: Meta, hidden: tuple[int, ...] = (32, 16)) -> None:
        super().__init__()
        self.preprocess = TabularPreprocess(meta.columns)
        self.mlp = mlp(self.preprocess.width, hidden, meta.num_outputs)
        regression = meta.is_regression
        self.tail = Unstandardise(meta.target_mean, meta.target_std) if regression else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.preprocess(features))
        return out if self.tail is None else self.tail(out)


class ImageRegressor(nn.Module):
    """uint8 pixels -> standardised -> a conv and a linear layer -> brightness + 1000."""

    def __init__(self, meta: Meta) -> None:
        super().__init__()
        self.mean, self.std = meta.mean[0], meta.std[0]
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 1)
        self.tail = Unstandardise(meta.target_mean, meta.target_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255 - self.mean) / self.std
        return self.tail(self.head(torch.relu(self.conv(x)).flatten(1)))


class SeriesRegressor(nn.Module):
    """Standardise per channel, linear + ReLU per step, masked mean, linear, target units."""

    def __init__(self, meta: Meta, width: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(meta.mean).view(1, -1, 1))
        self.register_buffer("std", torch.tensor(meta.std).view(1, -1, 1))
        self.step = nn.Linear(len(meta.mean), width)
        self.head = nn.Linear(width, 1)
        self.tail = Unstandardise(meta.target_mean, meta.target_std)

    def forward(self, series: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.step(((series - self.mean) / self.std).transpose(1, 2)))
        weights = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.tail(self.head(pooled))


def standin(meta: Meta) -> nn.Module:
    torch.manual_seed(0)
    if meta.kind == "series":
        return SeriesRegressor(meta)
    return TabularNet(meta) if meta.kind == "tabular" else ImageRegressor(meta)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny layers train faster on one thread: with two, each BatchNorm call waited ~17 ms
    on OpenMP's synchronisation (0.07 ms alone) on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(model: nn.Module, data_dir: Path, meta: Meta, steps: int = 300) -> nn.Module:
    """``steps`` Adam steps (cross-entropy, or MSE on standardised targets); eval mode."""
    split = load_split("train", data_dir, meta)
    inputs = [torch.from_numpy(split.x)]
    if meta.is_sequence:
        inputs.append(torch.from_numpy(split.mask()))
    with one_thread():
        return _fit(model, inputs, torch.from_numpy(split.y), meta, steps)


def _fit(
    model: nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, meta: Meta, steps: int
) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(y), (64,), generator=generator)
        out = model(*(tensor[index] for tensor in inputs))
        if meta.is_regression:
            loss = (((out - y[index]) / meta.target_std) ** 2).mean()
        else:
            loss = nn.functional.cross_entropy(out, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# The stage on a built model


@dataclasses.dataclass(frozen=True)
class SharedTabularExport:
    name: str
    data_dir: Path
    onnx_dir: Path
    model: nn.Module
    meta: Meta
    report: dict[str, Any]

    def variant(self, precision: str) -> Path:
        return self.onnx_dir / {"fp32": "model.onnx"}.get(precision, f"model.{precision}.onnx")


MAKERS = {
    "tabular-classification": lambda d: make_tabular(d, "classification"),
    "tabular-regression": lambda d: make_tabular(d, "regression"),
    "image-regression": make_image_regression,
    "series-regression": make_series_regression,
}


@functools.cache
def shared_tabular_export(name: str) -> SharedTabularExport:
    """One of MAKERS' data sets, its stand-in trained and exported with default params."""
    root = Path(tempfile.mkdtemp(prefix=f"tensorferry-{name}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data_dir = root / "data"
    meta = MAKERS[name](data_dir)
    model = train(standin(meta), data_dir, meta)
    params = ExportParams(calibration_samples=256)
    report = export_standin(model, f"{name}-standin", data_dir, root / "onnx", params)
    return SharedTabularExport(name, data_dir, root / "onnx", model, meta, report)
