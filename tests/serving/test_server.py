"""The real server process through the real tritonclient, against onnxruntime directly."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.serving.reliability_helpers import raw_socket, read_responses
from tests.serving.serving_helpers import (
    CLASSES,
    ServerProcess,
    fetch,
    images,
    reference,
    start_server,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.host_port, concurrency=8)


def metrics(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    status, _, body = fetch(server, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


# Health and metadata
def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 16
    assert config["input"][0]["dims"] == [3, 8, 8]
    assert json.loads(config["parameters"]["tensorferry.class_names"]["string_value"]) == list(
        CLASSES
    )


def test_unknown_model_is_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"
    assert "nope" in info.value.message()


# Inference round trips
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_matches_onnxruntime(
    client: httpclient.InferenceServerClient, tiny_model: Path, binary_in: bool, binary_out: bool
) -> None:
    batch = images(5, seed=int(binary_in) * 2 + int(binary_out))
    infer_input = httpclient.InferInput("images", list(batch.shape), "UINT8")
    infer_input.set_data_from_numpy(batch, binary_data=binary_in)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary_out)
        for name in ("logits", "probabilities")
    ]
    result = client.infer("tiny", [infer_input], outputs=outputs, request_id="r-1")
    expected = reference(tiny_model, batch)
    assert result.get_response()["id"] == "r-1"
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_infer_default_client_call_and_version_route(
    client: httpclient.InferenceServerClient, tiny_model: Path
) -> None:
    batch = images(1, seed=9)
    infer_input = httpclient.InferInput("images", [1, 3, 8, 8], "UINT8")
    infer_input.set_data_from_numpy(batch)
    result = client.infer("tiny", [infer_input], model_version="1")
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference(tiny_model, batch)["logits"], rtol=1e-6
    )


def test_raw_binary_body(server: ServerProcess, tiny_model: Path) -> None:
    batch = images(1, seed=3)
    status, headers, body = fetch(
        server, "/v2/models/tiny/infer", batch.tobytes(), {"Inference-Header-Content-Length": "0"}
    )
    assert status == 200
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    logits_size = header["outputs"][0]["parameters"]["binary_data_size"]
    logits = np.frombuffer(body[size : size + logits_size], np.float32).reshape(1, 4)
    np.testing.assert_allclose(logits, reference(tiny_model, batch)["logits"], rtol=1e-6)


def test_one_head_repeated_with_new_tensors_answers_each_tensor(
    server: ServerProcess, tiny_model: Path
) -> None:
    """A client repeating its head byte for byte (taken unparsed) gets each tensor's answer."""
    entry = {"name": "images", "shape": [2, 3, 8, 8], "datatype": "UINT8"}
    header = json.dumps(
        {
            "inputs": [{**entry, "parameters": {"binary_data_size": 384}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    head = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(header) + 384}\r\n\r\n"
    ).encode()
    with raw_socket(server) as sock:
        for seed in range(6):
            batch = images(2, seed=100 + seed)
            sock.sendall(head + header + batch.tobytes())
            [(status, body)] = read_responses(sock, 1)
            assert status == 200
            logits = np.frombuffer(body[-32:], np.float32).reshape(2, 4)
            np.testing.assert_allclose(logits, reference(tiny_model, batch)["logits"], rtol=1e-6)


def _assert_concurrent_rows(
    client: httpclient.InferenceServerClient, model: Path, batches: list[np.ndarray]
) -> None:
    """Send every batch before reading any answer; each must get exactly its own rows."""

    def send(batch: np.ndarray) -> httpclient.InferAsyncRequest:
        infer_input = httpclient.InferInput("images", list(batch.shape), "UINT8")
        infer_input.set_data_from_numpy(batch)
        return client.async_infer("tiny", [infer_input])

    # tritonclient.http is gevent-based: concurrency comes from async_infer, not threads.
    pending = [send(batch) for batch in batches]
    for batch, request in zip(batches, pending, strict=True):
        expected = reference(model, batch)
        result = request.get_result()
        for name in ("logits", "probabilities"):
            np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-6)


def test_concurrent_requests_each_get_their_rows(
    client: httpclient.InferenceServerClient, tiny_model: Path
) -> None:
    _assert_concurrent_rows(
        client, tiny_model, [images(1 + i % 3, seed=100 + i) for i in range(24)]
    )


def test_two_instances_answer_each_request_with_its_rows(tiny_model: Path) -> None:
    two = start_server(tiny_model, "--instances", "2", "--threads", "1", "--max-batch-size", "4")
    try:
        client = httpclient.InferenceServerClient(two.host_port, concurrency=8)
        _assert_concurrent_rows(
            client, tiny_model, [images(1 + i % 4, seed=200 + i) for i in range(32)]
        )
        info = [labels for (name, labels) in metrics(two) if name == "tensorferry_model_info"]
        assert dict(info[0])["instances"] == "2"
        assert _a_lone_request_runs_on_both_instances(client, tiny_model, two)
    finally:
        assert two.terminate() == 0, "\n".join(two.log)


def _a_lone_request_runs_on_both_instances(client, model: Path, server: ServerProcess) -> bool:
    """A 4-row request to 2 idle instances runs as 2 batches of 2, answered as one.

    A few tries: the split needs the second worker back at the queue, which takes it
    microseconds after its last batch, unless the OS has descheduled it.
    """
    executions = ("tensorferry_execution_count_total", (("model", "tiny"),))
    for seed in range(5):
        before = metrics(server)[executions]
        _assert_concurrent_rows(client, model, [images(4, seed=300 + seed)])
        if metrics(server)[executions] - before == 2:
            return True
    return False


# Bad input: each a 4xx naming the problem, through the real client where it can send it
def _client_error(
    client: httpclient.InferenceServerClient, batch: np.ndarray, name="images", datatype="UINT8"
):
    infer_input = httpclient.InferInput(name, list(batch.shape), datatype)
    infer_input.set_data_from_numpy(batch)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [infer_input])
    return info.value


