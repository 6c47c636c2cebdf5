"""Flushing denormals (`serve --flush-denormals`) on models that underflow and one that doesn't.

Claim (serving/README.md, "Denormals"): on the Intel Xeon VM, where float32 subnormals cost
~45x, the flag made models whose values underflow 57-148x faster at 1 and 2 intra-op
threads (the decaying chain 3.3 s -> 58 ms a run; seed_cnn with half its weights subnormal
745 -> 5.2 ms per 64 images), and left seed_cnn's time (ratio 1.0) and all logits as they
were. onnxruntime's session entry alone changed nothing at 1 thread (no pool), and
flushing only the calling thread left the pool's share slow at 2.

Models: the decaying chain the slow test fixture used to be (30 [512 x 512] MatMuls by a
Gaussian matrix / 512; every pixel 7, so its values are float32 subnormals after ~24),
seed_cnn with half of each weight tensor subnormal (what weight decay can leave in a
checkpoint), and seed_cnn itself (bench_serving.build_cnn). The modes: denormals kept;
only the session entry `session.set_denormal_as_zero` (load_onnxruntime's flag: the pool
threads); only the thread calling run flushed; both, which is what the server does. Each
timing runs on a fresh thread, as a batch worker does; rounds alternate the modes, so drift
hits all, and the ratio is taken within each round.

    python benchmarks/bench_denormals.py [--rounds 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_serving import build_cnn, machine, save_classifier  # puts the repository on sys.path

from serving.backends import load_onnxruntime
from serving.denormals import flush_denormals

MODES = {  # name: (session entry, calling thread flushed)
    "kept": (False, False),
    "session entry only": (True, False),
    "calling thread only": (False, True),
    "--flush-denormals": (True, True),
}


def build_chain(path: Path, rounds: int = 30, size: int = 512) -> Path:
    """The old slow fixture: logits from a Gemm, plus 0 x the mean of a decaying chain."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal((192, 10)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), "m"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    node = helper.make_node
    nodes = [
        node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        node("Div", ["f", "scale"], ["x"]),
        node("Flatten", ["x"], ["flat"], axis=1),
        node("Gemm", ["flat", "w", "b"], ["gemm"]),
        node("ReduceMean", ["x"], ["mean"], keepdims=0),
        node("Mul", ["mean", "m"], ["chain_0"]),
        *(node("MatMul", [f"chain_{i}", "m"], [f"chain_{i + 1}"]) for i in range(rounds)),
        node("ReduceMean", [f"chain_{rounds}"], ["chain_mean"], keepdims=0),
        node("Mul", ["chain_mean", "zero"], ["nothing"]),
        node("Add", ["gemm", "nothing"], ["logits"]),
        node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return save_classifier(path, "decaying_chain", (3, 8, 8), nodes, inits)


def with_subnormal_weights(source: Path, path: Path, fraction: float = 0.5) -> Path:
    """``source`` with ``fraction`` of every weight tensor's entries replaced by subnormals."""
    import onnx
    from onnx import numpy_helper

    model, rng = onnx.load(source), np.random.default_rng(1)
    for init in model.graph.initializer:
        weight = numpy_helper.to_array(init).copy()
        if weight.ndim >= 2:
            chosen = rng.random(weight.shape) < fraction
            weight[chosen] = rng.uniform(-1e-38, 1e-38, chosen.sum())
            init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), init.name))
    onnx.save(model, path)
    return path


def timed(backend, batch: np.ndarray, runs: int, flush_thread: bool) -> tuple[float, np.ndarray]:
    """Median ms of ``runs`` runs on a fresh thread, flushed or not, and the logits."""
    found: dict = {}

    def work() -> None:
        if flush_thread:
            flush_denormals()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            found["logits"] = backend.run({"images": batch})["logits"]
            times.append(time.perf_counter() - start)
        found["ms"] = statistics.median(times) * 1e3

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return found["ms"], found["logits"]


def measure(model: Path, batch: np.ndarray, threads: int, args) -> list:
    # The first session made in a process sets the thread that makes it (onnxruntime's
    # call_once): "kept" comes first, so the main thread, and every timing thread, keeps.
    backends = {m: load_onnxruntime(model, "cpu", threads, None, s) for m, (s, _) in MODES.items()}
    for mode, (_, on_thread) in MODES.items():
        timed(backends[mode], batch, 1, on_thread)  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    logits = {}
    for _ in range(args.rounds):
        for mode, (_, on_thread) in MODES.items():
            ms, logits[mode] = timed(backends[mode], batch, args.runs, on_thread)
            times[mode].append(ms)
    ratios = [a / b for a, b in zip(times["kept"], times["--flush-denormals"], strict=True)]
    change = float(np.abs(logits["kept"] - logits["--flush-denormals"]).max())
    medians = [f"{statistics.median(times[mode]):,.1f}" for mode in MODES]
    span = f"{statistics.median(ratios):.1f} ({min(ratios):.1f}–{max(ratios):.1f})"
    return [len(batch), threads, *medians, span, f"{change:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode and round")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    seed = build_cnn(folder / "seed.onnx")
    images = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), np.uint8)
    models = {
        "decaying chain (every pixel 7)": (build_chain(folder / "chain.onnx"), None),
        "seed_cnn, half its weights subnormal": (
            with_subnormal_weights(seed, folder / "subnormal.onnx"),
            images,
        ),
        "seed_cnn": (seed, images),
    }
    print(f"machine: {machine().split(';')[0]}; {' '.join(platform.libc_ver())}")
    columns = ["model", "batch", "threads", *(f"{m} ms" for m in MODES)]
    columns += ["kept / flushed (rounds)", "max |Δ logit|"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name, (model, batch) in models.items():
        batch = np.full((1, 3, 8, 8), 7, np.uint8) if batch is None else batch
        for threads in (1, 2):
            row = [name, *measure(model, batch, threads, args)]
            print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()
