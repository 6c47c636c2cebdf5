"""Serving throughput and latency on a seed_cnn-sized CNN (3x32x32, 10 classes) on CPU.

Claim and evidence live in serving/README.md; this script prints the table it quotes:
the raw onnxruntime ceiling (session.run img/s at batch 1, 8, 64 with the server's own
session settings) next to every server figure, medians of --runs runs, ratios taken
within one run. Load comes from wrk (C, epoll, LuaJIT) with a Lua script that posts
binary-tensor bodies; it shares the machine with the server, which the table states.

    python benchmarks/bench_serving.py [--duration 5] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.backends import load_onnxruntime  # noqa: E402  (the server's own session settings)
from serving.contract import (  # noqa: E402
    IMAGE_CLASSIFICATION,
    ImagePreprocessing,
    ModelContract,
)

SHAPE = (3, 32, 32)

# wrk's summary as one JSON line, which run_wrk parses; other benchmarks reuse it.
WRK_REPORT = """function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%f,"non2xx":%d,"socket_errors":%d,"p50_ms":%f,"p99_ms":%f}\\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
end
"""
WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("BENCH_HEADER_LENGTH")
"""
WRK_SCRIPT += WRK_REPORT


# Model ------------------------------------------------------------------------------------------
def build_cnn(path: Path) -> Path:
    """Conv32-3x3-ReLU, MaxPool2, Conv64-3x3-ReLU, MaxPool2, Conv64-3x3-ReLU, Flatten,
    Gemm64-ReLU, Gemm10; Cast/Div in front and Softmax after, as the export stage writes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        weight("c1", 32, 3, 3, 3), weight("c1b", 32),
        weight("c2", 64, 32, 3, 3), weight("c2b", 64),
        weight("c3", 64, 64, 3, 3), weight("c3b", 64),
        weight("d1", 1024, 64), weight("d1b", 64),
        weight("d2", 64, 10), weight("d2b", 10),
    ]  # fmt: skip
    node = helper.make_node
    nodes = [
        node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        node("Div", ["f", "scale"], ["x"]),
        node("Conv", ["x", "c1", "c1b"], ["h1"], kernel_shape=[3, 3]),
        node("Relu", ["h1"], ["r1"]),
        node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p1", "c2", "c2b"], ["h2"], kernel_shape=[3, 3]),
        node("Relu", ["h2"], ["r2"]),
        node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p2", "c3", "c3b"], ["h3"], kernel_shape=[3, 3]),
        node("Relu", ["h3"], ["r3"]),
        node("Flatten", ["r3"], ["flat"], axis=1),
        node("Gemm", ["flat", "d1", "d1b"], ["g1"]),
        node("Relu", ["g1"], ["r4"]),
        node("Gemm", ["r4", "d2", "d2b"], ["logits"]),
        node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return save_classifier(path, "seed_cnn", SHAPE, nodes, inits)


def save_classifier(path: Path, name: str, shape: tuple[int, ...], nodes, inits) -> Path:
    """An ONNX file the server can load: uint8 ``images`` in, ``logits`` and
    ``probabilities`` (10 classes) out, with the metadata the export stage writes."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", *shape])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    contract = ModelContract(
        name,
        IMAGE_CLASSIFICATION,
        tuple(f"class_{i}" for i in range(10)),
        ImagePreprocessing("images", "NCHW", shape, "uint8", (0.0, 255.0)),  # type: ignore[arg-type]
        precision="fp32",
    )
    helper.set_model_props(model, contract.to_metadata())
    onnx.save(model, path)
    return path


# Raw ceiling ------------------------------------------------------------------------------------
def ceiling_at(backend, batch: int, seconds: float) -> float:
    x = np.random.default_rng(batch).integers(0, 256, (batch, *SHAPE), dtype=np.uint8)
    return rows_per_second(backend, {"images": x}, seconds)


def rows_per_second(backend, feed: dict[str, np.ndarray], seconds: float) -> float:
    """Rows/s of backend.run (session.run) on ``feed`` in a loop, after 5 warm-up runs."""
    rows = len(next(iter(feed.values())))
    for _ in range(5):
        backend.run(feed)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.run(feed)
        runs += 1
    return runs * rows / (time.perf_counter() - start)


def parallel_ceiling(backends: list, batch: int, seconds: float) -> float:
    """Images/s of several sessions each calling run in a loop on its own thread (instances)."""
    rates = [0.0] * len(backends)

    def probe(i: int) -> None:
        rates[i] = ceiling_at(backends[i], batch, seconds)

    threads = [threading.Thread(target=probe, args=(i,)) for i in range(len(backends))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rates)


def ceiling(model: Path, threads: int, seconds: float = 2.0) -> dict[int, float]:
    """session.run images/s at batch 1, 8, 64, with the session options the server uses."""
    backend = load_onnxruntime(model, "cpu", threads)
    return {batch: ceiling_at(backend, batch, seconds) for batch in (1, 8, 64)}


