from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import ENTRYPOINT, REPO, ServerProcess, start_entrypoint
from serving_helpers import build_model


@pytest.fixture(scope="session")
def deploy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("deploy-models") / "model.onnx")


@pytest.fixture(scope="session")
def entrypoint_server(deploy_model: Path) -> Iterator[ServerProcess]:
    """One server for the manifest and dashboard checks, started through the image entrypoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["--engine", str(deploy_model), "--port", "0", "--threads", "1", "--max-batch-size", "8"]
    server = start_entrypoint(sys.executable, ENTRYPOINT, args, env, REPO)
    yield server
    assert server.terminate() == 0, "\n".join(server.log)
