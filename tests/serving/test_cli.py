"""Start-up refusals (one clear line, non-zero exit), --help, and a torch-free process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.cli import app
from serving.contract import KEY_MODEL_NAME
from tests.serving.serving_helpers import REPO, build_model, free_port

runner = CliRunner()


def test_help_lists_every_flag_with_its_env_var() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flags = "engine model-name host port max-batch-size max-queue-delay-us max-queue-size "
    flags += "timeout-ms provider threads instances flush-denormals no-flush-denormals warmup "
    flags += "no-warmup sequence-batching"
    for flag in flags.split():
        assert f"--{flag}" in result.output
    assert "TENSORFERRY_PORT" in result.output


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, None),
        (["--flush-denormals"], {}, True),
        (["--no-flush-denormals"], {"TENSORFERRY_FLUSH_DENORMALS": "1"}, False),
        ([], {"TENSORFERRY_FLUSH_DENORMALS": "true"}, True),
        ([], {"TENSORFERRY_FLUSH_DENORMALS": "0"}, False),
    ],
    ids=["unset-follows-the-sidecar", "flag", "flag-beats-env", "env-true", "env-0"],
)
def test_flush_denormals_from_flag_or_env_var(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict, expected: bool | None
) -> None:
    from typer.main import get_command

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    context = get_command(app).make_context("serve", ["--engine", "m.onnx", *args])
    assert context.params["flush_denormals"] is expected


def _partial_metadata(tmp: Path) -> Path:
    return build_model(tmp / "partial.onnx", metadata={KEY_MODEL_NAME: "partial"})


def _fixed_batch(tmp: Path) -> Path:
    return build_model(tmp / "fixed.onnx", batch_dim=1)


def _corrupt(tmp: Path) -> Path:
    (tmp / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 50)
    return tmp / "corrupt.onnx"


def _plan_with_unreadable_sidecar(tmp: Path) -> Path:
    (tmp / "m.trt").write_bytes(b"not really a plan")
    (tmp / "m.trt.json").write_text("{not json")
    return tmp / "m.trt"


def _plan_without_tensorrt(tmp: Path) -> Path:
    (tmp / "m.trt").write_bytes(b"not really a plan")
    from tests.serving.serving_helpers import contract

    (tmp / "m.trt.json").write_text(
        json.dumps({"format": "tensorrt", "metadata": contract().to_metadata()})
    )
    return tmp / "m.trt"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: tmp / "missing.onnx", "does not exist"),
        (_corrupt, "is not a loadable ONNX model"),
        (_partial_metadata, "partial tensorferry metadata"),
        (_fixed_batch, "dynamic batch"),
        (_plan_with_unreadable_sidecar, "is unreadable"),
        (_plan_without_tensorrt, "tensorrt is not installed"),
        (
            lambda tmp: (tmp / "m.trt").write_bytes(b"x") and tmp / "m.trt",
            "tensorrt is not installed",
        ),
        (lambda tmp: (tmp / "m.pt").write_bytes(b"x") and tmp / "m.pt", "expected one of"),
    ],
    ids=[
        "missing",
        "corrupt",
        "partial-metadata",
        "fixed-batch",
        "bad-sidecar",
        "no-tensorrt",
        "bare-plan-no-tensorrt",
        "suffix",
    ],  # fmt: skip
)
def test_bad_engine_stops_start_up_with_one_line(tmp_path: Path, make, needle: str) -> None:
    result = runner.invoke(app, ["--engine", str(make(tmp_path)), "--port", "0"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("serve: error:") and needle in lines[0], (
        result.output
    )


@pytest.mark.parametrize("flag", ["--max-batch-size", "--instances"])
def test_bad_settings_are_refused(tiny_model: Path, flag: str) -> None:
    result = runner.invoke(app, ["--engine", str(tiny_model), flag, "0"])
    setting = flag.removeprefix("--").replace("-", "_")
    assert result.exit_code == 2 and f"{setting} must be at least 1" in result.output


@pytest.mark.slow
def test_python_m_serving_exits_non_zero_on_a_bad_engine(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving", "--engine", str(_corrupt(tmp_path))],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not a loadable ONNX model" in done.stderr


PROBE = """
import json, os, signal, sys, threading, time, urllib.request

def probe(url, png_path):
    try:
        check(url, png_path)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)

def check(url, png_path):
    for _ in range(600):
        try:
            if urllib.request.urlopen(url + "/v2/health/ready").status == 200:
                break
        except OSError:
            time.sleep(0.02)
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8",
                                   "data": [1] * 192}]}).encode()
    urllib.request.urlopen(url + "/v2/models/tiny/infer", body).read()
    png = open(png_path, "rb").read()
    urllib.request.urlopen(url + "/v1/classify", png).read()
    print(json.dumps(sorted(m for m in ("torch", "onnx") if m in sys.modules)), flush=True)

threading.Thread(target=probe, args=("http://127.0.0.1:" + sys.argv[2], sys.argv[3])).start()
from serving.cli import main
sys.argv = ["serve", "--engine", sys.argv[1], "--port", sys.argv[2]]
main()
"""


@pytest.mark.slow
def test_serving_never_imports_torch(tmp_path: Path, tiny_model: Path) -> None:
    from PIL import Image

    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "x.png")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_model), str(free_port()), str(tmp_path / "x.png")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_readme_documents_every_flag_and_env_var() -> None:
    from typer.main import get_command

    readme = (REPO / "serving" / "README.md").read_text()
    for param in get_command(app).params:
        if param.name == "help":
            continue
        assert f"`{param.opts[0]}" in readme, f"{param.opts[0]} missing from serving/README.md"
        assert param.envvar in readme, f"{param.envvar} missing from serving/README.md"
