"""How a stage fails: StageError as its own line, anything else as one line naming the
stage and step, the traceback only under TENSORFERRY_DEBUG."""

from __future__ import annotations

import pytest

from pipeline.errors import DEBUG_ENV, StageError, exit_on_stage_error, step

HINT = f"(set {DEBUG_ENV}=1 for the traceback)"


@exit_on_stage_error
def stage(exc: BaseException, inner: bool = True) -> None:
    with step("outer"):
        if not inner:
            raise exc
        with step("inner"):
            raise exc


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def fail(capsys, exc: BaseException, inner: bool = True) -> str:
    with pytest.raises(SystemExit) as exit_info:
        stage(exc, inner)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def test_stage_error_keeps_its_message(capsys):
    assert fail(capsys, StageError("params: train.epochs must be int")) == (
        "error: params: train.epochs must be int\n"
    )


def test_unexpected_exception_names_stage_and_innermost_step(capsys):
    err = fail(capsys, TypeError("'NoneType' object\n  is not iterable"))
    assert (
        err == f"error: test_errors: inner: TypeError: 'NoneType' object is not iterable {HINT}\n"
    )
    assert (
        fail(capsys, KeyError("x"), inner=False)
        == f"error: test_errors: outer: KeyError: 'x' {HINT}\n"
    )


def test_debug_flag_adds_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    lines = fail(capsys, ValueError("bad")).splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ValueError: bad", "error: test_errors: inner: ValueError: bad"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupts_and_exits_pass_through(capsys, exc):
    with pytest.raises(type(exc)) as raised:
        stage(exc)
    assert raised.value is exc
    assert capsys.readouterr().err == ""
