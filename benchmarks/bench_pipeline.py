"""Pipeline benchmarks: the default `dvc repro`, MNIST with the residual net, train throughput.

Claims checked (issue 2), on a 2-core CPU:
  repro       default `dvc repro` (digits) from a clean clone: <= 60 s wall, test accuracy >= 98 %
  mnist       shared/datasets/mnist-png.tar.gz, `resnet`: >= 99.3 % test accuracy in <= 10 min
  throughput  training images/s of each model on this machine

Usage:
  python benchmarks/bench_pipeline.py repro [--runs 3]
  python benchmarks/bench_pipeline.py mnist [--epochs 6] [--width 16]
  python benchmarks/bench_pipeline.py throughput
Prints a Markdown table with the machine and versions; quote medians.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
MNIST_ARCHIVE = REPO.parent / "shared" / "datasets" / "mnist-png.tar.gz"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def machine() -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )


def tool_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


# ---------------------------------------------------------------- repro


@app.command()
def repro(runs: Annotated[int, typer.Option(help="Clean runs to take the median of.")] = 3) -> None:
    """Time the default `dvc repro` from a clean clone of HEAD."""
    times, accuracies = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            clone = Path(tmp) / "repo"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            started = time.perf_counter()
            subprocess.run(
                ["dvc", "repro", "-q"],
                cwd=clone,
                env=tool_env(),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            times.append(time.perf_counter() - started)
            metrics = json.loads((clone / "reports" / "metrics.json").read_text())
            accuracies.append(metrics["accuracy"])
    print(f"machine: {machine()}")
    print("| runs | wall s (median) | min | max | test accuracy |")
    print("|---|---|---|---|---|")
    print(
        f"| {runs} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} "
        f"| {', '.join(f'{a:.4f}' for a in sorted(set(accuracies)))} |"
    )


# ---------------------------------------------------------------- mnist


@app.command()
def mnist(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 6,
    width: Annotated[int, typer.Option(help="resnet width.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 0.004,
) -> None:
    """Prepare MNIST (image folder), train the residual net, evaluate on the 10k test set."""
    from pipeline.evaluate import evaluate
    from pipeline.params import DataParams, EvaluateParams, ModelParams, TrainParams
    from pipeline.prepare import prepare
    from pipeline.train import train

    work = Path(tempfile.mkdtemp(prefix="tensorferry-mnist-"))
    try:
        with tarfile.open(MNIST_ARCHIVE) as archive:
            archive.extractall(work, filter="data")
        root = next(p for p in work.iterdir() if p.is_dir())
        started = time.perf_counter()
        prepare(DataParams(source="imagefolder", path=str(root), channels=1), work / "prepared")
        prepared = time.perf_counter()
        train_params = TrainParams(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer="adamw",
            weight_decay=5e-4,
            label_smoothing=0.1,
            augment=True,
        )
        train(
            ModelParams(name="resnet", width=width),
            train_params,
            work / "prepared",
            work / "checkpoint.pt",
            work / "live",
        )
        trained = time.perf_counter()
        metrics = evaluate(
            EvaluateParams(),
            work / "prepared",
            work / "checkpoint.pt",
            work / "live",
            work / "reports",
        )
        finished = time.perf_counter()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print("| model | epochs | prepare s | train s | evaluate s | total s | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| resnet width {width} | {epochs} | {prepared - started:.0f} | {trained - prepared:.0f} "
        f"| {finished - trained:.0f} | {finished - started:.0f} | {metrics['accuracy']:.4f} |"
    )


# ---------------------------------------------------------------- throughput


@app.command()
def throughput(
    repeats: Annotated[int, typer.Option(help="Timed passes per model.")] = 5,
) -> None:
    """Training images/s (forward + backward + step) of each model on this CPU."""
    import torch

    from pipeline.models import Classifier, ModelSpec

    cases = [
        ("seed_cnn", (1, 32, 32), {}),
        ("seed_cnn", (3, 32, 32), {}),
        ("resnet", (1, 28, 28), {"width": 16}),
        ("resnet", (3, 32, 32), {"width": 32}),
        ("mlp", (1, 8, 8), {}),
    ]
    print(f"machine: {machine()}")
    print("| model | input | batch | images/s (median) | spread |")
    print("|---|---|---|---|---|")
    for name, shape, extra in cases:
        model = Classifier(ModelSpec(name, shape, 10, **extra), [0.5] * shape[0], [0.25] * shape[0])
        optimizer = torch.optim.Adam(model.parameters())
        x = torch.randint(0, 256, (128, *shape), dtype=torch.uint8)
        y = torch.randint(0, 10, (128,))
        rates = []
        for i in range(repeats + 1):
            started = time.perf_counter()
            for _ in range(4):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if i:  # the first pass warms up allocators and kernels
                rates.append(4 * len(y) / (time.perf_counter() - started))
        label = f"{name}" + (f" (width {extra['width']})" if extra else "")
        print(
            f"| {label} | {'x'.join(map(str, shape))} | 128 | {statistics.median(rates):,.0f} "
            f"| {min(rates):,.0f}-{max(rates):,.0f} |"
        )


if __name__ == "__main__":
    app()
