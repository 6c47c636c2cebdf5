"""One way for every stage to fail: a single clear line on stderr and a non-zero exit.

A StageError is a problem the stage foresaw and words itself. Anything else is reported
as ``error: <stage>: <step>: <Type>: <message>``, where the step is the innermost
``step(...)`` the exception left; ``TENSORFERRY_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

DEBUG_ENV = "TENSORFERRY_DEBUG"
MESSAGE_LIMIT = 300  # characters of an unexpected exception's message in the error line
_STEP_ATTRIBUTE = "tensorferry_step"


class StageError(Exception):
    """A problem with the user's params, data or model files, stated in one line."""


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Label the code inside as step ``name`` of its stage (also usable as a decorator).

    An exception leaving it is tagged with ``name`` unless an inner step tagged it first,
    so the error line names the most specific step.
    """
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, _STEP_ATTRIBUTE):
            setattr(exc, _STEP_ATTRIBUTE, name)
        raise


def _error_line(stage: str, exc: BaseException) -> str:
    """``error: <stage>: <step>: <Type>: <message>``, the message on one line.

    The whole message, not its first line: ONNX Runtime puts the useful part of its
    errors (which index, got, expected) on the lines after the first.
    """
    message = " ".join(str(exc).split())
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
    parts = [stage, getattr(exc, _STEP_ATTRIBUTE, None), type(exc).__name__, message]
    return "error: " + ": ".join(part for part in parts if part)


def _debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_on_stage_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn any exception into one ``error:`` line on stderr and exit status 1.

    The stage is the name of the file ``fn`` is defined in (pipeline/<stage>.py, one per
    dvc.yaml stage); ``fn.__module__`` would say ``__main__`` under ``python -m``.
    KeyboardInterrupt and SystemExit are not Exceptions, so they pass through.
    """
    stage = Path(fn.__code__.co_filename).stem

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except Exception as exc:  # the ones no stage anticipated: still one line, no trace
            line = _error_line(stage, exc)
            if _debug_enabled():
                traceback.print_exception(exc)
                print(line, file=sys.stderr)
            else:
                print(f"{line} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1)

    return wrapper


def run_command(command: Callable[..., None]) -> None:
    """Run one typer command as a script (``python -m pipeline.<stage>``)."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app()