@pytest.mark.parametrize(
    ("batch", "name", "datatype", "needle"),
    [
        (images(1), "pixels", "UINT8", "unknown input 'pixels'"),
        (images(1).astype(np.float32), "images", "FP32", "datatype 'FP32'"),
        (np.zeros((1, 3, 9, 8), np.uint8), "images", "UINT8", "shape [1, 3, 9, 8]"),
        (images(17), "images", "UINT8", "batch 17"),
    ],
    ids=["unknown-input", "wrong-dtype", "wrong-shape", "batch-too-big"],
)
def test_bad_tensor_is_400(client, batch, name, datatype, needle) -> None:
    error = _client_error(client, batch, name, datatype)
    assert error.status() == "400"
    assert needle in error.message()


def test_unknown_output_is_400(client: httpclient.InferenceServerClient) -> None:
    infer_input = httpclient.InferInput("images", [1, 3, 8, 8], "UINT8")
    infer_input.set_data_from_numpy(images(1))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [infer_input], outputs=[httpclient.InferRequestedOutput("embeddings")])
    assert info.value.status() == "400" and "unknown output 'embeddings'" in info.value.message()


BINARY_HEADER = json.dumps(
    {
        "inputs": [
            {
                "name": "images",
                "shape": [1, 3, 8, 8],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": 192},
            }
        ]
    }
).encode()


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        (b"{not json", {}, "malformed JSON"),
        (b"[1, 2]", {}, "must be an object"),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1, 3, 8, 8],
                            "datatype": "UINT8",
                            "data": [1, 2],
                        }
                    ]
                }
            ).encode(),
            {},
            "has 2 values",
        ),
        (
            BINARY_HEADER + bytes(100),
            {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
            "runs past the body",
        ),
        (
            BINARY_HEADER + bytes(300),
            {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
            "300 bytes of binary data",
        ),
        (
            BINARY_HEADER + bytes(192),
            {"Inference-Header-Content-Length": "99999"},
            "outside the body",
        ),
        (bytes(191), {"Inference-Header-Content-Length": "0"}, "binary_data_size 191"),
    ],
    ids=[
        "malformed-json",
        "not-object",
        "json-count",
        "binary-short",
        "binary-long",
        "header-length",
        "raw-size",
    ],
)
def test_bad_body_is_400(server: ServerProcess, body: bytes, headers: dict, needle: str) -> None:
    status, _, answer = fetch(server, "/v2/models/tiny/infer", body, headers)
    assert status == 400, answer
    assert needle in json.loads(answer)["error"]


def test_body_over_limit_is_413_and_server_keeps_serving(client, server: ServerProcess) -> None:
    status, _, answer = fetch(server, "/v2/models/tiny/infer", bytes(300 * 1024))
    assert status == 413 and "exceeds the limit" in json.loads(answer)["error"]
    assert client.is_server_live()


def test_routes_and_methods(server: ServerProcess) -> None:
    assert fetch(server, "/v2/nothing-here")[0] == 404
    assert fetch(server, "/v2/models/tiny/versions/7")[0] == 404
    assert fetch(server, "/v2/models/tiny/infer")[0] == 405  # GET
    assert fetch(server, "/v2/health/live")[0] == 200


