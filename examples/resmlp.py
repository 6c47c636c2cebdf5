"""A user's own model: a residual MLP for tabular data (Gorishniy et al. 2021, "Revisiting
Deep Learning Models for Tabular Data"), plugged in with

    model.name: examples.resmlp:build
    model.options: {blocks: 2, width: 128, dropout: 0.1}

tensorferry calls ``build(meta, options)`` once, with the prepared data's description
(``pipeline.dataset.Meta``: kind, task, columns, class names, ``num_outputs``) and
``model.options`` exactly as params.yaml has it. The module takes what the prepared data
holds: for tabular data raw float32 features [N, F], categorical columns as codes. It
returns logits [N, classes], or for regression the standardised target [N] (tensorferry
turns it back into the target's units, in training and in the exported graph).
Copy this file, change the network, and point ``model.name`` at your copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.dataset import Meta
from pipeline.models import TabularPreprocess


class Block(nn.Module):
    """x + Dropout(Linear(Dropout(ReLU(Linear(BatchNorm(x))))))."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.Linear(width, 2 * width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResMLP(nn.Module):
    def __init__(self, meta: Meta, blocks: int, width: int, dropout: float) -> None:
        super().__init__()
        # Standardises numeric columns, one-hot encodes categorical ones, fills NaN.
        self.preprocess = TabularPreprocess(meta.columns)
        encoded = self.preprocess.out_features
        self.net = nn.Sequential(
            nn.Linear(encoded, width),
            *(Block(width, dropout) for _ in range(blocks)),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, meta.num_outputs),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(features))


def build(meta: Meta, options: dict[str, Any]) -> nn.Module:
    if meta.kind != "tabular":
        raise ValueError(f"resmlp takes tabular data, not {meta.kind}")
    return ResMLP(
        meta,
        blocks=int(options.get("blocks", 2)),
        width=int(options.get("width", 128)),
        dropout=float(options.get("dropout", 0.1)),
    )
