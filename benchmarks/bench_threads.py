"""Single-image latency with 1 and 2 intra-op threads, on the seed_cnn model and a larger CNN.

Claim (serving/README.md, "Benchmark"): `--instances 2 --threads 1` costs a lone client
nothing on seed_cnn, where one image runs no faster on 2 threads than on 1, but a larger
model answers single images almost twice as fast from one 2-thread instance; that is one
reason the default stays one instance. Both models run through the server's own session
settings (`load_onnxruntime`); the rounds alternate thread counts so drift hits both.

    python benchmarks/bench_threads.py [--rounds 5] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_serving import build_cnn, machine, save_classifier  # puts the repository on sys.path

from serving.backends import load_onnxruntime

LARGER_SHAPE = (3, 128, 128)


def build_larger_cnn(path: Path) -> Path:
    """Conv64-ReLU, Conv64-ReLU, MaxPool2, Conv128-ReLU (all 3x3, same padding), global
    average pool, Gemm10 on 3x128x128: about 1.9 GFLOP per image, 200x seed_cnn's 9 MFLOP."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array(values.astype(np.float32), name)

    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        weight("c1", 64, 3, 3, 3), weight("c2", 64, 64, 3, 3), weight("c3", 128, 64, 3, 3),
        weight("d", 10, 128), numpy_helper.from_array(np.zeros(10, np.float32), "db"),
    ]  # fmt: skip
    node, same = helper.make_node, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        node("Div", ["f", "scale"], ["x"]),
        node("Conv", ["x", "c1"], ["h1"], **same),
        node("Relu", ["h1"], ["r1"]),
        node("Conv", ["r1", "c2"], ["h2"], **same),
        node("Relu", ["h2"], ["r2"]),
        node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p", "c3"], ["h3"], **same),
        node("Relu", ["h3"], ["r3"]),
        node("GlobalAveragePool", ["r3"], ["g"]),
        node("Flatten", ["g"], ["flat"], axis=1),
        node("Gemm", ["flat", "d", "db"], ["logits"], transB=1),
        node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return save_classifier(path, "larger_cnn", LARGER_SHAPE, nodes, inits)


def median_ms(backend, image: np.ndarray, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.run({"images": image})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--runs", type=int, default=30, help="batch-1 runs per round")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    models = {"seed_cnn": build_cnn(folder / "seed.onnx")}
    models["larger CNN"] = build_larger_cnn(folder / "larger.onnx")
    print(f"machine: {machine().split(';')[0]}")  # the rest describes wrk, unused here
    print("\n| model | 1 thread ms | 2 threads ms | 1 thread / 2 threads |\n|---|---|---|---|")
    for name, path in models.items():
        backends = {threads: load_onnxruntime(path, "cpu", threads) for threads in (1, 2)}
        spec = backends[1].signature.inputs[0]
        image = np.random.default_rng(0).integers(0, 256, (1, *spec.shape[1:]), np.uint8)
        for backend in backends.values():
            median_ms(backend, image, 20)  # warm-up: the first 2-thread runs are slow
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads, backend in backends.items():
                times[threads].append(median_ms(backend, image, args.runs))
        one, two = (" / ".join(f"{t:.2f}" for t in times[n]) for n in (1, 2))
        ratios = " / ".join(f"{a / b:.2f}" for a, b in zip(times[1], times[2], strict=True))
        print(f"| {name} | {one} | {two} | {ratios} |")


if __name__ == "__main__":
    main()
