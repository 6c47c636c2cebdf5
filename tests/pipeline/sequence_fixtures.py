"""Tiny prepared sequence directories in the prepare stage's format, made on the fly.

Text: sentences over a dozen words, class ``spam`` when the word ``free`` appears, with a
real word-level ``tokenizer.json`` ([PAD] 0, [UNK] 1) trained on those words. Series: C
channels, the class is the frequency and offset of a sine on channel 0; the other channels
carry an offset and scale that only standardisation removes. Lengths vary within each
split, so padding and masks matter. The same call writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.dataset import PAD_ID, SPLITS, TOKENIZER_FILE, Meta, Split, save_split

WORDS = ("the", "a", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "big", "red")
SIGNAL = "free"  # present in every spam row, absent from every ham row
TEXT_CLASSES = ("ham", "spam")
SERIES_CLASSES = ("slow_up", "fast", "slow_down")
SERIES_PATTERNS = ((1, 1.0), (4, 0.0), (1, -1.0))  # per class: cycles per 16 steps, offset
SIZES = {"train": 96, "val": 32, "test": 48}


def text_rows(n: int, seed: int, max_words: int = 20) -> tuple[list[str], np.ndarray]:
    """``n`` sentences and labels (balanced), 2..max_words words each."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.arange(n, dtype=np.int64) % 2
    for label in labels:
        words = list(rng.choice(WORDS, size=int(rng.integers(2, max_words + 1))))
        if label:
            words[int(rng.integers(0, len(words)))] = SIGNAL
        texts.append(" ".join(words))
    return texts, labels


def train_tokenizer(texts: list[str]):  # noqa: ANN201 - tokenizers.Tokenizer
    """A word-level tokenizer whose [PAD] is id 0 and [UNK] id 1, as the contract requires."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    )
    return tokenizer


def write_text_prepared(directory: Path, max_length: int = 24, seed: int = 0) -> Path:
    """``directory`` with {train,val,test}.npz (kind text), meta.json and tokenizer.json."""
    rows = {name: text_rows(SIZES[name], seed * 10 + i) for i, name in enumerate(SPLITS)}
    tokenizer = train_tokenizer(rows["train"][0])
    splits = {}
    for name, (texts, labels) in rows.items():
        ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int64)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, encoding in enumerate(tokenizer.encode_batch(texts)):
            tokens = encoding.ids[:max_length]
            ids[i, : len(tokens)], lengths[i] = tokens, len(tokens)
        splits[name] = Split(x=ids, y=labels, lengths=lengths)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    meta = _meta(splits, "text", TEXT_CLASSES, (max_length,), (), ())
    meta = dataclasses.replace(meta, vocab_size=tokenizer.get_vocab_size())
    return _write(directory, splits, meta)


def series_split(
    n: int, seed: int, channels: int = 2, max_steps: int = 32, min_steps: int = 8
) -> Split:
    """``n`` series, float32 [n, channels, max_steps], raw values zero-padded after each length."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(SERIES_CLASSES)
    lengths = rng.integers(min_steps, max_steps + 1, size=n).astype(np.int64)
    x = np.zeros((n, channels, max_steps), dtype=np.float32)
    for i, (label, length) in enumerate(zip(labels, lengths, strict=True)):
        t = np.arange(length)
        phase = rng.uniform(0, 2 * np.pi)
        frequency, offset = SERIES_PATTERNS[label]
        x[i, 0, :length] = np.sin(2 * np.pi * frequency * t / 16 + phase) + offset
        x[i, 1:, :length] = 5.0 + 3.0 * rng.standard_normal((channels - 1, length))
        x[i, :, :length] += 0.2 * rng.standard_normal((channels, length))
    return Split(x=x, y=labels, lengths=lengths)


def write_series_prepared(
    directory: Path, channels: int = 2, max_steps: int = 32, seed: int = 0
) -> Path:
    """``directory`` with {train,val,test}.npz (kind series) and meta.json."""
    splits = {
        name: series_split(SIZES[name], seed * 10 + i, channels, max_steps)
        for i, name in enumerate(SPLITS)
    }
    train = splits["train"]
    real = train.mask().astype(bool)
    values = np.stack([train.x[:, c][real] for c in range(channels)])
    mean = tuple(float(v) for v in values.mean(axis=1))
    std = tuple(max(float(v), 1e-6) for v in values.std(axis=1))
    meta = _meta(splits, "series", SERIES_CLASSES, (channels, max_steps), mean, std)
    directory.mkdir(parents=True, exist_ok=True)
    return _write(directory, splits, meta)


def _meta(splits, kind, classes, shape, mean, std) -> Meta:  # noqa: ANN001
    lengths = np.concatenate([s.lengths for s in splits.values()])
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(splits[name].x.tobytes() + splits[name].y.tobytes())
    return Meta(
        class_names=classes,
        input_shape=shape,
        mean=mean,
        std=std,
        split_sizes={name: len(s.y) for name, s in splits.items()},
        fingerprint=digest.hexdigest(),
        source={"name": f"tests.sequence_fixtures.{kind}"},
        kind=kind,
        length_stats={
            "min": int(lengths.min()),
            "median": int(np.median(lengths)),
            "max": int(lengths.max()),
        },
    )


def _write(directory: Path, splits: dict[str, Split], meta: Meta) -> Path:
    for name, split in splits.items():
        save_split(directory / f"{name}.npz", split)
    (directory / "meta.json").write_text(json.dumps(meta.to_json(), indent=2))
    return directory
