"""Triton's perf_analyzer against the server: client figures and the server-side breakdown.

perf_analyzer reads the statistics extension (GET /v2/models/{m}/stats) before and after
every window, so this runs that route through the tool Triton users already measure with,
and shows where a request's time goes. Its working binary is not on PyPI on its own: it
ships inside the tritonclient 2.41.0 wheel (tritonclient-2.41.0.data/data/bin/perf_analyzer)
and needs Debian's libb64-0d and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel),
even on CPU. perf_analyzer shares the cores with the server, which the report states.

    python benchmarks/bench_perf_analyzer.py --perf-analyzer PATH [--threads 2] [--instances 1]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_serving import build_cnn, machine, start_server, stop_server, table

# (images per request, concurrency): single images at low and high load, and large requests.
LOADS = ((1, 1), (1, 64), (64, 4))
# perf_analyzer's CSV columns, all µs but the first.
FIELDS = {
    "Inferences/Second": "infer/s",
    "p50 latency": "p50 µs",
    "p99 latency": "p99 µs",
    "Network+Server Send/Recv": "HTTP + overhead µs",
    "Server Queue": "queue µs",
    "Server Compute Input": "input µs",
    "Server Compute Infer": "infer µs",
    "Server Compute Output": "output µs",
}


def measure(tool: str, url: str, rows: int, concurrency: int, window_ms: int, out: Path) -> dict:
    """One perf_analyzer run (it stabilises over several windows); its CSV row."""
    command = [
        tool, "-m", "seed_cnn", "-u", url.removeprefix("http://"), "-i", "http",
        "-b", str(rows), "--concurrency-range", str(concurrency),
        "--measurement-interval", str(window_ms), "-f", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"error: perf_analyzer exited {done.returncode}:\n{done.stdout}{done.stderr}")
    with out.open() as handle:
        row = next(csv.DictReader(handle))
    return {name: float(row[name]) for name in FIELDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000)
    args = parser.parse_args()
    if not args.perf_analyzer:
        sys.exit("error: perf_analyzer not found; pass --perf-analyzer PATH (see the docstring)")

    folder = Path(tempfile.mkdtemp())
    model = build_cnn(folder / "seed_cnn.onnx")
    print(f"machine: {machine().split(';')[0]}; perf_analyzer (HTTP, sync) on the same cores")
    layout = f"--threads {args.threads} --instances {args.instances}"
    print(f"server: {layout}, median of {args.runs} runs, a fresh server each\n")
    results = []
    for rows, concurrency in LOADS:
        runs = []
        for _ in range(args.runs):
            proc, url = start_server(model, args.threads, 64, instances=args.instances)
            try:
                runs.append(
                    measure(
                        args.perf_analyzer, url, rows, concurrency, args.window_ms, folder / "r.csv"
                    )
                )
            finally:
                stop_server(proc)
        medians = [f"{statistics.median(run[name] for run in runs):,.0f}" for name in FIELDS]
        results.append([rows, concurrency, *medians])
    print(table(("images/request", "concurrency", *FIELDS.values()), results))


if __name__ == "__main__":
    main()