# Classify
def _png(size=(20, 12), color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_png_matches_onnxruntime(server: ServerProcess, tiny_model: Path) -> None:
    status, _, answer = fetch(server, "/v1/classify?top_k=2", _png(), {"Content-Type": "image/png"})
    assert status == 200, answer
    predictions = json.loads(answer)["predictions"]
    pixels = np.zeros((1, 3, 8, 8), np.uint8)
    pixels[0, 0], pixels[0, 1], pixels[0, 2] = 200, 30, 30  # a flat colour survives resizing
    probs = reference(tiny_model, pixels)["probabilities"][0]
    best = np.argsort(-probs)[:2]
    assert [p["class"] for p in predictions] == [CLASSES[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in predictions], probs[best], rtol=1e-6)


def test_classify_multipart(server: ServerProcess) -> None:
    boundary = "xyzzy"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + _png()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = fetch(server, "/v1/classify", body, headers)
    assert status == 200, answer
    assert len(json.loads(answer)["predictions"]) == len(CLASSES)  # top_k 5 capped at 4 classes


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/classify", b"this is not an image", "not a decodable image"),
        ("/v1/classify?top_k=0", b"", "top_k"),
    ],
)
def test_classify_bad_input_is_400(
    server: ServerProcess, path: str, body: bytes, needle: str
) -> None:
    status, _, answer = fetch(server, path, body, {"Content-Type": "image/png"})
    assert status == 400 and needle in json.loads(answer)["error"]


# Metrics
def test_metrics_count_what_happened(client, server: ServerProcess) -> None:
    before = metrics(server)
    infer_input = httpclient.InferInput("images", [3, 3, 8, 8], "UINT8")
    infer_input.set_data_from_numpy(images(3))
    client.infer("tiny", [infer_input])
    fetch(server, "/v2/models/tiny/infer", b"{bad")
    after = metrics(server)
    model = (("model", "tiny"),)

    def delta(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("tensorferry_request_success_total") == 1
    assert (
        delta("tensorferry_request_failure_total", (("model", "tiny"), ("reason", "bad_request")))
        == 1
    )
    assert delta("tensorferry_inference_count_total") == 3
    assert delta("tensorferry_execution_count_total") == 1
    assert delta("tensorferry_request_duration_seconds_count") == 1
    assert delta("tensorferry_compute_duration_seconds_count") == 1
    assert after[("tensorferry_pending_requests", model)] == 0
    assert after[("tensorferry_inflight_requests", model)] == 0
    assert after[("tensorferry_model_load_duration_seconds", model)] > 0
    info = [labels for (name, labels) in after if name == "tensorferry_model_info"]
    assert dict(info[0])["backend"] == "onnxruntime" and dict(info[0])["provider"] == "cpu"
    assert (
        "tensorferry_request_duration_seconds_bucket",
        (("le", "0.0001"), ("model", "tiny")),
    ) in after


def test_statistics_extension(client: httpclient.InferenceServerClient) -> None:
    """Triton's GET .../stats, as tritonclient and perf_analyzer read it."""
    assert "statistics" in client.get_server_metadata()["extensions"]
    before = client.get_inference_statistics("tiny")["model_stats"][0]
    sent_ms = time.time() * 1e3
    for rows in (3, 2):  # one after the other: two batches
        infer_input = httpclient.InferInput("images", [rows, 3, 8, 8], "UINT8")
        infer_input.set_data_from_numpy(images(rows))
        client.infer("tiny", [infer_input])
    answered_ms = time.time() * 1e3
    after = client.get_inference_statistics("tiny", "1")["model_stats"][0]
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "tiny"
    assert (after["name"], after["version"]) == ("tiny", "1")
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] - before["execution_count"] == 2
    # Wall-clock ms (Triton's unit), between sending and the last answer; 1 ms for rounding.
    assert sent_ms - 1 <= after["last_inference"] <= answered_ms + 1

    def grew(stat: str) -> tuple[int, int]:
        new, old = after["inference_stats"][stat], before["inference_stats"][stat]
        return new["count"] - old["count"], new["ns"] - old["ns"]

    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    success, *spent = grew("success"), *map(grew, phases)
    assert success[0] == 2 and all(count == 2 for count, _ in spent)
    assert grew("compute_infer")[1] > 0
    assert success[1] >= sum(ns for _, ns in spent)  # a request's time covers its queue and batch
    by_size = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    old_sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert by_size[3] - old_sizes.get(3, 0) == 1 and by_size[2] - old_sizes.get(2, 0) == 1
    assert sum(by_size.values()) == after["execution_count"]
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("nope")
    assert info.value.status() == "404"


def test_gzip_request_body(client: httpclient.InferenceServerClient, tiny_model: Path) -> None:
    batch = images(2, seed=11)
    infer_input = httpclient.InferInput("images", [2, 3, 8, 8], "UINT8")
    infer_input.set_data_from_numpy(batch)
    result = client.infer("tiny", [infer_input], request_compression_algorithm="gzip")
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference(tiny_model, batch)["logits"], rtol=1e-6
    )


def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    import socket

    host, port = server.host_port.split(":")
    body = json.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [0] * 192}
            ]
        }
    ).encode()
    infer = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    live = b"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(infer + live + last)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200"] * 3
    assert b'"model_name":"tiny"' in answers[0] and b'"versions"' in answers[1]


def test_malformed_http_is_400_then_closed(server: ServerProcess, client) -> None:
    import socket

    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in received
    assert client.is_server_live()
