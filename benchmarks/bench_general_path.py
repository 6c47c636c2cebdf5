"""Does serving any model cost the seed CNN anything? This tree's server against a
baseline commit's, alternating runs under the same load, plus a two-input int64 model.

Claim (docs/benchmarks.md): the general path (any signature, several inputs, shape
groups) serves the seed CNN within noise of the image-only server it replaced. Evidence:
median img/s over --runs runs of each server, taking turns (first and second in
turn), each run's ratio to the
session.run batch-64 ceiling measured just before and after it (same threads). The
two-input model (token ids and a mask, INT64 [N, 16], an embedding bag) has only the
general path, so it is set against its own session.run ceiling.

    python benchmarks/bench_general_path.py --baseline 7791aed [--duration 5] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_serving as bench  # noqa: E402

from serving.backends import load_onnxruntime  # noqa: E402

THREADS, TOKENS, VOCAB = 2, 16, 1000
V1_IMAGE_KEYS = {  # the metadata the image-only server (contract version 1) reads
    "tensorferry.input_name": "images",
    "tensorferry.input_layout": "NCHW",
    "tensorferry.input_shape": json.dumps(list(bench.SHAPE)),
    "tensorferry.input_dtype": "uint8",
    "tensorferry.value_range": "[0.0, 255.0]",
}


def as_version_1(model: Path, out: Path) -> Path:
    """The same graph with the metadata a version-1 server needs."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(model))
    metadata = {p.key: p.value for p in proto.metadata_props}
    kept = {k: metadata[k] for k in ("tensorferry.model_name", "tensorferry.class_names")}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**kept, **V1_IMAGE_KEYS, "tensorferry.precision": "fp32"})
    onnx.save(proto, str(out))
    return out


