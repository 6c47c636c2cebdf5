"""The event loop's Python per inference request, with no sockets and no model run.

Claim (serving/README.md, "What moved the figures"): the loop-side work of a single-image
binary request (HTTP framing, routing, validation, queueing, answering) costs about 9 µs
on the 2-core VM. Under load, every µs here costs about two on the event loop thread,
which shares the cores with onnxruntime and the load generator.

One round feeds the same wrk request into 32 connections of the real server classes, takes
the batch and answers it with outputs onnxruntime computed once. The transport only counts
what it would send. Prints the best of --repeats timings (the least disturbed one).

    python benchmarks/bench_request_path.py [--rounds 1500] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_serving import build_cnn, machine, write_body  # puts the repository on sys.path

from serving.app import App
from serving.backends import load_onnxruntime
from serving.batching import BatchQueue, split
from serving.config import ServerConfig
from serving.http import HttpConnection
from serving.metrics import Metrics
from serving.scheduler import Scheduler

CONNECTIONS = 32


class CountingTransport:
    """Stands in for the socket: counts the answers instead of sending them."""

    def __init__(self) -> None:
        self.answers = 0

    def writelines(self, parts: list[bytes]) -> None:
        self.answers += 1

    def write(self, data: bytes) -> None:
        self.answers += 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    model = build_cnn(folder / "seed_cnn.onnx")
    backend = load_onnxruntime(model, "cpu", 1)
    outputs = backend.run({"images": np.zeros((CONNECTIONS, 3, 32, 32), np.uint8)})
    body_path, header_length = write_body(folder, 1)
    body = body_path.read_bytes()
    request = (
        "POST /v2/models/seed_cnn/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    loop = asyncio.new_event_loop()
    metrics = Metrics("seed_cnn", 64, backend.info)
    scheduler = Scheduler([backend], BatchQueue(64, 0.0001, 1024), metrics, loop)
    app = App(ServerConfig(engine=model), backend, scheduler, metrics)
    app.state.ready = True
    connections, transports = [], []
    for _ in range(CONNECTIONS):
        connection, transport = HttpConnection(app, 1 << 26, set()), CountingTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connections.append(connection)
        transports.append(transport)

    def one_round() -> None:
        for connection in connections:
            connection.data_received(request)
        jobs = scheduler._batches.take()  # what the worker thread would take
        scheduler._finished(jobs, split(outputs, [1] * len(jobs)), None, (0.0,) * 4)
        loop.call_soon(loop.stop)  # run the pass's deferred callbacks, as the loop would
        loop.run_forever()

    for _ in range(50):
        one_round()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.rounds):
            one_round()
        timings.append((time.perf_counter() - start) / (args.rounds * CONNECTIONS) * 1e6)
    answers = sum(t.answers for t in transports)
    expected = (50 + args.repeats * args.rounds) * CONNECTIONS
    if answers != expected:
        sys.exit(f"error: {answers} answers for {expected} requests")
    print(f"machine: {machine().split(';')[0]}")  # the rest describes wrk, unused here
    print(
        f"event-loop Python per single-image request: {min(timings):.1f} µs "
        f"(best of {args.repeats}; all: {', '.join(f'{t:.1f}' for t in timings)})"
    )
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(lambda: [one_round() for _ in range(500)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
