"""Sequence batching policies on mixed-length traffic: pad-merge, equal shapes only, none.

Claim (docs/benchmarks.md): on SMS-like traffic (lengths 4..64, most of them short), letting
requests of different lengths share a batch (``--sequence-batching pad``) serves more
requests per second than Triton's equal-shapes rule or no batching, at lower tail latency.
Evidence: a GRU text classifier (embedding 64, GRU 64, masked mean, linear; exported here
by torch), 64 wrk connections each sending one-row binary ids+mask requests drawn from the
length mix; median req/s, p50, p99 and the mean batch (rows / backend runs) over --runs runs
of each policy, taking turns. The pad server's rate is set against session.run on batches
of the rows it formed, padded the same way (the ceiling at that batch size), and raw-text
/v1/classify (text/plain) is measured with the tokenizer's share of the server's CPU per
request (tokenising one text in this process / server CPU seconds per request).

    apt-get install -y wrk      # the load generator
    python benchmarks/bench_sequence_batching.py [--duration 5] [--runs 3] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_serving as bench  # noqa: E402

from serving.backends import load_onnxruntime  # noqa: E402
from serving.sequence import TextEncoder  # noqa: E402
from tests.serving import sequence_models  # noqa: E402

THREADS, WIDTH, MAX_LENGTH, BODIES = 1, 64, 64, 512
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "to",
    "vi",
    "we",
    "xo",
    "ya",
    "zu",
    "ba",
    "ce",
    "di",
    "fo",
    "gu",
    "hi",
    "ja",
    "ko",
]

# Cycles through pre-formatted requests (one file each), so the load varies in length.
WRK_SCRIPT = (
    """
