"""The real server process through KServe's own v2 REST client, against onnxruntime directly.

KServe's client reads more than tritonclient does: the health routes' JSON bodies
(``{"live": true}``, ``{"ready": true}``), and the error text of a failed request.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serving.serving_helpers import ServerProcess, images, reference

# Importing kserve parses sys.argv for its model server's flags, and argparse exits on
# pytest's: `pytest --co` abbreviates kserve's `--configure_logging`.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
finally:
    sys.argv = _argv

pytestmark = pytest.mark.timeout(60)

Call = Callable[[InferenceRESTClient, str], Awaitable[Any]]


def ask(server: ServerProcess, call: Call) -> Any:
    """Run ``call`` with a fresh v2 client pointed at ``server``."""

    async def main() -> Any:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
            return await call(client, server.url)

    return asyncio.run(main())


def request(
    batch: np.ndarray, binary_in: bool, binary_out: bool, name: str = "images"
) -> InferRequest:
    tensor = InferInput(name, list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary_in)
    parameters = {"binary_data_output": True} if binary_out else None
    return InferRequest("tiny", [tensor], request_id="k-1", parameters=parameters)


def test_health(server: ServerProcess) -> None:
    async def health(client: InferenceRESTClient, url: str) -> list[bool]:
        return [
            await client.is_server_live(url),
            await client.is_server_ready(url),
            await client.is_model_ready(url, "tiny"),
            await client.is_model_ready(url, "nope"),
        ]

    assert ask(server, health) == [True, True, True, False]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_matches_onnxruntime(
    server: ServerProcess, tiny_model: Path, binary_in: bool, binary_out: bool
) -> None:
    batch = images(3, seed=20 + int(binary_in) * 2 + int(binary_out))
    headers: dict[str, str] = {}

    async def infer(client: InferenceRESTClient, url: str):
        sent = request(batch, binary_in, binary_out)
        return await client.infer(url, sent, model_name="tiny", response_headers=headers)

    response = ask(server, infer)
    assert (response.model_name, response.id) == ("tiny", "k-1")
    # The header marks a binary answer: proof the client decoded the form it asked for.
    assert ("inference-header-content-length" in headers) == binary_out
    got = {output.name: output.as_numpy() for output in response.outputs}
    expected = reference(tiny_model, batch)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == want.shape
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "name", "status", "needle"),
    [
        ("tiny", "pixels", 400, "unknown input 'pixels'"),
        ("nope", "images", 404, "'nope' is not found"),
    ],
)
def test_errors_reach_the_client(
    server: ServerProcess, model: str, name: str, status: int, needle: str
) -> None:
    async def infer(client: InferenceRESTClient, url: str):
        return await client.infer(url, request(images(1), True, True, name), model_name=model)

    with pytest.raises(httpx.HTTPStatusError) as info:
        ask(server, infer)
    assert info.value.response.status_code == status
    assert needle in str(info.value)  # the client quotes the server's {"error": ...}
    assert ask(server, lambda client, url: client.is_server_ready(url))
