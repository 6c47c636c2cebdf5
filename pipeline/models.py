"""The model registries: image networks and sequence networks.

Image networks take normalised float images (N, C, H, W); ``Preprocess`` turns raw uint8
pixels into that input. Sequence networks take features (N, T, F) and a boolean mask
(N, T); ``SequenceClassifier`` turns token ids (text) or raw values (series) into those
features. Training and export wrap the same module around the network, so clients send
raw inputs and there is no train/serve skew.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import StageError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network; stored in the checkpoint."""

    name: str
    input_shape: tuple[int, ...]  # image: C, H, W; text: L; series: C, T
    num_classes: int
    width: int = 32
    hidden: tuple[int, ...] = (256, 128)
    kind: str = "image"  # image, text or series (pipeline.dataset.LAYOUTS)
    vocab_size: int = 0  # text only
    layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.1
    heads: int = 4

    @property
    def channels(self) -> int:
        """Input channels: images and series; text has none (0)."""
        return 0 if self.kind == "text" else self.input_shape[0]

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
        }

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        """Checkpoints written before sequence models lack the later keys: the defaults."""
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
            dropout=float(values.get("dropout", 0.1)),
            heads=int(values.get("heads", 4)),
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


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        sizes = [spec.input_shape[0] * spec.input_shape[1] * spec.input_shape[2], *spec.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in, size_out in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], spec.num_classes))
        self.net = nn.Sequential(*layers)

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


def _check_kind(spec: ModelSpec) -> None:
    """One clear error for an unknown name or a model of the wrong kind for the data."""
    sequence = spec.name in SEQUENCE_REGISTRY
    if not sequence and spec.name not in REGISTRY:
        known = ", ".join(sorted({*REGISTRY, *SEQUENCE_REGISTRY}))
        raise StageError(f"unknown model {spec.name!r} (known: {known})")
    if sequence != (spec.kind != "image"):
        fitting = SEQUENCE_REGISTRY if spec.kind != "image" else REGISTRY
        raise StageError(
            f"model {spec.name!r} is {'a sequence' if sequence else 'an image'} model but the "
            f"prepared data is {spec.kind}; set model.name to one of {', '.join(fitting)}"
        )


class Classifier(nn.Module):
    """Raw uint8 pixels in, logits out: the unit that is trained, evaluated and exported."""

    def __init__(self, spec: ModelSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.network = build_model(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(pixels))


def build_classifier(spec: ModelSpec, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """The trained, evaluated and exported unit for ``spec``'s kind of data."""
    _check_kind(spec)
    if spec.kind == "image":
        return Classifier(spec, mean, std)
    return SequenceClassifier(spec, mean, std)


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
