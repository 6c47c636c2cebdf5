"""Export and CPU inference benchmark: fp32 vs int8 ONNX vs the onnxruntime engine target.

Claim checked: on the default data set (scikit-learn digits at 1x32x32, seed_cnn, the
params.yaml settings) the int8 CPU artifact (engine target onnxruntime from the int8
export) runs >= 1.5x the fp32 ONNX throughput at batch 64 with <= 0.5 pp accuracy drop.
Evidence: the table this prints (medians of --runs timed runs; the README quotes it).

    python benchmarks/bench_export.py [--runs 7] [--json reports/bench_export.json]

It runs the real stages (prepare, train, export, engine) in a temporary directory, so it
needs the pipeline's own code and nothing else; about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable as a script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

BATCHES = (1, 8, 64)
THREADS = (1, 2)
COLUMNS = ("artifact", "threads", "batch", "images_per_s", "spread", "accuracy")


# Setup


def build_artifacts(work: Path, params_file: Path) -> dict:
    """prepare -> train -> export -> engine (fp32 and int8), with the params.yaml settings."""
    from pipeline import engine, export
    from pipeline.params import (
        DataParams,
        EngineParams,
        ExportParams,
        ModelParams,
        TrainParams,
        load_params,
    )
    from pipeline.prepare import prepare
    from pipeline.train import train

    def section(name, cls):  # noqa: ANN001, ANN202
        return load_params(name, cls, params_file) if params_file.is_file() else cls()

    data = work / "prepared"
    prepare(section("data", DataParams), data)
    train(
        section("model", ModelParams),
        section("train", TrainParams),
        data,
        work / "checkpoint.pt",
        work / "live",
    )
    start = time.perf_counter()
    report = export.export_model(
        section("export", ExportParams), work / "checkpoint.pt", data, work / "onnx", None
    )
    export_wall = time.perf_counter() - start
    engines = {}
    for precision in ("fp32", "int8"):
        engines[precision] = engine.build_engine(
            EngineParams(precision=precision),
            work / "onnx",
            work / f"engine-{precision}",
            data,
            None,
        )
    return {"data": data, "export": report, "export_wall": export_wall, "engines": engines}


# Timing


def images_per_second(
    paths: dict[str, Path], x: np.ndarray, threads: int, runs: int
) -> dict[str, tuple[float, float]]:
    """Median and spread (max - min) of images/s per artifact over ``runs`` rounds.

    Rounds interleave the artifacts, so drifting load on a shared host hits them alike.
    """
    from pipeline.onnx_tools import session

    sessions = {name: session(path, threads) for name, path in paths.items()}
    feed = {"images": x}
    repeats = {}
    for name, sess in sessions.items():
        for _ in range(3):
            sess.run(None, feed)
        start = time.perf_counter()
        sess.run(None, feed)
        repeats[name] = max(3, int(0.2 / max(time.perf_counter() - start, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                sess.run(None, feed)
            rates[name].append(len(x) * repeats[name] / (time.perf_counter() - start))
    return {n: (statistics.median(r), max(r) - min(r)) for n, r in rates.items()}


def machine() -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = Path("/proc/cpuinfo").read_text()
    isa = [
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags
    ]
    return (
        f"{cpu}, {os.cpu_count()} cores ({', '.join(isa)}); Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per cell (median)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        built = build_artifacts(work, args.params)
        test_x = np.load(built["data"] / "test.npz")["x"]
        variants = built["export"]["variants"]
        artifacts = {
            "fp32 ONNX": (work / "onnx" / "model.onnx", variants["fp32"]["accuracy"]),
            "int8 ONNX": (work / "onnx" / "model.int8.onnx", variants["int8"]["accuracy"]),
            "fp16 ONNX": (work / "onnx" / "model.fp16.onnx", variants["fp16"]["accuracy"]),
            "engine ort fp32": (
                work / "engine-fp32" / "model.optimized.onnx",
                built["engines"]["fp32"]["accuracy"],
            ),
            "engine ort int8": (
                work / "engine-int8" / "model.optimized.onnx",
                built["engines"]["int8"]["accuracy"],
            ),
        }
        rng = np.random.default_rng(0)
        results = []
        for threads in THREADS:
            for batch in BATCHES:
                x = test_x[rng.choice(len(test_x), size=batch, replace=False)]
                paths = {name: path for name, (path, _) in artifacts.items()}
                rates = images_per_second(paths, x, threads, args.runs)
                for name, (_, accuracy) in artifacts.items():
                    results.append((name, threads, batch, *rates[name], accuracy))
    report(built, results, args)


def report(built: dict, results: list, args: argparse.Namespace) -> None:
    export = built["export"]
    print(f"# bench_export: {machine()}")
    print(
        f"export stage: {built['export_wall']:.1f} s wall in total "
        f"(torch.onnx.export + checker {export['export_seconds']:.1f} s, "
        f"{export['parity']['images']} test images, parity max |logit diff| "
        f"{export['parity']['max_abs_logit_diff']:.1e})"
    )
    base = {(t, b): r for name, t, b, r, _, _ in results if name == "fp32 ONNX"}
    fp32_acc = export["variants"]["fp32"]["accuracy"]
    print(
        "\n| artifact | threads | batch | images/s (median) | spread | vs fp32 "
        "| accuracy | drop pp |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, threads, batch, rate, spread, accuracy in results:
        print(
            f"| {name} | {threads} | {batch} | {rate:,.0f} | ±{spread / 2:,.0f} | "
            f"{rate / base[(threads, batch)]:.2f}x | {accuracy:.2%} | "
            f"{(fp32_acc - accuracy) * 100:+.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(zip(COLUMNS, row, strict=True)) for row in results]
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
