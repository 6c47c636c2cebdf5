"""The training checkpoint: a state dict plus what is needed to rebuild and label the model.

It holds only tensors and plain Python data, so it loads with
``torch.load(path, weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_path
from pipeline.errors import StageError, step
from pipeline.models import ModelSpec, build_classifier

FORMAT = "tensorferry-checkpoint/1"
DEFAULT_CHECKPOINT = Path("models/checkpoint.pt")


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    state_dict: dict[str, torch.Tensor]
    data_fingerprint: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    params_hash: str = ""

    def build(self, source: str = "checkpoint") -> torch.nn.Module:
        """The Classifier (images) or SequenceClassifier (text, series) with these weights,
        in eval mode; a mismatch is a StageError."""
        model = build_classifier(self.spec, self.mean, self.std)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise StageError(
                f"{source} does not fit architecture {self.spec.name!r}: {first}"
            ) from None
        return model.eval()


@step("checkpoint")
def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    payload = {
        "format": FORMAT,
        "model": checkpoint.spec.to_dict(),
        "class_names": list(checkpoint.class_names),
        "normalization": {"mean": list(checkpoint.mean), "std": list(checkpoint.std)},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()},
        "data_fingerprint": checkpoint.data_fingerprint,
        "params": checkpoint.params,
        "params_hash": checkpoint.params_hash,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"checkpoint {path} not found; run the train stage first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise StageError(f"checkpoint {path} cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StageError(f"checkpoint {path} is not a tensorferry checkpoint ({FORMAT})")
    try:
        return Checkpoint(
            spec=ModelSpec.from_dict(payload["model"]),
            class_names=tuple(payload["class_names"]),
            mean=tuple(payload["normalization"]["mean"]),
            std=tuple(payload["normalization"]["std"]),
            state_dict=payload["state_dict"],
            data_fingerprint=payload.get("data_fingerprint", ""),
            params=payload.get("params", {}),
            params_hash=payload.get("params_hash", ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(f"checkpoint {path} is missing field {exc}") from None
