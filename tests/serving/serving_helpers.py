"""Small ONNX models carrying the tensorferry contract, and a real server process to test.

Models are built with onnx.helper (no torch): Cast -> Div -> Flatten -> Gemm gives
``logits``, Softmax gives ``probabilities``. The "slow" variant adds a matrix chain that
costs every backend run the same whatever the batch or its pixels, for queue tests: about
2.5 ms per round at 1 intra-op thread on our CI's Xeon VM (30 rounds ~75 ms, 120 ~0.3 s).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from serving.contract import IMAGE_CLASSIFICATION, ImagePreprocessing, ModelContract

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog", "ship", "truck")


def images(batch: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images shaped for the default tiny model."""
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, 8, 8), dtype=np.uint8)


@lru_cache
def _session(model: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def reference(model: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    """What onnxruntime called directly answers for ``batch``: the expected server outputs."""
    logits, probabilities = _session(model).run(["logits", "probabilities"], {"images": batch})
    return {"logits": logits, "probabilities": probabilities}


def contract(shape: tuple[int, int, int] = (3, 8, 8), name: str = "tiny") -> ModelContract:
    return ModelContract(
        model_name=name,
        task=IMAGE_CLASSIFICATION,
        class_names=CLASSES,
        image=ImagePreprocessing("images", "NCHW", shape, "uint8", (0.0, 255.0)),
        precision="fp32",
    )


def _slow_nodes(size: int, rounds: int, rng: np.random.Generator) -> tuple[list, list]:
    """Nodes that cost ``rounds`` [size x size] matmuls per run and add 0 to the logits.

    The matrix is orthogonal, so the chain keeps the norm of the batch's mean pixel: its
    values never decay into float32 subnormals, which cost some x86 CPUs ~45x (a
    Gaussian matrix / size did, after ~24 rounds), so a run costs the same for any input.
    """
    orthogonal, _ = np.linalg.qr(rng.standard_normal((size, size)))
    inits = [numpy_helper.from_array(orthogonal.astype(np.float32), "w_slow")]
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "w_slow"], ["slow_0"]),
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"slow_{i}", "w_slow"], [f"slow_{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"slow_{rounds}"], ["slow_mean"], keepdims=0),
        helper.make_node("Mul", ["slow_mean", "zero"], ["slow_zero"]),
        helper.make_node("Add", ["gemm", "slow_zero"], ["logits"]),
    ]
    return nodes, inits


def build_model(
    path: Path,
    *,
    shape: tuple[int, int, int] = (3, 8, 8),
    metadata: dict[str, str] | None = None,
    slow_rounds: int = 0,
    batch_dim: str | int = "batch",
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    features = int(np.prod(shape))
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(
            rng.standard_normal((features, len(CLASSES))).astype(np.float32), "w"
        ),
        numpy_helper.from_array(rng.standard_normal(len(CLASSES)).astype(np.float32), "b"),
    ]
    gemm_out = "gemm" if slow_rounds else "logits"
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["x"]),
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], [gemm_out]),
    ]
    if slow_rounds:
        slow, slow_inits = _slow_nodes(512, slow_rounds, rng)
        nodes += slow
        inits += slow_inits
    return _save(path, nodes, inits, shape, batch_dim, metadata)


def build_subnormal_model(
    path: Path, shape: tuple[int, int, int] = (3, 8, 8), scale: float = 2.0**-100
) -> Path:
    """A model whose floats underflow, to show which threads flush denormals to zero.

    Every logit is the mean of pixel x 2^100 x 2^-140, times ``scale``. 2^-140 is a
    subnormal constant, read as 0 by a thread that flushes: logits exactly 0. Elsewhere a
    logit is the mean pixel x 2^-40 x ``scale``: by default a subnormal result (that
    flushing zeroes too); with ``scale=1.0`` a normal one, so that one unflushed thread
    among those sharing the work shows (shape (3, 512, 512) spreads it over 2 threads).
    """
    inits = [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("up", 2.0**100), ("subnormal", 2.0**-140), ("scale", scale))
    ]
    inits.append(numpy_helper.from_array(np.array([1, len(CLASSES)], np.int64), "repeats"))
    node = helper.make_node
    nodes = [
        node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        node("Mul", ["f", "up"], ["big"]),
        node("Mul", ["big", "subnormal"], ["small"]),
        node("ReduceMean", ["small"], ["mean"], axes=[1, 2, 3], keepdims=1),
        node("Flatten", ["mean"], ["flat"], axis=1),
        node("Mul", ["flat", "scale"], ["scaled"]),
        node("Tile", ["scaled", "repeats"], ["logits"]),
    ]
    return _save(path, nodes, inits, shape)


def _save(path, nodes, inits, shape, batch_dim="batch", metadata=None) -> Path:
    """``nodes`` end in ``logits``: add Softmax, the images input, the contract; save."""
    nodes = [*nodes, helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [batch_dim, *shape])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, len(CLASSES)]),
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, [batch_dim, len(CLASSES)]
            ),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(
        model, contract(shape).to_metadata() if metadata is None else metadata
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """``python -m serving`` on an ephemeral loopback port, its log collected in a thread."""

    proc: subprocess.Popen
    url: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        host, port = self.host_port.split(":")
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def _pump(server: ServerProcess, found: threading.Event) -> None:
    assert server.proc.stderr is not None
    for line in server.proc.stderr:
        server.log.append(line.rstrip())
        match = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if match:
            server.url = match.group(1)
            found.set()
    found.set()


def start_server(
    engine: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True
) -> ServerProcess:
    command = [sys.executable, "-m", "serving", "--engine", str(engine), "--port", "0", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return launch(command, REPO, full_env, ready=ready)


def launch(
    command: list[str], cwd: Path, env: dict[str, str], ready: bool = True, wait_s: float = 30
) -> ServerProcess:
    """Start a server command that logs `listening on URL`; wait for it (and readiness)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    server = ServerProcess(proc)
    found = threading.Event()
    threading.Thread(target=_pump, args=(server, found), daemon=True).start()
    if not found.wait(wait_s) or not server.url:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "\n".join(server.log))
    if ready:
        wait_ready(server)
    return server


def wait_ready(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("server never became ready:\n" + "\n".join(server.log))


def fetch(server: ServerProcess, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) for any status: urllib raises on non-2xx, we don't."""
    request = urllib.request.Request(server.url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def wait_until_holding(
    server: ServerProcess, inflight: int, queued: int, timeout: float = 30.0
) -> None:
    """Poll /metrics until ``inflight`` infer requests are unanswered, ``queued`` of them
    still queued and the rest running: a sync point that holds on a CPU of any speed."""
    wanted = {"inflight": float(inflight), "pending": float(queued)}
    deadline = time.monotonic() + timeout
    while (held := _held(server)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"the server never held {wanted}; last {held}")
        time.sleep(0.005)


def _held(server: ServerProcess) -> dict[str, float]:
    body = fetch(server, "/metrics")[2].decode()
    found = re.findall(r"^tensorferry_(inflight|pending)_requests\{.*\} (\S+)$", body, re.M)
    return {name: float(value) for name, value in found}