# Server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"server at {url} never became ready")


def start_server(
    model: Path,
    threads: int,
    max_batch: int,
    lean: bool = False,
    instances: int = 1,
    repo: Path = REPO,
) -> tuple[subprocess.Popen, str]:
    """The real server (from the source tree ``repo``), or with ``lean`` the bare reference
    server in lean_server.py."""
    port = free_port()
    if lean:
        command = [sys.executable, str(REPO / "benchmarks" / "lean_server.py"), str(model)]
        command += [str(port), str(threads)]
    else:
        command = [
            sys.executable, "-m", "serving", "--engine", str(model), "--port", str(port),
            "--threads", str(threads), "--max-batch-size", str(max_batch),
            "--instances", str(instances), "--log-level", "WARNING",
        ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def cpu_seconds(pid: int, stat: str = "stat") -> float:
    """User + system CPU seconds of a process, or of one of its threads (stat="task/TID/stat")."""
    fields = Path(f"/proc/{pid}/{stat}").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_body(folder: Path, rows: int) -> tuple[Path, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [rows, *SHAPE],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": rows * int(np.prod(SHAPE))},
                }
            ],
            "parameters": {"binary_data_output": True},
        }  # fmt: skip
    ).encode()
    pixels = np.random.default_rng(rows).integers(0, 256, (rows, *SHAPE), dtype=np.uint8)
    path = folder / f"body_{rows}.bin"
    path.write_bytes(header + pixels.tobytes())
    return path, len(header)


