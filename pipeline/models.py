"""The model registries: image, sequence and tabular networks, and ``build_module``.

Image networks take normalised float images (N, C, H, W); ``Preprocess`` turns raw uint8
pixels into that input. Sequence networks take features (N, T, F) and a boolean mask
(N, T); ``SequenceClassifier`` turns token ids (text) or raw values (series) into those
features. Tabular networks take the encoded row (N, W); ``TabularPreprocess`` turns raw
feature values into it. Training and export wrap the same module around the network, so
clients send raw inputs and there is no train/serve skew.

``build_module(spec, meta)`` is that unit: logits [N, classes] for classification, or for
regression the prediction float32 [N] in target units (``Regressor``: the network learns
the standardised target, the unit ends in ``* target_std + target_mean``). A user's
``package.module:factory`` model (pipeline/user_model.py) gets the same regression head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.dataset import CATEGORICAL, NUMERIC, Column, Meta
from pipeline.errors import StageError
from pipeline.params import is_import_path
from pipeline.user_model import user_network


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network; stored in the checkpoint."""

    name: str  # a registered model, or a user's "package.module:factory"
    input_shape: tuple[int, ...]  # image: C, H, W; text: L; series: C, T; tabular: F
    num_classes: int  # the head's outputs: one per class, or 1 (regression; Meta.num_outputs)
    width: int = 32
    hidden: tuple[int, ...] = (256, 128)
    kind: str = "image"  # image, text or series (pipeline.dataset.LAYOUTS)
    vocab_size: int = 0  # text only
    layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.1
    heads: int = 4
    task: str = "classification"  # or regression (pipeline.dataset.TASKS)
    batch_norm: bool = False  # mlp: BatchNorm1d after each hidden layer
    options: dict[str, Any] = field(default_factory=dict)  # a user factory's, verbatim

    @property
    def channels(self) -> int:
        """Input channels: images and series; text and tabular have none (0)."""
        return self.input_shape[0] if self.kind in ("image", "series") else 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "hidden": list(self.hidden),
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "layers": self.layers,
            "bidirectional": self.bidirectional,
            "dropout": self.dropout,
            "heads": self.heads,
            "task": self.task,
            "batch_norm": self.batch_norm,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        """Checkpoints written before sequence models or tabular data lack the later keys:
        the defaults, which rebuild what those checkpoints trained."""
        # Before batch_norm existed the mlp had neither batch norm nor dropout (whatever
        # dropout said); a Dropout layer would shift the Sequential's state-dict keys.
        legacy_mlp = "batch_norm" not in values and values["name"] == "mlp"
        return cls(
            name=str(values["name"]),
            input_shape=tuple(int(v) for v in values["input_shape"]),
            num_classes=int(values["num_classes"]),
            width=int(values.get("width", 32)),
            hidden=tuple(int(v) for v in values.get("hidden", (256, 128))),
            kind=str(values.get("kind", "image")),
            vocab_size=int(values.get("vocab_size", 0)),
            layers=int(values.get("layers", 2)),
            bidirectional=bool(values.get("bidirectional", True)),
            dropout=0.0 if legacy_mlp else float(values.get("dropout", 0.1)),
            heads=int(values.get("heads", 4)),
            task=str(values.get("task", "classification")),
            batch_norm=bool(values.get("batch_norm", False)),
            options=dict(values.get("options", {})),
        )


