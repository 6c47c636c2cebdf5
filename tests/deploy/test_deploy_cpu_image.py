"""The CPU image without Docker: replay Dockerfile.cpu on this host and serve from the result.

The build stage's WORKDIR/COPY/ENV/RUN lines are read from the Dockerfile and run as
written, with /opt/venv and /src moved under a temporary directory, so the test's install
is the image's install (same sources through .dockerignore, same pip command). The
runtime stage's ENV, ENTRYPOINT and CMD then start the server from that fresh virtual
environment (model path swapped in, port 0), which must answer like onnxruntime and hold
no torch. Served: a helper-built ONNX, and the fp32 and int8 exports of a briefly trained
seed_cnn (tests/pipeline/export_fixtures.py). Needs PyPI (or pip's cache); 20-60 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from deploy_helpers import (
    DEPLOY,
    REPO,
    Instruction,
    dockerignored,
    env_of,
    infer_json,
    parse_dockerfile,
    stages,
    start_entrypoint,
)

DOCKERFILE = DEPLOY / "docker" / "Dockerfile.cpu"
TRAINING_ONLY = ("torch", "dvc", "dvclive", "onnx", "onnxscript", "scikit-learn", "matplotlib")


class Replay:
    """Container paths mapped under ``root``; a minimal runner for our Dockerfile's lines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = root
        self.env = {"PATH": os.environ["PATH"], "HOME": str(root), "LANG": "C.UTF-8"}

    def path(self, text: str) -> str:
        for container in ("/opt/venv", "/opt/tensorferry", "/src"):
            text = text.replace(container, str(self.root / container.strip("/")))
        return text

    def copy(self, value: str) -> None:
        *sources, dest = value.split()
        target = Path(self.path(dest)) if dest.startswith("/") else self.cwd / dest
        for source in sources:
            name = source.rstrip("/")
            assert not dockerignored(name), f"{name} is outside the build context"
            origin = REPO / name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target / origin.name)
            else:
                shutil.copy(origin, target)

    def run(self, ins: Instruction) -> None:
        if ins.keyword == "WORKDIR":
            self.cwd = Path(self.path(ins.value))
            self.cwd.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            self.copy(ins.value)
        elif ins.keyword == "ENV":
            self.env.update({k: self.path(v) for k, v in env_of([ins]).items()})
        elif ins.keyword == "RUN":
            subprocess.run(
                ["sh", "-ec", self.path(ins.value)], cwd=self.cwd, env=self.env, check=True
            )
        else:
            raise AssertionError(f"the test cannot replay {ins.keyword} {ins.value}")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    build, runtime = stages(parse_dockerfile(DOCKERFILE))
    replay = Replay(tmp_path_factory.mktemp("image"))
    # `python` in the image is 3.11; here it is the interpreter running the tests.
    shim = replay.root / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    replay.env["PATH"] = f"{shim}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    for ins in build[1:]:
        replay.run(ins)
    # The runtime stage: only the files and settings, the venv is already in place.
    replay.env = {"PATH": "/usr/bin:/bin", "HOME": str(replay.root), "LANG": "C.UTF-8"}
    for ins in runtime[1:]:
        if ins.keyword in ("COPY", "ENV", "WORKDIR") and "--from" not in ins.value:
            replay.run(ins)
    replay.entry = [replay.path(a) for a in _one(runtime, "ENTRYPOINT").exec_form()]
    replay.cmd = _one(runtime, "CMD").exec_form()
    return replay


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    (found,) = [i for i in stage if i.keyword == keyword]
    return found


def _python(image: Replay, code: str) -> str:
    venv_python = image.root / "opt" / "venv" / "bin" / "python"
    result = subprocess.run(
        [str(venv_python), "-c", code], cwd=image.cwd, env=image.env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip()


@pytest.mark.slow
def test_fresh_venv_has_serving_and_no_training_stack(image: Replay) -> None:
    where = _python(image, "import serving; print(serving.__file__)")
    assert where.startswith(str(image.root / "opt" / "venv")), where
    installed = _python(
        image,
        "import importlib.metadata as m, re; print(' '.join(re.sub(r'[-_.]+', '-', "
        "d.metadata['Name']).lower() for d in m.distributions()))",
    ).split()
    assert {"onnxruntime", "prometheus-client", "httptools", "uvloop", "tensorferry"} <= set(
        installed
    )
    assert not set(TRAINING_ONLY) & set(installed), set(TRAINING_ONLY) & set(installed)


def _served_model(which: str, helper_model: Path) -> Path:
    if which == "helper":
        return helper_model
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.pipeline.export_fixtures import shared_export  # a trained seed_cnn, exported

    return shared_export().variant(which.removeprefix("exported-"))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["helper", "exported-fp32", "exported-int8"])
def test_image_entrypoint_serves_correct_answers(
    image: Replay, deploy_model: Path, which: str
) -> None:
    model = _served_model(which, deploy_model)
    assert image.cmd == ["--engine", "/models/model.onnx"]
    python, entrypoint = image.entry
    args = [model.as_posix() if a == "/models/model.onnx" else a for a in image.cmd]
    env = {**image.env, "TENSORFERRY_PORT": "0", "TENSORFERRY_THREADS": "1"}
    server = start_entrypoint(python, Path(entrypoint), args, env, image.cwd)
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        shape = (5, *json.loads(meta["tensorferry.preprocessing"])["image"]["shape"])
        images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        answer = infer_json(server.url, meta["tensorferry.model_name"], images)
        logits, probabilities = session.run(["logits", "probabilities"], {"images": images})
        got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
        np.testing.assert_allclose(got["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
        port = server.url.rsplit(":", 1)[1]
        health = subprocess.run(
            [python, str(image.root / "opt" / "tensorferry" / "healthcheck.py")],
            env={**image.env, "TENSORFERRY_PORT": port}, timeout=30, check=False,
        )  # fmt: skip
        assert health.returncode == 0
    finally:
        assert server.terminate() == 0, "\n".join(server.log)
