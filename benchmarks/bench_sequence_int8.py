"""int8 for sequence models on ONNX Runtime CPU: dynamic quantization vs static Q/DQ.

Claim (export.sequence_int8): dynamic quantization of MatMul/Gemm is the faster int8 for
our sequence models on CPU, within the accuracy budget; static Q/DQ (which TensorRT needs)
is the alternative. Current figures: docs/benchmarks.md.

Both models are exported by the export stage's own code
(pipeline/export_sequence.py) from a text classifier of realistic size: a GRU
(embedding 128, hidden 256) and a transformer encoder (d_model 128, 4 heads, 2 layers,
feed-forward 512), vocabulary 8,000, length 128. Weights are random (briefly trained
models behave alike for speed); agreement with fp32 is top-1 over 512 rows at real lengths.

Per variant: median and spread of --runs timed runs of one batch of --batch rows at full
length, after a warm-up, with --threads intra-op threads.

    python benchmarks/bench_sequence_int8.py [--runs 7] [--batch 64] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import export_sequence, onnx_tools, quantize  # noqa: E402
from pipeline.dataset import Meta, Split  # noqa: E402
from pipeline.params import ExportParams  # noqa: E402
from serving.contract import SEQUENCE_CLASSIFICATION, ModelContract  # noqa: E402

VOCAB, LENGTH, CLASSES = 8000, 128, 4


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(h.dtype)
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Gru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 128, padding_idx=0)
        self.rnn = nn.GRU(128, 256, batch_first=True)
        self.head = nn.Linear(256, CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(masked_mean(self.rnn(self.embedding(ids))[0], mask))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 128, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, LENGTH, 128) * 0.02)
        layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids) + self.position[:, : ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=mask == 0)
        return self.head(masked_mean(h, mask))


def meta() -> Meta:
    return Meta(
        class_names=tuple(str(i) for i in range(CLASSES)),
        input_shape=(LENGTH,),
        mean=(),
        std=(),
        split_sizes={},
        fingerprint="",
        source={},
        kind="text",
        vocab_size=VOCAB,
        length_stats={"min": 8, "median": 64, "max": LENGTH},
    )


def rows(count: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, LENGTH + 1, count)
    ids = rng.integers(2, VOCAB, (count, LENGTH))
    ids[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    return Split(ids.astype(np.int64), np.zeros(count, np.int64), lengths.astype(np.int64))


def timed(path: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> list[float]:
    sess = onnx_tools.session(path, threads)
    sess.run(None, feeds)  # warm-up: first-run allocations
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times


def variants(model: nn.Module, directory: Path) -> tuple[dict[str, Path], str]:
    fp32 = directory / "model.onnx"
    contract = ModelContract(type(model).__name__, SEQUENCE_CLASSIFICATION, meta().class_names)
    exporter, _ = export_sequence.export_sequence_onnx(
        model, meta(), fp32, ExportParams(), contract
    )
    dynamic, static = directory / "dynamic.onnx", directory / "static.onnx"
    quantize.quantize_int8_dynamic(fp32, dynamic)
    calibration = export_sequence.calibration_feeds(rows(256, 1), "text", ExportParams())
    quantize.quantize_int8(fp32, static, calibration)
    return {"fp32": fp32, "int8 dynamic": dynamic, "int8 static Q/DQ": static}, exporter


def measure(model: nn.Module, args: argparse.Namespace, directory: Path) -> list[dict]:
    paths, exporter = variants(model.eval(), directory)
    batch = rows(args.batch, 2)
    feeds = dict(onnx_tools.sequence_feeds("text", batch.x, batch.lengths, LENGTH))
    check = rows(512, 3)
    logits = {}
    results = []
    for name, path in paths.items():
        sess = onnx_tools.session(path, args.threads)

        def run(f, sess=sess):
            return sess.run(["logits"], dict(f))[0]

        logits[name] = onnx_tools.by_length(run, "text", check.x, check.lengths, 64)
        times = timed(path, feeds, args.runs, args.threads)
        results.append(
            {
                "model": type(model).__name__.lower(),
                "exporter": exporter,
                "variant": name,
                "ms": statistics.median(times) * 1e3,
                "spread_ms": (max(times) - min(times)) * 1e3,
                "agreement": onnx_tools.agreement(logits[name], logits["fp32"]),
                "max_diff": float(np.abs(logits[name] - logits["fp32"]).max()),
                "kib": path.stat().st_size / 1024,
            }
        )
    for result in results:
        result["speedup"] = results[0]["ms"] / result["ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import onnxruntime

    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in (Gru(), Transformer()):
            directory = Path(tmp) / type(model).__name__
            directory.mkdir()
            results += measure(model, args, directory)
    from bench_pipeline import machine

    print(
        f"{machine()}, onnxruntime {onnxruntime.__version__}; "
        f"batch {args.batch} x length {LENGTH}, {args.threads or 'all'} threads, "
        f"median of {args.runs}"
    )
    print("| model | exporter | variant | ms | spread | vs fp32 | top-1 vs fp32 | max diff | KiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['exporter']} | {r['variant']} | {r['ms']:.1f} | "
            f"±{r['spread_ms']:.1f} | {r['speedup']:.2f}x | {r['agreement']:.2%} | "
            f"{r['max_diff']:.3g} | {r['kib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