def build_token_model(path: Path) -> Path:
    """ids, mask INT64 [N, 16] -> Gather(embedding 1000 x 64) * mask -> mean -> Gemm -> 2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, 64)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((64, 2)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embed", "ids"], ["vectors"]),
        node("Cast", ["mask"], ["weights"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["weights", "last"], ["weights3"]),
        node("Mul", ["vectors", "weights3"], ["masked"]),
        node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),
        node("Gemm", ["pooled", "w", "b"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", TOKENS])
        for name in ("ids", "mask")
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    graph = helper.make_graph(nodes, "tokens", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def token_feed(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "ids": rng.integers(0, VOCAB, (rows, TOKENS)).astype(np.int64),
        "mask": (rng.random((rows, TOKENS)) < 0.8).astype(np.int64),
    }


def write_token_body(folder: Path) -> tuple[Path, int]:
    """One row, both inputs binary, the output binary: what tritonclient sends by default."""
    feed = token_feed(1)
    inputs = [
        {
            "name": name,
            "shape": list(value.shape),
            "datatype": "INT64",
            "parameters": {"binary_data_size": value.nbytes},
        }
        for name, value in feed.items()
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    path = folder / "tokens_body.bin"
    path.write_bytes(header + b"".join(value.tobytes() for value in feed.values()))
    return path, len(header)


def baseline_tree(revision: str, folder: Path) -> Path:
    tree = folder / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), revision],
        check=True,
    )
    return tree


def seed_cnn_pairs(models: dict[str, Path], trees: dict[str, Path], folder, rows, conns, args):
    backend = load_onnxruntime(models["current"], "cpu", THREADS)
    probe = {"64": lambda: bench.ceiling_at(backend, 64, 1.5)}
    servers = tuple(
        bench.Server(models[name], THREADS, 64, repo=trees[name])
        for name in ("baseline", "current")
    )
    pairs = taking_turns(servers, bench.write_body(folder, rows), rows, conns, args, probe)
    return {
        "rows": rows,
        "connections": conns,
        **bench.pair_medians(
            pairs,
            ("baseline", "current"),
            ("img_s", "ratio_64", "p50_ms", "p99_ms", "cpu_us", "loop_us"),
        ),
        "ceiling_64": statistics.median(r["ceiling_64"] for pair in pairs for r in pair),
        "current_over_baseline": statistics.median(b["img_s"] / a["img_s"] for a, b in pairs),
        "errors": bench.errors(r for pair in pairs for r in pair),
    }


def taking_turns(servers, body, rows: int, conns: int, args, probe) -> list[tuple[dict, dict]]:
    """(baseline, current) figures per run, the order swapped every other run, so that
    neither server always runs second after the other's load; both stop at the end."""
    try:
        for server in servers:
            server.load(body, rows, conns, 1)
        pairs = []
        for run in range(args.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            figures = {
                id(s): bench.bracketed(lambda s=s: s.load(body, rows, conns, args.duration), probe)
                for s in order
            }
            pairs.append((figures[id(servers[0])], figures[id(servers[1])]))
        return pairs
    finally:
        for server in servers:
            bench.stop_server(server.proc)


def token_model(model: Path, folder: Path, args) -> dict:
    backend = load_onnxruntime(model, "cpu", THREADS)
    probes = {
        "1": lambda: bench.rows_per_second(backend, token_feed(1), 1.0),
        "64": lambda: bench.rows_per_second(backend, token_feed(64), 1.5),
    }
    server = bench.Server(model, THREADS, 64)
    body = write_token_body(folder)
    try:
        server.load(body, 1, 64, 1)
        runs = [
            bench.bracketed(lambda: server.load(body, 1, 64, args.duration), probes)
            for _ in range(args.runs)
        ]
    finally:
        bench.stop_server(server.proc)
    keys = ("img_s", "ceiling_1", "ceiling_64", "ratio_1", "ratio_64", "p50_ms", "p99_ms")
    return {key: bench.median_of(runs, key) for key in keys} | {"errors": bench.errors(runs)}


def report(results: dict) -> None:
    print(f"machine: {results['machine']}")
    print(f"baseline {results['baseline']}, current {results['current']}; {THREADS} threads\n")
    columns = (
        "images/request", "connections", "baseline img/s", "current img/s", "current / baseline",
        "ceiling b64", "baseline ratio", "current ratio", "baseline p99 ms", "current p99 ms",
        "baseline CPU µs/img", "current CPU µs/img", "baseline event loop µs/img",
        "current event loop µs/img", "errors",
    )  # fmt: skip
    keys = ("rows", "connections", "baseline_img_s", "current_img_s", "current_over_baseline")
    keys += ("ceiling_64", "baseline_ratio_64", "current_ratio_64", "baseline_p99_ms")
    keys += ("current_p99_ms", "baseline_cpu_us", "current_cpu_us", "baseline_loop_us")
    keys += ("current_loop_us", "errors")
    print(bench.table(columns, [[r[k] for k in keys] for r in results["seed_cnn"]]))
    t = results["tokens"]
    print(
        f"\ntwo-input INT64 model [N, {TOKENS}], 1 row per request, 64 connections: "
        f"{t['img_s']:,.0f} rows/s, {t['ratio_64']:.2f} of session.run at batch 64 "
        f"({t['ceiling_64']:,.0f} rows/s), {t['ratio_1']:.1f}x session.run at batch 1 "
        f"({t['ceiling_1']:,.0f} rows/s); p50 {t['p50_ms']:.2f} ms, p99 {t['p99_ms']:.2f} ms, "
        f"{t['errors']} errors"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--runs", type=int, default=5, help="runs per server (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="bench_general_"))
    trees = {"baseline": baseline_tree(args.baseline, folder), "current": REPO}
    try:
        tokens = build_token_model(folder / "tokens.onnx")
        current = bench.build_cnn(folder / "seed_cnn.onnx")
        models = {
            "current": current,
            "baseline": as_version_1(current, folder / "v1" / "seed_cnn.onnx"),
        }
        revision = ["git", "-C", str(REPO), "rev-parse", "--short"]
        results = {
            "machine": bench.machine(),
            "baseline": subprocess.check_output([*revision, args.baseline], text=True).strip(),
            "current": subprocess.check_output([*revision, "HEAD"], text=True).strip(),
            "seed_cnn": [
                seed_cnn_pairs(models, trees, folder, rows, conns, args)
                for rows, conns in ((1, 64), (64, 4))
            ],
            "tokens": token_model(tokens, folder, args),
        }
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees["baseline"])],
            check=False,
        )
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
