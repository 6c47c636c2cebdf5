"""The training checkpoint: a state dict plus what is needed to rebuild and label the model.

It holds only tensors and plain Python data, so it loads with
``torch.load(path, weights_only=True)``: no pickled code is ever executed. Besides the
spec, class names and image/series statistics it keeps the prepared data's Meta (its
``meta.json``), so a model rebuilds without the data directory: tabular columns,
regression target statistics, and what a user's factory is called with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_path
from pipeline.dataset import Meta, meta_from_json
from pipeline.errors import StageError, step
from pipeline.models import ModelSpec, build_module
from pipeline.params import is_import_path

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
    meta: Meta | None = None  # the data it trained on; None in checkpoints from before

    def data_meta(self) -> Meta:
        """The Meta of the data it trained on; older checkpoints did not keep one, and
        their image or sequence model needs only what the spec and statistics hold."""
        if self.meta is not None:
            return self.meta
        return Meta(
            class_names=self.class_names,
            input_shape=self.spec.input_shape,
            mean=self.mean,
            std=self.std,
            split_sizes={},
            fingerprint=self.data_fingerprint,
            source={},
            kind=self.spec.kind,
            vocab_size=self.spec.vocab_size,
            task=self.spec.task,
        )

    def build(self, source: str = "checkpoint") -> torch.nn.Module:
        """``build_module``'s unit with these weights, in eval mode; a mismatch, or a user
        factory that can no longer be imported or built, is a StageError."""
        try:
            model = build_module(self.spec, self.data_meta())
        except StageError as exc:
            if not is_import_path(self.spec.name):
                raise
            raise StageError(f"{source} was trained with a user model: {exc}") from None
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
        "meta": checkpoint.data_meta().to_json(),
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
            meta=meta_from_json(payload["meta"]) if "meta" in payload else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(f"checkpoint {path} is missing field {exc}") from None
