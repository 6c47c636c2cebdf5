"""Tools for the reliability tests: a model that fails at run time, raw HTTP, counting.

The failing model is real ONNX, no mock: a Gather whose index is the batch's brightest
pixel, from a table of POISON entries, so onnxruntime raises "indices element out of data
bounds" for any batch holding a pixel >= POISON and runs normally otherwise.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.serving.serving_helpers import ServerProcess, build_model

POISON = 200


def build_poison_model(path: Path, slow_rounds: int = 0) -> Path:
    build_model(path, slow_rounds=slow_rounds)
    model = onnx.load(path)
    graph = model.graph
    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_ok"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(POISON, np.float32), "poison_table"),
            numpy_helper.from_array(np.array(0.0, np.float32), "poison_zero"),
        ]
    )
    poison = [
        helper.make_node("ReduceMax", ["images"], ["brightest"], keepdims=0),
        helper.make_node("Cast", ["brightest"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["poison_table", "index"], ["picked"]),
        helper.make_node("Mul", ["picked", "poison_zero"], ["nothing"]),
        helper.make_node("Add", ["logits_ok", "nothing"], ["logits"]),
    ]
    softmax = len(graph.node) - 1  # keep Softmax last: nodes must stay in topological order
    for offset, node in enumerate(poison):
        graph.node.insert(softmax + offset, node)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def infer_json(rows: int = 1, value: int = 7, request_id: str | None = None) -> bytes:
    request: dict = {
        "inputs": [
            {
                "name": "images",
                "shape": [rows, 3, 8, 8],
                "datatype": "UINT8",
                "data": [value] * (rows * 192),
            }
        ]
    }
    if request_id is not None:
        request["id"] = request_id
    return json.dumps(request).encode()


def post(
    server: ServerProcess, body: bytes, headers: dict | None = None, timeout: float = 30
) -> tuple[int, dict, float]:
    """One request on its own connection: (status, JSON answer, seconds)."""
    start = time.perf_counter()
    connection = server.connection(timeout)
    try:
        connection.request("POST", "/v2/models/tiny/infer", body, headers or {})
        response = connection.getresponse()
        answer = json.loads(response.read() or b"{}")
        return response.status, answer, time.perf_counter() - start
    finally:
        connection.close()


def raw_socket(server: ServerProcess, timeout: float = 10) -> socket.socket:
    host, port = server.host_port.split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """Read ``count`` HTTP/1.1 responses (Content-Length framed) from one connection."""
    buffer, answers = b"", []
    while len(answers) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            buffer += _recv(sock)
            continue
        head = buffer[:head_end].decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length")
        )
        while len(buffer) < head_end + 4 + length:
            buffer += _recv(sock)
        answers.append((int(head[0].split()[1]), buffer[head_end + 4 : head_end + 4 + length]))
        buffer = buffer[head_end + 4 + length :]
    return answers


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("server closed the connection before answering")
    return chunk


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None if the connection is still open."""
    sock.setblocking(False)
    try:
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return b""
    finally:
        sock.setblocking(True)


def counters(server: ServerProcess) -> dict[str, float]:
    """Request outcome counters by name: success, rejected, timeout, bad_request, backend."""
    from prometheus_client.parser import text_string_to_metric_families

    connection = server.connection()
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tensorferry_request_success_total":
                found["success"] = sample.value
            elif sample.name == "tensorferry_request_failure_total":
                found[sample.labels["reason"]] = sample.value
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before.get(k, 0)) for k in after}
