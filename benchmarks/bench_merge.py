"""Merging single-image requests into a batch while another thread runs Python.

Claim (serving/batching.py, ``merge``): np.concatenate lets go of the GIL for every part it
copies, and getting it back from a thread that is busy in Python (the server's event loop
under load) can wait out the interpreter's switch interval (5 ms) once per part, while
bytes.join copies under the GIL. This times both, and np.concatenate with nothing else
running, on the worker's pattern: merge, then sleep 1 ms as if in session.run.

    python benchmarks/bench_merge.py [--parts 31] [--rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.batching import merge  # noqa: E402


def timed(build: Callable[[], np.ndarray], rounds: int) -> list[float]:
    """µs per merge, sleeping 1 ms between merges as the worker does in session.run."""
    spent = []
    for _ in range(rounds):
        start = time.perf_counter()
        build()
        spent.append((time.perf_counter() - start) * 1e6)
        time.sleep(0.001)
    return spent


def busy_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=31, help="single-image requests per batch")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    # Each part as the server holds it: a read-only view of a request body.
    parts = [np.frombuffer(bytes(3 * 32 * 32), np.uint8).reshape(1, 3, 32, 32)] * args.parts
    ways = {
        "np.concatenate, nothing else running": (lambda: np.concatenate(parts), False),
        "np.concatenate, a thread busy in Python": (lambda: np.concatenate(parts), True),
        "serving merge (bytes.join), a thread busy in Python": (lambda: merge(parts), True),
    }
    print(f"{args.parts} parts of 1x3x32x32 uint8, {args.rounds} merges each; µs per merge\n")
    print("| merge | mean | median | max |\n|---|---|---|---|")
    for name, (build, contended) in ways.items():
        stop = threading.Event()
        rival = threading.Thread(target=busy_python, args=(stop,))
        if contended:
            rival.start()
        try:
            spent = timed(build, args.rounds)
        finally:
            stop.set()
            if contended:
                rival.join()
        mean, median = statistics.mean(spent), statistics.median(spent)
        print(f"| {name} | {mean:,.0f} | {median:,.0f} | {max(spent):,.0f} |")


if __name__ == "__main__":
    main()
