"""Soak: hours-long load must cost no errors and no memory growth (not run in CI).

Claim checked: at moderate concurrency the server answers every request 200 (wrk sees no
non-2xx, no socket error or timeout) and its resident memory after the first interval
grows by less than 10 % over the run. The load is bench_serving.py's (wrk, binary tensors,
seed_cnn-sized CNN, one image per request) in back-to-back intervals; after each the
script samples the server's VmRSS. At the end it compares wrk's count with the server's
own success counter, checks readiness and that SIGTERM exits 0.

    python benchmarks/soak_serving.py                      # 30 minutes (the full soak)
    python benchmarks/soak_serving.py --requests 1000000   # or until a million requests
    python benchmarks/soak_serving.py --minutes 4 --interval 20   # the shortened run
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_serving import build_cnn, machine, run_wrk, start_server, write_body


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def success_count(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("tensorferry_request_success_total"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/v2/health/ready", timeout=10) as response:
        return response.status == 200


def soak(args: argparse.Namespace, folder: Path) -> dict:
    model = build_cnn(folder / "seed_cnn.onnx")
    body = write_body(folder, 1)
    proc, url = start_server(model, args.threads, 64)
    rows, totals = [], {"requests": 0, "non2xx": 0, "socket_errors": 0}
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.minutes * 60 and totals["requests"] < args.requests:
            result = run_wrk(url, body, args.connections, args.interval, proc.pid)
            for key in totals:
                totals[key] += result[key]
            rows.append(
                {**result, "rss_mb": rss_mb(proc.pid), "elapsed_s": time.monotonic() - started}
            )
            print_interval(rows[-1])
        served, healthy = success_count(url), ready(url)
    finally:
        code = stop(proc)
    return {"rows": rows, "totals": totals, "served": served, "healthy": healthy, "exit": code}


def print_interval(row: dict) -> None:
    rate = row["requests"] / row["seconds"]
    errors = row["non2xx"] + row["socket_errors"]
    print(
        f"{row['elapsed_s']:7.0f} s  {rate:8.0f} req/s  p99 {row['p99_ms']:6.2f} ms  "
        f"errors {errors}  RSS {row['rss_mb']:.1f} MB",
        flush=True,
    )


def report(result: dict, args: argparse.Namespace) -> bool:
    rows, totals = result["rows"], result["totals"]
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (last - first) / first * 100
    peak = max(r["rss_mb"] for r in rows)
    errors = totals["non2xx"] + totals["socket_errors"]
    print(f"\nmachine: {machine()}")
    intervals = f"{len(rows)} x {args.interval} s"
    print(f"load: wrk, {args.connections} connections, 1 image per request, {intervals}")
    print(f"requests (wrk, completed): {totals['requests']:,}   non-2xx: {totals['non2xx']}   "
          f"socket errors/timeouts: {totals['socket_errors']}")  # fmt: skip
    # wrk stops counting at each interval's end; answers then in flight are the server's only.
    print(f"server success counter: {result['served']:,.0f} (must be >= wrk's count)")
    print(f"RSS after interval 1: {first:.1f} MB, at end: {last:.1f} MB, peak: {peak:.1f} MB, "
          f"growth {growth:+.1f} % (target < 10 %)")  # fmt: skip
    print(f"ready at end: {result['healthy']}, SIGTERM exit code: {result['exit']}")
    ok = errors == 0 and growth < 10 and result["healthy"] and result["exit"] == 0
    ok = ok and result["served"] >= totals["requests"]
    print("PASS" if ok else "FAIL")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=10**12, help="stop after this many")
    parser.add_argument("--interval", type=int, default=30, help="seconds per wrk run / RSS sample")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = soak(args, Path(folder))
    sys.exit(0 if report(result, args) else 1)


if __name__ == "__main__":
    main()
