"""A lean reference server: about the least a Python server can do per inference request.

The design the serving plan measured (httptools on uvloop, no ASGI layer, batches run in
one worker thread), cut to the bone: no validation, no metrics, no timeouts or limits,
and it answers only the binary request bench_serving.py sends (with the same bytes the
real server answers). bench_serving.py runs it beside the real server in alternating
runs, so the table shows how much of the distance to the onnxruntime ceiling is what the
real server adds and how much any server of this design pays on the same machine.
Not a server to deploy.

    python benchmarks/lean_server.py MODEL PORT THREADS
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import deque
from pathlib import Path

import httptools
import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.backends import load_onnxruntime  # noqa: E402  (the real server's session settings)

MAX_BATCH = 64


class Worker:
    """One thread runs everything queued (up to MAX_BATCH rows) as one batch."""

    def __init__(self, backend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self.queue: deque[tuple[Connection, np.ndarray]] = deque()
        self.ready = threading.Condition()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, connection: Connection, array: np.ndarray) -> None:
        with self.ready:
            self.queue.append((connection, array))
            self.ready.notify()

    def take(self) -> list[tuple[Connection, np.ndarray]]:
        with self.ready:
            self.ready.wait_for(lambda: self.queue)
            batch, rows = [], 0
            while self.queue and rows + len(self.queue[0][1]) <= MAX_BATCH:
                batch.append(self.queue.popleft())
                rows += len(batch[-1][1])
            return batch

    def run(self) -> None:
        while batch := self.take():
            arrays = [array for _, array in batch]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            outputs = self.backend.run({"images": batch})
            self.loop.call_soon_threadsafe(answer, batch, outputs)


def answer(batch: list[tuple[Connection, np.ndarray]], outputs: dict[str, np.ndarray]) -> None:
    start = 0
    for connection, array in batch:
        parts = [outputs[name][start : start + len(array)] for name in outputs]
        start += len(array)
        entries = [
            {
                "name": name,
                "datatype": "FP32",
                "shape": list(part.shape),
                "parameters": {"binary_data_size": part.nbytes},
            }
            for name, part in zip(outputs, parts, strict=True)
        ]
        header = json.dumps(
            {"model_name": "seed_cnn", "model_version": "1", "outputs": entries},
            separators=(",", ":"),
        ).encode()
        body = header + b"".join(part.tobytes() for part in parts)
        if connection.transport.is_closing():  # the client left while its batch ran
            continue
        connection.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
            % (len(header), len(body), body)
        )


class Connection(asyncio.Protocol):
    def __init__(self, worker: Worker, shape: tuple[int, ...]) -> None:
        self.worker = worker
        self.shape = shape
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport
        self.header_length = 0
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = int(value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_method() == b"GET":  # readiness probe
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        body, self.body = b"".join(self.body), []
        array = np.frombuffer(body, np.uint8, offset=self.header_length)
        self.worker.submit(self, array.reshape(-1, *self.shape))


async def main(model: Path, port: int, threads: int) -> None:
    loop = asyncio.get_running_loop()
    backend = load_onnxruntime(model, "cpu", threads)
    shape = backend.signature.inputs[0].shape[1:]
    for size in (1, MAX_BATCH):
        backend.run({"images": np.zeros((size, *shape), np.uint8)})
    worker = Worker(backend, loop)
    server = await loop.create_server(lambda: Connection(worker, shape), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