local files = {}
for line in io.lines(os.getenv("BENCH_INDEX")) do files[#files + 1] = line end
local requests, i = {}, 0
function init(args)
  for k, line in ipairs(files) do
    local path, header_length, kind = line:match("([^ ]+) ([^ ]+) ([^ ]+)")
    local f = io.open(path, "rb"); local body = f:read("*a"); f:close()
    local headers = {}
    if kind == "text" then
      headers["Content-Type"] = "text/plain; charset=utf-8"
    else
      headers["Content-Type"] = "application/octet-stream"
      headers["Inference-Header-Content-Length"] = header_length
    end
    requests[k] = wrk.format("POST", nil, headers, body)
  end
  i = math.random(#requests)
end
function request()
  i = i % #requests + 1
  return requests[i]
end
"""
    + bench.WRK_REPORT
)


def words(rng: np.random.Generator, count: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(count))


def lengths(rng: np.random.Generator, count: int) -> np.ndarray:
    """SMS-like: 4..64 tokens, median about 12, a long tail."""
    return np.clip(np.round(rng.lognormal(np.log(12), 0.6, count)), 4, MAX_LENGTH).astype(int)


def build(folder: Path) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    corpus = [words(rng, 20) for _ in range(2000)]
    tokenizer = sequence_models.tokenizer_json(vocab_size=4000, corpus=corpus)
    model = sequence_models.text_gru(
        folder / "sms_gru.onnx", tokenizer, width=WIDTH, max_length=MAX_LENGTH
    )
    return model, tokenizer


def ids_body(ids: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(ids.shape),
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": ids.nbytes},
                }
                for name in ("input_ids", "attention_mask")
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + ids.tobytes() + np.ones_like(ids).tobytes(), len(header)


def write_index(folder: Path, name: str, bodies: list[tuple[bytes, int]], kind: str) -> Path:
    lines = []
    for i, (body, header_length) in enumerate(bodies):
        path = folder / f"{name}_{i}.bin"
        path.write_bytes(body)
        lines.append(f"{path} {header_length} {kind}")
    index = folder / f"{name}.txt"
    index.write_text("\n".join(lines) + "\n")
    return index


def wrk(url: str, route: str, index: Path, connections: int, seconds: float, pid: int) -> dict:
    script = Path(tempfile.gettempdir()) / "bench_sequence_batching.lua"
    script.write_text(WRK_SCRIPT)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", str(script)]
    command += ["--timeout", "10s", url + route]
    before, batches_before = bench.cpu_seconds(pid), batches(url)
    done = subprocess.run(
        command, env={**os.environ, "BENCH_INDEX": str(index)}, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows, runs = (a - b for a, b in zip(batches(url), batches_before, strict=True))
    result["req_s"] = result["requests"] / result["seconds"]
    result["cpu_us"] = 1e6 * (bench.cpu_seconds(pid) - before) / max(1, result["requests"])
    result["mean_batch"] = rows / max(1, runs)
    return result


def batches(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics") as response:
        body = response.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{.*\}} (\S+)$", body, re.M))

    return total("tensorferry_inference_count_total"), total("tensorferry_execution_count_total")


def start(model: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = bench.free_port()
    command = [sys.executable, "-m", "serving", "--engine", str(model), "--port", str(port)]
    command += ["--threads", str(THREADS), "--log-level", "WARNING", *options]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    bench.wait_ready(url)
    return proc, url


POLICIES = {
    "pad-merge": ("--max-batch-size", "64", "--sequence-batching", "pad"),
    "pad-merge in length classes": ("--max-batch-size", "64", "--sequence-batching", "bucket"),
    "equal shapes": ("--max-batch-size", "64", "--sequence-batching", "equal"),
    "no batching": ("--max-batch-size", "1"),
}


def policies(model: Path, index: Path, args) -> dict[str, list[dict]]:
    servers = {name: start(model, *options) for name, options in POLICIES.items()}
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for turn in range(args.runs):
            order = list(servers) if turn % 2 == 0 else list(servers)[::-1]
            for name in order:
                proc, url = servers[name]
                route = "/v2/models/sms/infer"
                runs[name].append(wrk(url, route, index, args.connections, args.duration, proc.pid))
    finally:
        for proc, _ in servers.values():
            bench.stop_server(proc)
    return runs


def padded_feed(rng: np.random.Generator, rows: int, bucket: bool) -> dict[str, np.ndarray]:
    """``rows`` lengths from the mix (with ``bucket``, all of one power-of-two class, the
    class drawn as the mix draws it), padded to the longest."""
    drawn = lengths(rng, rows)
    if bucket:
        pool = lengths(rng, 200 * rows)
        classes = np.array([int(n - 1).bit_length() for n in pool])
        drawn = pool[classes == classes[0]][:rows]
    ids = np.zeros((rows, drawn.max()), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(drawn):
        ids[i, :n] = rng.integers(2, 1000, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def ceiling(model: Path, rows: int, seconds: float, bucket: bool = False) -> float:
    """session.run rows/s on batches of ``rows`` drawn from the mix, padded to the longest."""
    backend = load_onnxruntime(model, "cpu", THREADS)
    rng = np.random.default_rng(rows)
    feeds = [padded_feed(rng, rows, bucket) for _ in range(32)]
    for feed in feeds[:4]:
        backend.run(feed)
    done, start_time = 0, time.perf_counter()
    while time.perf_counter() - start_time < seconds:
        backend.run(feeds[done % len(feeds)])
        done += 1
    return done * rows / (time.perf_counter() - start_time)


def raw_text(model: Path, tokenizer: str, folder: Path, args) -> dict:
    rng = np.random.default_rng(2)
    texts = [words(rng, int(n)) for n in lengths(rng, BODIES)]
    index = write_index(folder, "text", [(t.encode(), 0) for t in texts], "text")
    proc, url = start(model, "--max-batch-size", "64", "--sequence-batching", args.text_policy)
    try:
        runs = [
            wrk(url, "/v1/classify", index, args.connections, args.duration, proc.pid)
            for _ in range(args.runs)
        ]
    finally:
        bench.stop_server(proc)
    contract = load_onnxruntime(model).contract
    assert contract is not None and contract.sequence is not None
    encoder = TextEncoder(contract.sequence)
    started = time.perf_counter()
    for _ in range(5):
        for text in texts:
            encoder.encode([text])
    tokenize_us = 1e6 * (time.perf_counter() - started) / (5 * len(texts))
    cpu_us = statistics.median(r["cpu_us"] for r in runs)
    return {
        "req_s": statistics.median(r["req_s"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "cpu_us": cpu_us,
        "tokenize_us": tokenize_us,
        "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
    }


def machine() -> str:
    import onnxruntime
    import tokenizers
    import torch

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"tokenizers {tokenizers.__version__}"
    )


def report(runs: dict[str, list[dict]], ceilings: dict, text: dict, args) -> None:
    print(f"\n{machine()}")
    print(
        f"GRU text classifier (embedding/GRU {WIDTH}), --threads {THREADS}, "
        f"{args.connections} connections, one-row requests of 4..{MAX_LENGTH} tokens "
        f"(median 12), {args.runs} runs x {args.duration:.0f} s, medians\n"
    )
    print("| policy | req/s | p50 ms | p99 ms | mean batch | server CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        errors = sum(r["non2xx"] + r["socket_errors"] for r in results)
        print(
            f"| {name} | {med['req_s']:.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
            f"{med['mean_batch']:.1f} | {med['cpu_us']:.0f} | {errors} |"
        )
    print("\n| policy | session.run on its mean batch, drawn the same way | rows/s | server / it |")
    print("|---|---|---|---|")
    for name, (rows, rate) in ceilings.items():
        served = statistics.median(r["req_s"] for r in runs[name])
        print(f"| {name} | batch {rows} | {rate:.0f} | {served / rate:.2f} |")
    share = text["tokenize_us"] / text["cpu_us"]
    print("\n| raw text /v1/classify (text/plain) | req/s | p50 ms | p99 ms | "
          "server CPU µs/req | tokenizer µs/req | tokenizer share | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.text_policy} | {text['req_s']:.0f} | {text['p50_ms']:.2f} | "
        f"{text['p99_ms']:.2f} | {text['cpu_us']:.0f} | {text['tokenize_us']:.1f} | "
        f"{share:.0%} | {text['errors']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per policy (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--text-policy", default="bucket", help="raw-text server's policy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, tokenizer = build(folder)
        rng = np.random.default_rng(1)
        bodies = [ids_body(rng.integers(2, 1000, (1, int(n)))) for n in lengths(rng, BODIES)]
        index = write_index(folder, "ids", bodies, "ids")
        runs = policies(model, index, args)
        ceilings = {}
        for name, bucket in (("pad-merge", False), ("pad-merge in length classes", True)):
            rows = max(1, round(statistics.median(r["mean_batch"] for r in runs[name])))
            ceilings[name] = (rows, ceiling(model, rows, 2.0, bucket))
        text = raw_text(model, tokenizer, folder, args)
    report(runs, ceilings, text, args)


if __name__ == "__main__":
    main()
