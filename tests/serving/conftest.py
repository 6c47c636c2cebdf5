from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.serving_helpers import ServerProcess, build_model, start_server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    """One fast server per module: 1 intra-op thread, a small body limit for the 413 test."""
    process = start_server(
        tiny_model,
        "--threads",
        "1",
        "--max-batch-size",
        "16",
        env={"TENSORFERRY_MAX_REQUEST_MB": "0.25"},
    )
    yield process
    assert process.terminate() == 0, "\n".join(process.log)
