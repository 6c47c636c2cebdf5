"""Bring your own model: ``model.name: "package.module:factory"`` in params.yaml.

tensorferry imports the factory (from the working directory or PYTHONPATH, see
pipeline/user_code.py) and calls it as::

    def factory(meta: pipeline.dataset.Meta, options: dict) -> torch.nn.Module

``meta`` describes the prepared data (``data/prepared/meta.json``): ``kind``,
``input_shape``, ``task``, ``class_names``, ``num_outputs``, per-channel ``mean``/``std``
(images, series), ``vocab_size`` (text), ``columns`` (tabular) and ``target_mean`` /
``target_std`` (regression). ``options`` is ``model.options`` from params.yaml, verbatim.

The module's ``forward`` takes what the prepared data holds, as served clients send it:

- image: uint8 pixels [N, C, H, W] (standardise them yourself, e.g. with
  ``pipeline.models.Preprocess(meta.mean, meta.std)``);
- text: int64 token ids [N, L] and an int64 mask [N, L] (1 real, 0 padding);
- series: float32 raw values [N, C, T] and an int64 mask [N, T];
- tabular: float32 raw values [N, F] in ``meta.columns`` order, categorical columns as
  codes, NaN for a missing cell under ``data.missing: impute``;
  ``pipeline.models.TabularPreprocess(meta.columns)`` encodes them as the built-in mlp does.

and returns logits [N, len(meta.class_names)] (classification), or for regression the
**standardised** target ``(y - meta.target_mean) / meta.target_std`` as [N] or [N, 1]:
tensorferry appends ``* target_std + target_mean``, so losses stay well scaled and the
exported graph answers in target units. A first forward of one train batch checks the
shape. The module must export with ``torch.onnx.export(dynamo=True)``: tensor ops only,
no Python branching on tensor values.

The checkpoint keeps the import path, the options and the Meta, and rebuilds the module
by calling the factory again, so the package must be importable wherever evaluate,
export and engine run; the weights come from the checkpoint's state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.dataset import Meta
from pipeline.errors import StageError
from pipeline.user_code import import_callable

PARAM = "model.name"


def user_network(path: str, meta: Meta, options: dict[str, Any]) -> nn.Module:
    """The module ``factory(meta, options)`` returns; any failure is one StageError."""
    factory = import_callable(path, PARAM)
    try:
        module = factory(meta, dict(options))
    except Exception as exc:  # the user's code may raise anything
        lines = str(exc).strip().splitlines()
        detail = f": {lines[0]}" if lines else ""
        raise StageError(
            f"{PARAM} {path!r}: the factory raised {type(exc).__name__}{detail}"
        ) from None
    if not isinstance(module, nn.Module):
        raise StageError(
            f"{PARAM} {path!r}: the factory returned a {type(module).__name__}, "
            "not a torch.nn.Module"
        )
    return module


def check_output(output: Any, rows: int, meta: Meta, path: str) -> None:
    """The factory's module must give one row of ``meta.num_outputs`` values per input row
    (regression: [N] or [N, 1]); checked once on a train batch of ``rows`` rows."""
    if meta.is_regression:
        allowed, expected = ((rows,), (rows, 1)), "[N] or [N, 1] (the standardised target)"
    else:
        classes = meta.num_outputs
        allowed, expected = ((rows, classes),), f"[N, {classes}] (N rows, {classes} classes)"
    if isinstance(output, torch.Tensor) and tuple(output.shape) in allowed:
        return
    got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise StageError(
        f"{PARAM} {path!r}: the factory returned a module whose output is {got} for a batch "
        f"of {rows} rows, expected {expected}"
    )
