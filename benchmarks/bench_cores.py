"""Where the cores go while a 2-thread server is under load (64-image requests by default).

Claim (serving/README.md, "Where the cores go"): session.run with 2 intra-op threads keeps
only ~92 % of two cores busy (for the rest one thread waits for the other); the server must
also spend ~4 % of the cores in its event loop taking in 786 KB bodies, and wrk ~1 %
sending them, and little of that fits into the idle time. One 2-thread instance therefore
ends near 0.93x that ceiling, like the lean reference, while two 1-thread instances fill
the cores and pass it.

Per run it reads the CPU time of wrk (getrusage of the finished child) and of each of the
server's threads (/proc/PID/task): the main thread is the event loop, the others are the
batch workers and onnxruntime's pool. Shares are of all the cores for the run's duration;
idle is what nobody used. Layouts alternate run by run; medians over --rounds. With
--images 1 --connections 64 it splits the single-image load the same way.

    python benchmarks/bench_cores.py [--rounds 5] [--duration 5] [--images 64] [--connections 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_serving import (  # puts the repository on sys.path
    Server,
    bracketed,
    build_cnn,
    ceiling_at,
    cpu_seconds,
    machine,
    parallel_ceiling,
    stop_server,
    table,
    write_body,
)

from serving.backends import load_onnxruntime

BATCH = 64  # the server's max batch size and the ceiling probes' batch
CORES = len(os.sched_getaffinity(0))
LAYOUTS = {  # name: (threads per instance, instances, lean)
    "server, 1 instance × 2 threads": (2, 1, False),
    "server, 2 instances × 1 thread": (1, 2, False),
    "lean reference, 2 threads": (2, 1, True),
}
COLUMNS = (
    "what ran",
    "img/s",
    "ratio to 2-thread session.run",
    "wrk",
    "event loop",
    "inference threads",
    "idle",
)


def rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    spent = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            spent[int(task.name)] = cpu_seconds(pid, f"task/{task.name}/stat")
        except OSError:  # the thread ended between listing and reading
            continue
    return spent


def ceiling_shares(probe: Callable[[], float]) -> dict:
    """A session.run probe in this process: its img/s and how busy it kept the cores."""
    cpu, start = rusage_seconds(resource.RUSAGE_SELF), time.perf_counter()
    img_s = probe()
    busy = rusage_seconds(resource.RUSAGE_SELF) - cpu
    return {"img_s": img_s, "inference": busy / (CORES * (time.perf_counter() - start))}


def server_shares(
    server: Server, body: tuple[Path, int], load: tuple[int, int], seconds: int
) -> dict:
    """One wrk run against a server, with the cores split among wrk, loop and the rest."""
    pid = server.proc.pid
    before, wrk_before = thread_cpu(pid), rusage_seconds(resource.RUSAGE_CHILDREN)
    result = server.load(body, *load, seconds)
    after, wrk_after = thread_cpu(pid), rusage_seconds(resource.RUSAGE_CHILDREN)
    spent = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    capacity = CORES * result["seconds"]
    shares = {
        "wrk": (wrk_after - wrk_before) / capacity,
        "event loop": spent.pop(pid) / capacity,
        "inference": sum(spent.values()) / capacity,
    }
    return {"img_s": result["img_s"], **shares}


def measure(
    model: Path, folder: Path, load: tuple[int, int], rounds: int, seconds: int
) -> dict[str, list[dict]]:
    """Runs per layout and ceiling; ``load`` is (images per request, connections)."""
    body = write_body(folder, load[0])
    two_threads = load_onnxruntime(model, "cpu", 2)
    one_thread_each = [load_onnxruntime(model, "cpu", 1) for _ in range(2)]
    ceilings = {
        "session.run, 2 threads": lambda: ceiling_at(two_threads, BATCH, 1.5),
        "two 1-thread session.run at once": lambda: parallel_ceiling(one_thread_each, BATCH, 1.5),
    }
    servers = {
        name: Server(model, threads, BATCH, lean=lean, instances=instances)
        for name, (threads, instances, lean) in LAYOUTS.items()
    }
    reference = {"2t": ceilings["session.run, 2 threads"]}  # every server run is set against it
    runs: dict[str, list[dict]] = {name: [] for name in [*ceilings, *servers]}
    try:
        for server in servers.values():
            server.load(body, *load, 1)  # warm connections and caches
        for _ in range(rounds):
            for name, probe in ceilings.items():
                runs[name].append(ceiling_shares(probe))
            for name, server in servers.items():
                run = bracketed(lambda s=server: server_shares(s, body, load, seconds), reference)
                runs[name].append(run)
    finally:
        for server in servers.values():
            stop_server(server.proc)
    return runs


def report(runs: dict[str, list[dict]]) -> list[list]:
    two_thread_ceiling = statistics.median(r["img_s"] for r in runs["session.run, 2 threads"])
    rows = []
    for name, figures in runs.items():
        for run in figures:
            # A server run is set against the probes taken around it, a ceiling against the median.
            run["ratio"] = run.get("ratio_2t", run["img_s"] / two_thread_ceiling)
            run["idle"] = 1 - sum(run.get(k, 0.0) for k in ("wrk", "event loop", "inference"))
        medians = {k: statistics.median(r[k] for r in figures) for k in figures[0]}
        shares = [
            f"{medians[k]:.1%}" if k in medians else "–"
            for k in ("wrk", "event loop", "inference", "idle")
        ]
        rows.append([name, medians["img_s"], medians["ratio"], *shares])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs per layout (median)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--images", type=int, default=64, help="images per request")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_cores_"))
    model = build_cnn(folder / "seed_cnn.onnx")
    print(f"machine: {machine()}\n")
    runs = measure(model, folder, (args.images, args.connections), args.rounds, args.duration)
    print(
        f"{args.images}-image requests, {args.connections} connections; ratios to batch-{BATCH} "
        f"session.run; shares are of all {CORES} cores, medians of {args.rounds} runs\n"
    )
    print(table(COLUMNS, report(runs)))


if __name__ == "__main__":
    main()
