"""How a stage fails: StageError as its own line, anything else as one line naming the
stage and step, the traceback only under TENSORFERRY_DEBUG, and no outputs left."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import DEBUG_ENV, StageError, exit_on_stage_error, step
from tests.pipeline.export_fixtures import make_prepared, train_checkpoint

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


# A real one: train.npz of another image size than meta.json says (the prepare stage never
# writes that, a hand-assembled data directory can). The export stage checks the checkpoint
# against meta.json and the test split, but the train split first meets the model when
# onnxruntime calibrates the int8 variant, inside the stage's atomic output directory.


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatched")
    data = root / "data"
    make_prepared(data)
    checkpoint = train_checkpoint(data, root / "checkpoint.pt", steps=5, name="mlp")
    with np.load(data / "train.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    np.savez(data / "train.npz", x=x[:, :, :16, :16], y=y)
    return data, checkpoint


@pytest.mark.parametrize(
    ("entry", "debug"),
    [(["pipeline.export"], False), (["pipeline", "export"], True)],
    ids=["dvc-stage", "tensorferry-cli-debug"],
)
def test_unanticipated_failure_is_one_line_exit_1_and_leaves_nothing(
    mismatched, tmp_path, entry, debug
):
    data, checkpoint = mismatched
    args = ["--checkpoint", str(checkpoint), "--data-dir", str(data), "--variant", "int8"]
    outputs = ["--out", "models/onnx", "--report", "reports/export.json"]
    result = subprocess.run(
        [sys.executable, "-m", *entry, *args, *outputs],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, DEBUG_ENV: "1" if debug else ""},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    expected = (
        "error: export: int8 quantization: InvalidArgument: [ONNXRuntimeError] : 2 : "
        "INVALID_ARGUMENT : Got invalid dimensions for input: images"
    )
    assert lines[-1].startswith(expected) and "Got: 16 Expected: 20" in lines[-1]
    if debug:
        assert "Traceback (most recent call last):" in result.stderr
        assert "quantize_static" in result.stderr and not lines[-1].endswith(HINT)
    else:
        assert len(lines) == 1 and lines[0].endswith(HINT)
    # Neither models/onnx nor its temporary sibling (which held model.onnx by then).
    assert list((tmp_path / "models").iterdir()) == []
    assert not (tmp_path / "reports").exists()
