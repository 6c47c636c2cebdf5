"""Tiny prepared sequence dirs and stand-in sequence classifiers for export/engine tests.

Text: three classes told apart by which of three token groups a row draws from, lengths
3..16 of 16. Series: two channels, classes by the sign of channel 0's and the level of
channel 1's mean, lengths 4..20 of 20. The stand-ins have the models' interface
(``forward(values, mask) -> logits``, padding masked) and learn the data in a few dozen
Adam steps, so accuracies mean something. ``shared_sequence_export(kind)`` exports once per
session; tests that modify files copy them.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.dataset import TOKENIZER_FILE, Meta, Split, load_split, save_split
from pipeline.params import ExportParams

CLASS_NAMES = ("a", "b", "c")
SIZES = {"train": 192, "val": 24, "test": 72}
TEXT_LENGTH, VOCAB = 16, 20
SERIES_SHAPE = (2, 20)


def _text_rows(rng: np.random.Generator, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(3, TEXT_LENGTH + 1, len(y))
    x = np.zeros((len(y), TEXT_LENGTH), np.int64)
    for row, (label, length) in enumerate(zip(y, lengths, strict=True)):
        group = 2 + 6 * label + rng.integers(0, 6, length)
        noise = rng.random(length) < 0.25
        x[row, :length] = np.where(noise, rng.integers(2, VOCAB, length), group)
    return x, lengths


def _series_rows(rng: np.random.Generator, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(4, SERIES_SHAPE[1] + 1, len(y))
    x = np.zeros((len(y), *SERIES_SHAPE), np.float32)
    for row, (label, length) in enumerate(zip(y, lengths, strict=True)):
        level = np.array([[-2.0], [5.0]]) if label == 0 else np.array([[2.0], [5.0]])
        if label == 2:
            level = np.array([[2.0], [9.0]])
        x[row, :, :length] = level + rng.normal(0, 1, (2, length))
    return x, lengths


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer.to_str()


def make_prepared(directory: Path, kind: str, seed: int = 0) -> Meta:
    """Write {train,val,test}.npz, meta.json (and tokenizer.json for text)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = _text_rows if kind == "text" else _series_rows
    all_lengths, splits = [], {}
    for split, size in SIZES.items():
        y = np.arange(size, dtype=np.int64) % len(CLASS_NAMES)
        rng.shuffle(y)
        x, lengths = rows(rng, y)
        splits[split] = Split(x, y, lengths)
        save_split(directory / f"{split}.npz", splits[split])
        all_lengths.append(lengths)
    lengths = np.concatenate(all_lengths)
    mean, std = (), ()
    if kind == "series":
        train = splits["train"]
        real = train.mask()[:, None, :].astype(bool)
        values = [train.x[:, c][real[:, 0]] for c in range(SERIES_SHAPE[0])]
        mean = tuple(round(float(v.mean()), 6) for v in values)
        std = tuple(round(max(float(v.std()), 1e-6), 6) for v in values)
    else:
        (directory / TOKENIZER_FILE).write_text(_tokenizer_json())
    meta = Meta(
        class_names=CLASS_NAMES,
        input_shape=(TEXT_LENGTH,) if kind == "text" else SERIES_SHAPE,
        mean=mean,
        std=std,
        split_sizes=dict(SIZES),
        fingerprint=f"{kind}-{seed}-" + "0" * 56,
        source={"synthetic": kind, "seed": seed},
        kind=kind,
        vocab_size=VOCAB if kind == "text" else 0,
        length_stats={
            "min": int(lengths.min()),
            "median": int(np.median(lengths)),
            "max": int(lengths.max()),
        },
    )
    (directory / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real steps of h [N, T, D]: padding does not change a row's answer."""
    weights = mask.unsqueeze(-1).to(h.dtype)
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextMean(nn.Module):
    """Embedding, masked mean, linear: the smallest text classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width, padding_idx=0)
        self.head = nn.Linear(width, len(CLASS_NAMES))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(_masked_mean(self.embedding(ids), mask))


class TextBiGRU(nn.Module):
    """A bidirectional GRU: torch 2.13's dynamo exporter bakes its length into the graph.

    The backward direction reads from the last real step only because the padding is
    zero-embedded and ignored by the masked mean; close enough to padding-free for parity,
    which compares the same padded inputs.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width, padding_idx=0)
        self.rnn = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * width, len(CLASS_NAMES))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embedding(ids))
        return self.head(_masked_mean(h, mask))


class SeriesMean(nn.Module):
    """Standardise per channel (inside the model), linear + ReLU per step, masked mean, linear."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], width: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1))
        self.step = nn.Linear(len(mean), width)
        self.head = nn.Linear(width, len(CLASS_NAMES))

    def forward(self, series: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = ((series - self.mean) / self.std).transpose(1, 2)
        return self.head(_masked_mean(torch.relu(self.step(z)), mask))


def standin(kind: str, meta: Meta, name: str = "") -> nn.Module:
    torch.manual_seed(0)
    if kind == "series":
        return SeriesMean(meta.mean, meta.std)
    return TextBiGRU() if name == "bigru" else TextMean()


def train(model: nn.Module, data_dir: Path, steps: int = 80) -> nn.Module:
    """``steps`` Adam steps on the train split at full padded length; returns it in eval mode."""
    split = load_split("train", data_dir)
    x, y, mask = (
        torch.from_numpy(split.x),
        torch.from_numpy(split.y),
        torch.from_numpy(split.mask()),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index], mask[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def export_standin(
    model: nn.Module, name: str, data_dir: Path, out: Path, params: ExportParams
) -> dict[str, Any]:
    """The export stage on a built model (any kind), as export_model runs it."""
    from pipeline.dataset import load_meta
    from pipeline.export import export_built, make_contract

    meta = load_meta(data_dir)
    contract = make_contract(name, meta, params, data_dir, train_params_hash="test")
    return export_built(model, meta, contract, params, data_dir, out, None)


@dataclasses.dataclass(frozen=True)
class SharedSequenceExport:
    kind: str
    data_dir: Path
    onnx_dir: Path
    model: nn.Module
    report: dict[str, Any]

    def variant(self, name: str) -> Path:
        return self.onnx_dir / {"fp32": "model.onnx"}.get(name, f"model.{name}.onnx")


@functools.cache
def shared_sequence_export(kind: str) -> SharedSequenceExport:
    """A trained stand-in of ``kind`` exported with default params (all three variants)."""
    from pipeline.dataset import load_meta

    root = Path(tempfile.mkdtemp(prefix=f"tensorferry-{kind}-export-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data_dir = root / "data"
    make_prepared(data_dir, kind)
    model = train(standin(kind, load_meta(data_dir)), data_dir)
    params = ExportParams(calibration_samples=96)
    report = export_standin(model, f"{kind}_standin", data_dir, root / "onnx", params)
    return SharedSequenceExport(kind, data_dir, root / "onnx", model, report)
