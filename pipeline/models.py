"""The model registry: every network takes normalised float images (N, C, H, W).

``Preprocess`` turns raw uint8 pixels into that input; training and export wrap the
same module around the network, so clients send pixels and there is no train/serve skew.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import StageError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network; stored in the checkpoint."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    width: int = 32
    hidden: tuple[int, ...] = (256, 128)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        return cls(
            name=str(values["name"]),
            input_shape=tuple(int(v) for v in values["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(values["num_classes"]),
            width=int(values.get("width", 32)),
            hidden=tuple(int(v) for v in values.get("hidden", (256, 128))),
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
    try:
        factory = REGISTRY[spec.name]
    except KeyError:
        raise StageError(
            f"unknown model {spec.name!r} (known: {', '.join(sorted(REGISTRY))})"
        ) from None
    return factory(spec)


class Classifier(nn.Module):
    """Raw uint8 pixels in, logits out: the unit that is trained, evaluated and exported."""

    def __init__(self, spec: ModelSpec, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.network = build_model(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(pixels))
