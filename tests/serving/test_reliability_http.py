"""Connections and limits on real server processes: stalled and idle clients, oversized
heads, decompression bombs, batch and name limits, malformed binary framing, API keys.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from serving.config import ServerConfig
from tests.serving.reliability_helpers import (
    closed_by_server,
    infer_json,
    post,
    raw_socket,
    read_responses,
)
from tests.serving.serving_helpers import ServerProcess, fetch, start_server

pytestmark = pytest.mark.timeout(90)

IDLE_S = 0.6
API_KEY = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(tiny_model: Path) -> Iterator[ServerProcess]:
    """A short idle timeout, a 4 KiB head limit and batch <= 4, to hit each limit quickly."""
    args = ("--threads", "1", "--max-batch-size", "4", "--idle-timeout-s", str(IDLE_S))
    process = start_server(tiny_model, *args, "--max-header-kb", "4")
    yield process
    assert process.terminate() == 0, "\n".join(process.log)


# slow and idle clients ---------------------------------------------------------------------------
@pytest.mark.slow
def test_stalled_and_idle_clients_do_not_block_others_and_are_cut(guarded: ServerProcess) -> None:
    idle = [raw_socket(guarded) for _ in range(200)]  # keep-alive connections that say nothing
    stalled_body = raw_socket(guarded)
    stalled_body.sendall(
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{"
    )
    stalled_head = raw_socket(guarded)
    stalled_head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: aaa")
    served = raw_socket(guarded)  # a keep-alive client that keeps talking stays open
    timings = []
    for _ in range(5):
        status, _, seconds = post(guarded, infer_json())
        assert status == 200
        timings.append(seconds)
    # Answered while the stalled clients still hold their connections: a server that waited
    # on them would have answered only after cutting them (IDLE_S on).
    assert closed_by_server(stalled_body) is None and closed_by_server(stalled_head) is None
    deadline = time.monotonic() + IDLE_S * 4
    while time.monotonic() < deadline:
        served.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_responses(served, 1)[0][0] == 200
        time.sleep(IDLE_S / 4)
    assert b"408" in (closed_by_server(stalled_body) or b"never closed")
    assert b"408" in (closed_by_server(stalled_head) or b"never closed")
    still_open = sum(closed_by_server(sock) is None for sock in idle)
    assert still_open == 0 and closed_by_server(served) is None
    for sock in [*idle, stalled_body, stalled_head, served]:
        sock.close()
    print(
        f"\nRELIABILITY slow clients: 200 idle + 2 stalled connections; 5 requests meanwhile "
        f"took at most {max(timings) * 1e3:.0f} ms; all 202 cut after {IDLE_S} s (408 for stalled)"
    )


# limits ------------------------------------------------------------------------------------------
def test_oversized_head_is_431(guarded: ServerProcess) -> None:
    with raw_socket(guarded) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 431
    with raw_socket(guarded) as sock:  # a header that never ends, sent in pieces
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(10):
            time.sleep(0.01)
            try:
                sock.sendall(b"a" * 1000)
            except OSError:
                break
        assert read_responses(sock, 1)[0][0] == 431
    assert post(guarded, infer_json())[0] == 200


def test_batch_above_the_maximum_is_400(guarded: ServerProcess) -> None:
    status, answer, _ = post(guarded, infer_json(rows=5))
    assert status == 400 and "takes 1 to 4" in answer["error"]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's head)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + png[24:29]
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def test_decompression_bomb_is_refused_from_its_header(guarded: ServerProcess) -> None:
    # The data is a 1x1 image: "exceeds" comes from the size check on the header, before any
    # decode; decoding it would fail as "not a decodable image" (below).
    for side in (9000, 20000):  # ours (50 MP) and Pillow's own (179 MP) limit
        status, _, body = fetch(guarded, "/v1/classify", _png_claiming(side, side))
        assert status == 400 and "exceeds" in json.loads(body)["error"]
    status, _, body = fetch(guarded, "/v1/classify", _png_claiming(64, 64))  # truncated data
    assert status == 400 and "not a decodable image" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
        "/v2/models/../../etc/passwd",
        "/v2/models/%2Fetc%2Fpasswd/config",
        "/v2/models/tiny%00/ready",
    ],
)
def test_model_names_never_reach_the_filesystem(guarded: ServerProcess, path: str) -> None:
    status, _, body = fetch(guarded, path)
    assert status in (404, 405) and b"root:" not in body


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", "x" * 200, "tiny\n"])
def test_unsafe_model_names_are_refused_at_start(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        ServerConfig(engine=Path("m.onnx"), model_name=name)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header_length=st.one_of(
        st.text(alphabet="0123456789 -+x.e", max_size=8), st.integers(-5, 500).map(str)
    ),
    body=st.binary(max_size=400),
)
def test_malformed_binary_framing_is_always_400(
    guarded: ServerProcess, header_length: str, body: bytes
) -> None:
    headers = {"Inference-Header-Content-Length": header_length}
    status, answer, _ = post(guarded, body, headers)
    assert status == 400 and answer["error"], (header_length, body, answer)


# API key -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[ServerProcess]:
    process = start_server(tiny_model, "--threads", "1", env={"TENSORFERRY_API_KEY": API_KEY})
    yield process
    assert process.terminate() == 0, "\n".join(process.log)


def test_api_key_guards_everything_but_probes_and_metrics(keyed: ServerProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert fetch(keyed, path)[0] == 200, path
    for path in ("/v2", "/v2/models/tiny", "/v2/openapi.json", "/v2/nothing"):
        status, headers, _ = fetch(keyed, path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
    status, headers, _ = fetch(keyed, "/v2", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert fetch(keyed, "/v2", headers={"Authorization": f"bearer {API_KEY}"})[0] == 200
    status, _, _ = fetch(keyed, "/v2/models/tiny/infer", infer_json(), {"Authorization": API_KEY})
    assert status == 401  # the scheme is required


def test_tritonclient_passes_the_key(keyed: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(keyed.host_port)
    pixels = np.zeros((2, 3, 8, 8), np.uint8)
    tensor = httpclient.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert client.is_server_ready()  # readiness stays public for probes
    result = client.infer("tiny", [tensor], headers=auth)
    assert result.as_numpy("probabilities").shape == (2, 4)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [tensor])
    assert refused.value.status() == "401"
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("tiny")
    assert client.get_model_metadata("tiny", headers=auth)["name"] == "tiny"
