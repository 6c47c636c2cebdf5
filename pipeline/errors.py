"""One way for every stage to fail: a single clear line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class StageError(Exception):
    """A problem with the user's params, data or model files, stated in one line."""


def exit_on_stage_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a StageError into ``error: <message>`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def run_command(command: Callable[..., None]) -> None:
    """Run one typer command as a script (``python -m pipeline.<stage>``)."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app()
