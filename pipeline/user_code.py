"""Importing a user's loader or model factory from a ``package.module:attribute`` param.

The module is imported from the Python path, which under ``dvc repro`` and ``python -m``
starts with the working directory, so a package in the repository (``examples/``) works
as it is. Every failure names the param, the path and what went wrong.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.errors import StageError


def import_callable(path: str, param: str) -> Callable[..., Any]:
    """The callable ``package.module:attribute`` names; ``param`` is where it was set
    (e.g. "data.source"), for the message."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while importing
        raise StageError(
            f"{param} {path!r}: cannot import {module_name}: {type(exc).__name__}: {exc} "
            "(is its package on PYTHONPATH or in the working directory?)"
        ) from None
    target = getattr(module, attribute, None)
    if not callable(target):
        what = "is not callable" if target is not None else f"has no attribute {attribute!r}"
        raise StageError(f"{param} {path!r}: module {module_name} {what}")
    return target