class Preprocess(nn.Module):
    """uint8 pixels -> float in [0, 1] -> per-channel standardisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std


class SeedCNN(nn.Module):
    """The reference tutorial CNN, ported layer for layer (valid padding throughout).

    Conv(32) -> MaxPool -> Conv(64) -> MaxPool -> Conv(64) -> Dense(64) -> Dense(classes);
    122,570 parameters on 3x32x32 input with 10 classes.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        channels, height, width = spec.input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
        )
        out_h, out_w = _seed_cnn_feature_size(height), _seed_cnn_feature_size(width)
        if out_h < 1 or out_w < 1:
            raise StageError(
                f"seed_cnn needs inputs of at least 18x18 pixels, got {height}x{width}; "
                "set data.image_size"
            )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * out_h * out_w, 64),
            nn.ReLU(),
            nn.Linear(64, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _seed_cnn_feature_size(size: int) -> int:
    return ((size - 2) // 2 - 2) // 2 - 2


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet(nn.Module):
    """ResNet-9 in the style of the CIFAR-10 speed-run records, at a configurable width.

    prep conv -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual]
    -> global max pool -> linear, with the logits scaled by 1/8 as in those records.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        w = spec.width
        self.net = nn.Sequential(
            _conv_bn(spec.input_shape[0], w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, spec.num_classes, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0.125


def mlp_layers(size_in: int, spec: ModelSpec) -> list[nn.Module]:
    """[Linear -> BatchNorm1d (batch_norm) -> ReLU -> Dropout (dropout > 0)] per hidden
    width, then Linear to the outputs; no hidden widths is a linear model."""
    _check_mlp(spec)
    layers: list[nn.Module] = []
    for size in spec.hidden:
        # Batch norm's shift takes the place of the linear layer's bias.
        layers.append(nn.Linear(size_in, size, bias=not spec.batch_norm))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        size_in = size
    layers.append(nn.Linear(size_in, spec.num_classes))
    return layers


def _check_mlp(spec: ModelSpec) -> None:
    if any(size < 1 for size in spec.hidden):
        raise StageError(f"model.hidden sizes must be at least 1, got {list(spec.hidden)}")
    if not 0 <= spec.dropout < 1:
        raise StageError(f"model.dropout must be in [0, 1), got {spec.dropout}")


class MLP(nn.Module):
    """The mlp on images: flattened pixels into ``mlp_layers``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        size_in = math.prod(spec.input_shape)
        self.net = nn.Sequential(nn.Flatten(), *mlp_layers(size_in, spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


REGISTRY: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "seed_cnn": SeedCNN,
    "resnet": ResNet,
    "mlp": MLP,
}


def build_model(spec: ModelSpec) -> nn.Module:
    """The image network of ``spec``."""
    _check_kind(spec)
    return REGISTRY[spec.name](spec)


def _registries() -> dict[str, dict[str, Callable[..., nn.Module]]]:
    """Per kind of data, the models that take it."""
    return {
        "image": REGISTRY,
        "text": SEQUENCE_REGISTRY,
        "series": SEQUENCE_REGISTRY,
        "tabular": TABULAR_REGISTRY,
    }


def _check_kind(spec: ModelSpec) -> None:
    """One clear error for an unknown name or a model of the wrong kind for the data."""
    registries = _registries()
    kinds = [kind for kind, registry in registries.items() if spec.name in registry]
    if not kinds:
        known = ", ".join(sorted({name for r in registries.values() for name in r}))
        raise StageError(f"unknown model {spec.name!r} (known: {known})")
    if spec.kind not in kinds:
        groups = dict.fromkeys("sequence" if k in ("text", "series") else k for k in kinds)
        what = " and ".join(groups)
        article = "an" if what[0] in "aeiou" else "a"
        raise StageError(
            f"model {spec.name!r} is {article} {what} model but the prepared data is "
            f"{spec.kind}; set model.name to one of {', '.join(registries[spec.kind])}"
        )


class Classifier(nn.Module):
    """Raw uint8 pixels in, logits out: the unit that is trained, evaluated and exported."""

    def __init__(self, spec: ModelSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.network = build_model(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(pixels))


class Regressor(nn.Module):
    """A network predicting the standardised target ([N] or [N, 1]) -> float32 [N] in
    target units, so the exported graph answers in the units the data came in."""

    def __init__(self, network: nn.Module, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.network(*inputs).flatten() * self.target_std + self.target_mean


def build_module(spec: ModelSpec, meta: Meta) -> nn.Module:
    """The trained, evaluated and exported unit for ``spec`` on data described by ``meta``:
    raw prepared inputs in, logits [N, classes] or (regression) float32 [N] out."""
    network = _build_network(spec, meta)
    if meta.is_regression:
        return Regressor(network, meta.target_mean, meta.target_std)
    return network


def _build_network(spec: ModelSpec, meta: Meta) -> nn.Module:
    if is_import_path(spec.name):
        return user_network(spec.name, meta, spec.options)
    _check_kind(spec)
    if spec.kind == "image":
        return Classifier(spec, meta.mean, meta.std)
    if spec.kind == "tabular":
        return TabularModel(spec, meta.columns)
    return SequenceClassifier(spec, meta.mean, meta.std)


def network_output(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """What ``build_module``'s unit computes before its regression head, if it has one:
    the shape a user's factory must get right."""
    network = module.network if isinstance(module, Regressor) else module
    return network(*inputs)


# ---------------------------------------------------------------- sequences
#
# Every sequence network maps (features [N, T, F], mask bool [N, T]) to logits, with
# features zero at padded steps, and no real step may see what follows a row's end.


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real steps of h [N, T, F]; where, not multiply, so pad NaN cannot leak."""
    total = torch.where(mask[:, :, None], h, torch.zeros_like(h)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)


def reverse_within_length(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Step t -> len-1-t for t < len, padding stays put; its own inverse.

    Reversing whole rows would put the padding first, where a backward RNN would read it
    before the real steps; pack_padded_sequence avoids that but does not export.
    """
    steps = torch.arange(h.shape[1], device=h.device)[None, :]
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return h.gather(1, index[:, :, None].expand(-1, -1, h.shape[2]))


class RecurrentNet(nn.Module):
    """Stacked GRU or LSTM, optionally bidirectional, masked mean pooling, linear head.

    One single-layer RNN per layer and direction: the backward direction runs forward over
    each row reversed within its length, so both directions are causal in what they read
    and trailing padding never reaches a real step.
    """

    def __init__(self, spec: ModelSpec, input_size: int) -> None:
        super().__init__()
        cell = nn.GRU if spec.name == "gru" else nn.LSTM
        directions = 2 if spec.bidirectional else 1
        sizes = [input_size] + [spec.width * directions] * (spec.layers - 1)
        self.forward_rnns = nn.ModuleList(cell(s, spec.width, batch_first=True) for s in sizes)
        self.backward_rnns = nn.ModuleList(
            cell(s, spec.width, batch_first=True) for s in (sizes if spec.bidirectional else ())
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.width * directions, spec.num_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1)
        for i, rnn in enumerate(self.forward_rnns):
            if i:
                h = self.dropout(h)
            outputs = [rnn(h)[0]]
            if self.backward_rnns:
                reversed_h = reverse_within_length(h, lengths)
                backward = self.backward_rnns[i](reversed_h)[0]
                outputs.append(reverse_within_length(backward, lengths))
            h = torch.cat(outputs, dim=2)
        return self.head(self.dropout(masked_mean(h, mask)))


def sinusoidal_positions(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """[steps, dim] encoding of Vaswani et al., computed for whatever length comes in."""
    position = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim)
    )
    angles = position * rate[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)[:, :dim]


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain ops, padded keys masked out."""

    # Finite, and within float16's range, so an fp16 conversion of the graph keeps it a
    # mask; exp(-1e4) is exactly 0 in float32 next to any real score.
    MASKED = -1e4

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise StageError(f"model.width ({dim}) must be a multiple of model.heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # [N, T, 3*D] -> 3 x [N, H, T, D/H]
        q, k, v = self.qkv(x).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], self.MASKED)
        attention = self.dropout(torch.softmax(scores, dim=-1))
        return self.out((attention @ v).transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + MLP(norm(x)) with GELU."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TransformerNet(nn.Module):
    """A small pre-norm transformer encoder with sinusoidal positions and masked mean pooling.

    Written with plain ops rather than nn.TransformerEncoder, whose fused inference path
    changes what is exported.
    """

    def __init__(self, spec: ModelSpec, input_size: int) -> None:
        super().__init__()
        self.project = nn.Linear(input_size, spec.width)
        self.blocks = nn.ModuleList(
            EncoderBlock(spec.width, spec.heads, spec.dropout) for _ in range(spec.layers)
        )
        self.norm = nn.LayerNorm(spec.width)
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.width, spec.num_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.project(h)
        x = self.dropout(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.dropout(masked_mean(self.norm(x), mask)))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over [N, C, T] whose training statistics count real steps only.

    Padded steps would otherwise pull the statistics by however much padding a batch
    has. In eval mode it is plain BatchNorm (running statistics), which exports as such.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x)
        weights = mask[:, None, :].to(x.dtype)
        count = weights.sum()
        mean = (x * weights).sum(dim=(0, 2)) / count
        var = (((x - mean[None, :, None]) * weights) ** 2).sum(dim=(0, 2)) / count
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight / torch.sqrt(var + self.eps)
        return (x - mean[None, :, None]) * scale[None, :, None] + self.bias[None, :, None]


class FCN(nn.Module):
    """The fully convolutional network of Wang et al. 2017, the time-series baseline.

    Three conv-BN-ReLU blocks (4w, 8w, 4w channels: 128, 256, 128 at width 32; kernels 7,
    5, 3 with 'same' padding), masked global average pooling, linear head. Padded steps
    are zeroed before every conv, so a real step near a row's end sees the same zeros the
    conv's own padding gives the row on its own.
    """

    KERNELS = (7, 5, 3)

    def __init__(self, spec: ModelSpec, input_size: int) -> None:
        super().__init__()
        sizes = [input_size, 4 * spec.width, 8 * spec.width, 4 * spec.width]
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, c_out, k, padding=k // 2, bias=False)
            for c_in, c_out, k in zip(sizes[:-1], sizes[1:], self.KERNELS, strict=True)
        )
        self.norms = nn.ModuleList(MaskedBatchNorm1d(c) for c in sizes[1:])
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(sizes[-1], spec.num_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, keep = h.transpose(1, 2), mask[:, None, :]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(torch.where(keep, x, torch.zeros_like(x))), mask))
        return self.head(self.dropout(masked_mean(x.transpose(1, 2), mask)))


SEQUENCE_REGISTRY: dict[str, Callable[[ModelSpec, int], nn.Module]] = {
    "gru": RecurrentNet,
    "lstm": RecurrentNet,
    "transformer": TransformerNet,
    "cnn1d": FCN,
}


def _check_sizes(spec: ModelSpec) -> None:
    for key in ("width", "layers", "heads"):
        if getattr(spec, key) < 1:
            raise StageError(f"model.{key} must be at least 1, got {getattr(spec, key)}")
    if not 0 <= spec.dropout < 1:
        raise StageError(f"model.dropout must be in [0, 1), got {spec.dropout}")


class SequenceClassifier(nn.Module):
    """Token ids (text, int64 [N, L]) or raw values (series, float32 [N, C, T]) and a mask
    (int64 [N, T], 1 real, 0 pad) in, logits out.

    Text is embedded (width dims, padding id 0); series are standardised per channel by
    the train split's mean/std inside the module, so clients send raw values. Padded steps
    are zeroed whatever they held, and the network masks them from there on.
    """

    def __init__(self, spec: ModelSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        _check_kind(spec)
        _check_sizes(spec)
        self.kind = spec.kind
        if spec.kind == "text":
            self.embed = nn.Embedding(spec.vocab_size, spec.width, padding_idx=0)
            input_size = spec.width
        else:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1))
            input_size = spec.channels
        self.network = SEQUENCE_REGISTRY[spec.name](spec, input_size)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask > 0
        if self.kind == "text":
            features = self.embed(torch.where(keep, values, torch.zeros_like(values)))
        else:
            standard = (values - self.mean) / self.std
            features = torch.where(keep[:, None, :], standard, torch.zeros_like(standard))
            features = features.transpose(1, 2)
        return self.network(features, keep)


# ---------------------------------------------------------------- tabular


class TabularPreprocess(nn.Module):
    """Raw tabular rows float32 [N, F] (``columns`` order) -> the encoded row [N, W].

    Per column, in order: a numeric column is one value, standardised by the train split's
    mean/std; a categorical column is a one-hot block over its categories, where a code
    outside 0..K-1 (UNSEEN_CODE, -1) is all zeros. NaN (a missing cell) first becomes the
    column's ``fill`` where it has one. One gather, one compare and one where: ops that
    torch's dynamo exporter and TensorRT take, with no strings. User factories may use it.
    """

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__()
        source, code, mean, std = [], [], [], []
        for index, column in enumerate(columns):
            width = _encoded_width(column)
            source += [index] * width
            is_numeric = column.type == NUMERIC
            code += [-1.0] if is_numeric else [float(c) for c in range(width)]
            mean += [column.mean] if is_numeric else [0.0] * width
            # A constant train column has std 0: centring alone maps it to 0.
            std += [column.std or 1.0] if is_numeric else [1.0] * width
        self.out_features = len(source)
        fills = [math.nan if c.fill is None else c.fill for c in columns]
        self.impute = any(c.fill is not None for c in columns)
        self.register_buffer("fill", torch.tensor(fills, dtype=torch.float32))
        self.register_buffer("source", torch.tensor(source, dtype=torch.int64))
        self.register_buffer("code", torch.tensor(code, dtype=torch.float32))
        self.register_buffer("one_hot", torch.tensor([c >= 0 for c in code], dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        if self.impute:  # fixed per model, so the graph has no IsNaN when nothing is filled
            x = torch.where(torch.isnan(x), self.fill, x)
        slots = x[:, self.source]
        hot = (slots == self.code).to(slots.dtype)
        return torch.where(self.one_hot, hot, (slots - self.mean) / self.std)


def _encoded_width(column: Column) -> int:
    if column.type == NUMERIC:
        return 1
    if column.type == CATEGORICAL and column.categories:
        return len(column.categories)
    raise StageError(
        f"column {column.name!r}: type must be {NUMERIC} or {CATEGORICAL} with categories, "
        f"got {column.type!r} with {len(column.categories)} categories"
    )


def tabular_mlp(spec: ModelSpec, input_size: int) -> nn.Module:
    """The mlp on tabular data: ``mlp_layers`` over the encoded row."""
    return nn.Sequential(*mlp_layers(input_size, spec))


TABULAR_REGISTRY: dict[str, Callable[[ModelSpec, int], nn.Module]] = {"mlp": tabular_mlp}


class TabularModel(nn.Module):
    """Raw feature rows float32 [N, F] (NaN where missing, under impute) in, logits
    [N, classes] (or the standardised target [N, 1]) out."""

    def __init__(self, spec: ModelSpec, columns: Sequence[Column]) -> None:
        super().__init__()
        _check_kind(spec)
        if len(columns) != spec.input_shape[0]:
            raise StageError(
                f"model input has {spec.input_shape[0]} features but meta.json lists "
                f"{len(columns)} columns"
            )
        self.preprocess = TabularPreprocess(columns)
        self.network = TABULAR_REGISTRY[spec.name](spec, self.preprocess.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(features))
