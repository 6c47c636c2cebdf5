"""Sequence ONNX models carrying the sequence contract, exported by torch in the test.

A masked GRU text classifier (ids + attention mask, a WordPiece tokenizer trained here)
and a series classifier (raw values + mask, standardised in the graph). Both are
unidirectional and pool only the real steps, so a row's answer does not depend on the
padding after it: what pad-merge relies on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from serving.contract import (
    SEQUENCE_CLASSIFICATION,
    ModelContract,
    PaddedInput,
    SequencePreprocessing,
)

TEXT_CLASSES = ("ham", "spam", "other")
SERIES_CLASSES = ("flat", "rising")
MAX_LENGTH = 32
CORPUS = [
    "win a free prize now",
    "call now to claim your free cash prize",
    "are we still meeting for lunch today",
    "see you at the station at six",
    "urgent your account has been selected for a reward",
    "can you send me the notes from class",
    "free entry in a weekly competition text win to claim",
    "i will be home late tonight sorry",
]


def tokenizer_json(vocab_size: int = 120, corpus: list[str] | None = None) -> str:
    """A WordPiece tokenizer trained on ``corpus``: [PAD] is id 0, [UNK] id 1."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)  # drops control chars
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"])
    tokenizer.train_from_iterator(corpus or CORPUS, trainer)
    return tokenizer.to_str()


def text_contract(tokenizer: str, name: str = "sms", max_length: int = MAX_LENGTH):
    return ModelContract(
        model_name=name,
        task=SEQUENCE_CLASSIFICATION,
        class_names=TEXT_CLASSES,
        sequence=SequencePreprocessing(
            kind="text",
            padded=(PaddedInput("input_ids", 1, 0), PaddedInput("attention_mask", 1, 0)),
            mask_input="attention_mask",
            min_length=1,
            max_length=max_length,
            tokenizer=tokenizer,
        ),
        precision="fp32",
    )


def series_contract(channels: int, name: str = "sensor") -> ModelContract:
    return ModelContract(
        model_name=name,
        task=SEQUENCE_CLASSIFICATION,
        class_names=SERIES_CLASSES,
        sequence=SequencePreprocessing(
            kind="series",
            padded=(PaddedInput("series", 2, 0.0), PaddedInput("mask", 1, 0)),
            mask_input="mask",
            min_length=1,
            max_length=MAX_LENGTH,
            mean=(0.5,) * channels,
            std=(2.0,) * channels,
        ),
        precision="fp32",
    )


def _with_contract(path: Path, contract: ModelContract) -> Path:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, contract.to_metadata())
    onnx.save(model, str(path))
    return path


def text_gru(
    path: Path,
    tokenizer: str | None = None,
    width: int = 8,
    max_length: int = MAX_LENGTH,
    seed: int = 0,
) -> Path:
    """input_ids, attention_mask INT64 [N, L] -> logits, probabilities FP32 [N, 3]:
    embedding, a GRU, the mean of its states over the real steps, a linear head.

    The legacy exporter (dynamo=False): torch 2.13's dynamo exporter bakes the length
    into a Reshape after nn.GRU."""
    import torch
    from tokenizers import Tokenizer
    from torch import nn

    tokenizer = tokenizer or tokenizer_json()
    vocab = Tokenizer.from_str(tokenizer).get_vocab_size()

    class TextGru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width, padding_idx=0)
            self.gru = nn.GRU(width, width, batch_first=True)
            self.head = nn.Linear(width, len(TEXT_CLASSES))

        def forward(self, ids: torch.Tensor, mask: torch.Tensor):
            states, _ = self.gru(self.embed(ids))
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            logits = self.head(pooled)
            return logits, torch.softmax(logits, dim=1)

    torch.manual_seed(seed)
    example = (torch.ones(2, 5, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64))
    dynamic = {0: "batch", 1: "length"}
    torch.onnx.export(
        TextGru().eval(),
        example,
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits", "probabilities"],
        dynamic_axes={
            "input_ids": dynamic,
            "attention_mask": dynamic,
            "logits": {0: "batch"},
            "probabilities": {0: "batch"},
        },
        dynamo=False,
        opset_version=17,
    )
    return _with_contract(path, text_contract(tokenizer, max_length=max_length))


def series_mlp(path: Path, channels: int = 2) -> Path:
    """series FP32 [N, C, T] + mask INT64 [N, T] -> logits, probabilities FP32 [N, 2]:
    standardise, a per-step layer, the mean over real steps, a linear head."""
    import torch
    from torch import nn

    contract = series_contract(channels)
    assert contract.sequence is not None
    mean = torch.tensor(contract.sequence.mean).view(1, -1, 1)
    std = torch.tensor(contract.sequence.std).view(1, -1, 1)

    class SeriesMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = nn.Conv1d(channels, 8, kernel_size=1)
            self.head = nn.Linear(8, len(SERIES_CLASSES))

        def forward(self, series: torch.Tensor, mask: torch.Tensor):
            weights = mask.unsqueeze(1).to(series.dtype)
            hidden = torch.tanh(self.step((series - mean) / std)) * weights
            pooled = hidden.sum(2) / weights.sum(2).clamp(min=1.0)
            logits = self.head(pooled)
            return logits, torch.softmax(logits, dim=1)

    torch.manual_seed(1)
    example = (torch.zeros(2, channels, 5), torch.ones(2, 5, dtype=torch.int64))
    torch.onnx.export(  # the legacy exporter: a second faster than dynamo, same graph here
        SeriesMlp().eval(),
        example,
        str(path),
        input_names=["series", "mask"],
        output_names=["logits", "probabilities"],
        dynamic_axes={
            "series": {0: "batch", 2: "length"},
            "mask": {0: "batch", 1: "length"},
            "logits": {0: "batch"},
            "probabilities": {0: "batch"},
        },
        dynamo=False,
        opset_version=17,
    )
    return _with_contract(path, contract)


def encode(tokenizer: str, texts: list[str], max_length: int = MAX_LENGTH):
    """ids and mask for ``texts`` as the server builds them: padded to the longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer)
    tok.no_padding()
    tok.enable_truncation(max_length)
    rows = [tok.encode(t).ids for t in texts]
    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