def run_wrk(
    url: str,
    body: tuple[Path, int],
    connections: int,
    seconds: float,
    pid: int,
    model_name: str = "seed_cnn",
) -> dict:
    script = Path(tempfile.gettempdir()) / "bench_serving.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BENCH_BODY": str(body[0]), "BENCH_HEADER_LENGTH": str(body[1])}
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "-s",
        str(script),
        "--timeout",
        "10s",
    ]
    cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, f"task/{pid}/stat")
    done = subprocess.run(
        [*command, f"{url}/v2/models/{model_name}/infer"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu_s"] = cpu_seconds(pid) - cpu_before
    result["loop_cpu_s"] = cpu_seconds(pid, f"task/{pid}/stat") - loop_before  # main thread
    return result


# Scenarios --------------------------------------------------------------------------------------
class Server:
    """A server for one setting, kept up across runs so runs can interleave with others."""

    def __init__(self, model: Path, threads: int, max_batch: int, **options: Any) -> None:
        """``options``: start_server's lean, instances and repo."""
        self.threads = threads
        self.model_name = model.stem
        self.proc, self.url = start_server(model, threads, max_batch, **options)

    def load(self, body: tuple[Path, int], rows: int, connections: int, seconds: float) -> dict:
        r = run_wrk(self.url, body, connections, seconds, self.proc.pid, self.model_name)
        images = r["requests"] * rows
        return {
            **r,
            "img_s": images / r["seconds"],
            "cpu_us": 1e6 * r["server_cpu_s"] / max(1, images),
            "loop_us": 1e6 * r["loop_cpu_s"] / max(1, images),
        }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bracketed(run: Callable[[], dict], probes: dict[str, Callable[[], float]]) -> dict:
    """One server run with each ceiling probe measured just before and just after it.

    The machine is shared: the ceiling moved by up to 30 % between runs a minute apart,
    so each run is compared with the mean of its own two neighbours. Adds
    ``ceiling_<name>`` and ``ratio_<name>`` (server img/s over that ceiling) per probe.
    """
    before = {name: probe() for name, probe in probes.items()}
    result = run()
    figures = dict(result)
    for name, probe in probes.items():
        figures[f"ceiling_{name}"] = (before[name] + probe()) / 2
        figures[f"ratio_{name}"] = result["img_s"] / figures[f"ceiling_{name}"]
    return figures


def batch64(backend) -> dict[str, Callable[[], float]]:
    """The probe every server figure is set against: session.run at batch 64, 1.5 s."""
    return {"64": lambda: ceiling_at(backend, 64, 1.5)}


def throughput(model: Path, folder: Path, threads: int, rows: int, connections: int, args) -> dict:
    """Server img/s against the batch-64 ceiling measured around each run (same threads)."""
    server = Server(model, threads, 64)
    body = write_body(folder, rows)
    backend = load_onnxruntime(model, "cpu", threads)
    try:
        server.load(body, rows, connections, 1)  # warm connections and caches
        runs = [
            bracketed(lambda: server.load(body, rows, connections, args.duration), batch64(backend))
            for _ in range(args.runs)
        ]
        rss = peak_rss_mb(server.proc.pid)
    finally:
        stop_server(server.proc)
    return {
        "threads": threads,
        "rows": rows,
        "connections": connections,
        "img_s": median_of(runs, "img_s"),
        "ceiling_64": median_of(runs, "ceiling_64"),
        "ratio": median_of(runs, "ratio_64"),
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "cpu_us": median_of(runs, "cpu_us"),
        "errors": errors(runs),
        "rss_mb": rss,
    }


def alternating(
    servers: tuple[Server, Server], folder: Path, rows: int, connections: int, args, measure
):
    """Runs of two servers taking turns under the same load, so both see the same machine.

    ``measure`` wraps each run (a callable returning its figures); both servers stop at
    the end. Returns one (first, second) pair of figures per run.
    """
    body = write_body(folder, rows)
    try:
        for server in servers:
            server.load(body, rows, connections, 1)
        return [
            tuple(
                measure(lambda s=s: s.load(body, rows, connections, args.duration)) for s in servers
            )
            for _ in range(args.runs)
        ]
    finally:
        for server in servers:
            stop_server(server.proc)


def pair_medians(pairs: list[tuple[dict, dict]], names: tuple[str, str], keys) -> dict:
    """``<name>_<key>``: the median over the runs of each of the two servers' figure."""
    return {
        f"{name}_{key}": statistics.median(pair[i][key] for pair in pairs)
        for i, name in enumerate(names)
        for key in keys
    }


def errors(runs) -> int:
    return sum(r["non2xx"] + r["socket_errors"] for r in runs)


def versus_lean(model: Path, folder: Path, rows: int, connections: int, args) -> dict:
    """The real server and lean_server.py, 2 threads, alternating runs, each bracketed."""
    backend = load_onnxruntime(model, "cpu", 2)
    servers = (Server(model, 2, 64), Server(model, 2, 64, lean=True))
    pairs = alternating(
        servers, folder, rows, connections, args, lambda run: bracketed(run, batch64(backend))
    )
    return {
        "rows": rows,
        "connections": connections,
        **pair_medians(pairs, ("real", "lean"), ("img_s", "ratio_64", "p99_ms", "cpu_us")),
        "real_over_lean": statistics.median(a["img_s"] / b["img_s"] for a, b in pairs),
        "errors": errors(r for pair in pairs for r in pair),
    }


def versus_instances(model: Path, folder: Path, rows: int, connections: int, args) -> dict:
    """1 instance of 2 threads against 2 instances of 1 thread, alternating runs.

    Each run is bracketed by two ceilings: session.run with 2 intra-op threads (the one
    every other figure uses) and two 1-thread sessions running at once (the same layout
    as the 2 instances, so the fair ceiling for them).
    """
    one = load_onnxruntime(model, "cpu", 2)
    two = [load_onnxruntime(model, "cpu", 1) for _ in range(2)]
    probes = {
        "1x2": lambda: ceiling_at(one, 64, 1.5),
        "2x1": lambda: parallel_ceiling(two, 64, 1.5),
    }
    servers = (Server(model, 2, 64), Server(model, 1, 64, instances=2))
    pairs = alternating(
        servers, folder, rows, connections, args, lambda run: bracketed(run, probes)
    )
    return {
        "rows": rows,
        "connections": connections,
        **pair_medians(
            pairs, ("1x2", "2x1"), ("img_s", "p50_ms", "p99_ms", "ratio_1x2", "ratio_2x1")
        ),
        "ceiling_1x2": statistics.median(r["ceiling_1x2"] for pair in pairs for r in pair),
        "ceiling_2x1": statistics.median(r["ceiling_2x1"] for pair in pairs for r in pair),
        "two_over_one": statistics.median(b["img_s"] / a["img_s"] for a, b in pairs),
        "errors": errors(r for pair in pairs for r in pair),
    }


def batching_on_off(model: Path, folder: Path, connections: int, args) -> dict:
    """Single images, 2 threads: --max-batch-size 64 vs 1, runs alternating, ratios per pair."""
    servers = (Server(model, 2, 64), Server(model, 2, 1))
    pairs = alternating(servers, folder, 1, connections, args, lambda run: run())
    return {
        "connections": connections,
        **pair_medians(pairs, ("on", "off"), ("p50_ms", "p99_ms", "img_s")),
        "p50_ratio": statistics.median(a["p50_ms"] / b["p50_ms"] for a, b in pairs),
        "errors": errors(r for pair in pairs for r in pair),
    }


def cold_start(model: Path, runs: int = 5) -> float:
    """Seconds from spawning ``python -m serving`` to the first 200 from /v2/health/ready."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc, _ = start_server(model, 1, 64)
        times.append(time.perf_counter() - start)
        stop_server(proc)
    return statistics.median(times)


def machine() -> str:
    import onnxruntime

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return (
        f"{cpu or platform.processor()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f} at start; "
        "load from wrk 4.1 (1 thread) on the same cores"
    )


# Report -----------------------------------------------------------------------------------------
THROUGHPUT_COLUMNS = (
    "threads", "images/request", "connections", "img/s", "ceiling b64", "ratio", "p50 ms",
    "p99 ms", "server CPU µs/img", "errors", "peak RSS MB",
)  # fmt: skip
LEAN_COLUMNS = (
    "images/request", "connections", "img/s", "ratio", "p99 ms", "CPU µs/img", "lean img/s",
    "lean ratio", "lean p99 ms", "lean CPU µs/img", "server / lean", "errors",
)  # fmt: skip
INSTANCE_COLUMNS = (
    "images/request", "connections", "1×2 img/s", "2×1 img/s", "2×1 / 1×2", "ceiling 1×2",
    "ceiling 2×1", "1×2 ratio", "2×1 ratio vs 1×2 ceiling", "2×1 ratio vs 2×1 ceiling",
    "1×2 p50 ms", "2×1 p50 ms", "1×2 p99 ms", "2×1 p99 ms", "errors",
)  # fmt: skip
ON_OFF_COLUMNS = (
    "connections", "p50 on ms", "p50 off ms", "p50 on/off", "p99 on ms", "p99 off ms",
    "img/s on", "img/s off", "errors",
)  # fmt: skip


def table(columns: tuple[str, ...], rows: list[list]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_report(results: dict) -> None:
    print(f"machine: {results['machine']}\n")
    print("raw session.run ceiling, img/s, with the server's session settings\n")
    rates = [[t, *(r[b] for b in (1, 8, 64))] for t, r in results["ceilings"].items()]
    print(table(("intra-op threads", "batch 1", "batch 8", "batch 64"), rates))
    print(
        "\nserver, median of runs; ratio = server img/s / mean of the batch-64 ceilings taken "
        "just before and after each run\n"
    )
    keys = ("threads", "rows", "connections", "img_s", "ceiling_64", "ratio", "p50_ms", "p99_ms")
    keys += ("cpu_us", "errors", "rss_mb")
    print(table(THROUGHPUT_COLUMNS, [[r[k] for k in keys] for r in results["throughput"]]))
    print("\n2 threads: the server against lean_server.py (no validation, no metrics)\n")
    keys = ("rows", "connections", "real_img_s", "real_ratio_64", "real_p99_ms", "real_cpu_us")
    keys += ("lean_img_s", "lean_ratio_64", "lean_p99_ms", "lean_cpu_us", "real_over_lean")
    keys += ("errors",)
    print(table(LEAN_COLUMNS, [[r[k] for k in keys] for r in results["lean"]]))
    print(
        "\n1 instance of 2 threads against 2 instances of 1 thread (--instances 2), alternating"
        " runs; ratios against the 2-thread session.run ceiling and against two 1-thread"
        " sessions at once\n"
    )
    keys = ("rows", "connections", "1x2_img_s", "2x1_img_s", "two_over_one", "ceiling_1x2")
    keys += ("ceiling_2x1", "1x2_ratio_1x2", "2x1_ratio_1x2", "2x1_ratio_2x1", "1x2_p50_ms")
    keys += ("2x1_p50_ms", "1x2_p99_ms", "2x1_p99_ms", "errors")
    print(table(INSTANCE_COLUMNS, [[r[k] for k in keys] for r in results["instances"]]))
    print("\nbatching on (max batch 64) vs off (max batch 1), single images, 2 threads\n")
    keys = ("connections", "on_p50_ms", "off_p50_ms", "p50_ratio", "on_p99_ms", "off_p99_ms")
    keys += ("on_img_s", "off_img_s", "errors")
    print(table(ON_OFF_COLUMNS, [[r[k] for k in keys] for r in results["on_off"]]))
    print(f"\ncold start, spawn to ready (median of 5): {results['cold_start_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    model = build_cnn(folder / "seed_cnn.onnx")
    results = {
        "machine": machine(),
        "ceilings": {t: ceiling(model, t) for t in (1, 2)},
        "cold_start_s": cold_start(model),
        "throughput": [
            throughput(model, folder, threads, rows, connections, args)
            for threads, rows, connections in [(1, 64, 4), (2, 64, 4), (1, 1, 64), (2, 1, 64)]
        ],
        "lean": [versus_lean(model, folder, rows, c, args) for rows, c in [(1, 64), (64, 4)]],
        "instances": [
            # many clients, then the lone client that one instance's threads answer faster
            versus_instances(model, folder, rows, c, args)
            for rows, c in [(64, 4), (1, 64), (1, 16), (64, 1)]
        ],
        "on_off": [batching_on_off(model, folder, c, args) for c in (1, 16, 64)],
    }
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
