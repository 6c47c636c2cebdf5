"""The export stage for sequence models (text, series): two inputs, batch and length dynamic.

The model is any ``nn.Module`` with ``forward(values, mask)`` (values: int64 ids [N, L] or
float32 raw series [N, C, T]; mask: int64 [N, T]) returning logits, or a regressor's
prediction. The graph takes the inputs serving.contract names per kind and returns its
task's outputs (pipeline/export_tasks.py); one ``torch.export.Dim`` is the length of both
inputs. The parity gate runs the whole test split at its real lengths (batches of similar
length, each trimmed to its longest row), then probes at lengths 2, 7 and the maximum with
batches of 1, 7 and 64: a graph whose length was baked in fails there with one line naming
the probe.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import export_tasks, onnx_tools, quantize, variants
from pipeline.dataset import TOKENIZER_FILE, Meta, Split, load_split
from pipeline.errors import StageError, step
from pipeline.export_tasks import CLASSIFICATION, Task
from pipeline.params import ExportParams
from serving.contract import LOGITS_NAME, ModelContract, PaddedInput, SequencePreprocessing

PROBE_LENGTHS = (2, 7)  # and the maximum length; 7: an odd size a constant is unlikely to hit
PROBE_BATCH_SIZES = (1, 7, 64)
EXAMPLE_BATCH = 3  # >= 2 (torch.export specialises 0 and 1) and unlike the example length


def preprocessing(meta: Meta, data_dir: Path) -> SequencePreprocessing:
    """The contract's sequence part: padded inputs, lengths, and the tokenizer or the stats."""
    values, mask = onnx_tools.SEQUENCE_INPUTS[meta.kind]
    tokenizer = None
    if meta.kind == "text":
        path = Path(data_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise StageError(f"{path} not found; rerun the prepare stage")
        tokenizer = path.read_text()
    return SequencePreprocessing(
        kind=meta.kind,
        padded=(PaddedInput(values, len(meta.input_shape), 0.0), PaddedInput(mask, 1, 0.0)),
        mask_input=mask,
        min_length=int(meta.length_stats.get("min", 1)),
        max_length=int(meta.input_shape[-1]),
        mean=tuple(meta.mean) if meta.kind == "series" else (),
        std=tuple(meta.std) if meta.kind == "series" else (),
        tokenizer=tokenizer,
    )


# Export


def example_inputs(meta: Meta, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of EXAMPLE_BATCH rows of ``length`` steps with different lengths."""
    lengths = torch.tensor([length, max(1, length // 2), 1])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    if meta.kind == "text":
        return mask.clone(), mask  # id 1 ([UNK]) on real steps, PAD_ID 0 after
    generator = torch.Generator().manual_seed(0)
    channels = meta.input_shape[0]
    series = torch.randn((EXAMPLE_BATCH, channels, length), generator=generator)
    return series * mask[:, None, :], mask


def export_sequence_onnx(
    model: nn.Module, meta: Meta, path: Path, params: ExportParams, contract: ModelContract
) -> tuple[str, str | None]:
    """Export ``model`` with its task's outputs to one ONNX file carrying ``contract``;
    returns the exporter used and, when auto fell back to legacy, what was wrong with
    dynamo's graph."""
    max_length = int(meta.input_shape[-1])
    # The longest length, unless it equals the example batch: torch.export would then give
    # batch and length one symbol.
    length = max_length - 1 if max_length == EXAMPLE_BATCH else max_length
    if length < 2:
        raise StageError(f"sequences of {max_length} step cannot have a dynamic length")
    task = export_tasks.for_contract(contract)
    module = task.module(model)
    example = example_inputs(meta, length)
    with torch.inference_mode():
        task.check_output(model(*example), EXAMPLE_BATCH, len(contract.class_names))
    used = "legacy" if params.exporter == "legacy" else "dynamo"
    graph = Graph(module, example, meta, params.opset, task.outputs)
    proto = graph.export(used)
    problem = None
    if params.exporter == "auto":
        problem = length_problem(module, meta, proto, params, task)
    if problem is not None:
        used, proto = "legacy", graph.export("legacy")
    proto.doc_string = f"tensorferry {contract.model_name} (fp32)"
    onnx_tools.set_metadata(proto, contract.to_metadata())
    variants.save(proto, path)
    return used, problem


@dataclasses.dataclass(frozen=True)
class Graph:
    """What either exporter needs: the module with the graph's outputs, named ``outputs``."""

    module: nn.Module
    example: tuple[torch.Tensor, torch.Tensor]
    meta: Meta
    opset: int
    outputs: tuple[str, ...]

    def export(self, exporter: str) -> Any:
        with variants.quiet_exporter():
            return self._dynamo() if exporter == "dynamo" else self._legacy()

    def _dynamo(self) -> Any:
        batch = torch.export.Dim("batch")
        length = torch.export.Dim("length", min=1, max=int(self.meta.input_shape[-1]))
        values_axes = {0: batch, len(self.meta.input_shape): length}
        program = torch.onnx.export(
            self.module,
            self.example,
            dynamo=True,
            external_data=False,
            opset_version=self.opset,
            input_names=list(onnx_tools.SEQUENCE_INPUTS[self.meta.kind]),
            output_names=list(self.outputs),
            # One entry: the output wrapper's *inputs, values then mask.
            dynamic_shapes=((values_axes, {0: batch, 1: length}),),
            verbose=False,
        )
        return program.model_proto

    def _legacy(self) -> Any:
        import onnx

        names = list(onnx_tools.SEQUENCE_INPUTS[self.meta.kind])
        axes = {names[0]: {0: "batch", len(self.meta.input_shape): "length"}}
        axes |= {names[1]: {0: "batch", 1: "length"}} | {n: {0: "batch"} for n in self.outputs}
        buffer = io.BytesIO()
        torch.onnx.export(
            self.module,
            self.example,
            buffer,
            dynamo=False,
            opset_version=self.opset,
            input_names=names,
            output_names=list(self.outputs),
            dynamic_axes=axes,
        )
        return onnx.load_from_string(buffer.getvalue())


def length_problem(
    module: nn.Module, meta: Meta, proto: Any, params: ExportParams, task: Task
) -> str | None:
    """Why the graph is wrong at two lengths besides the example's, or None when it is not."""
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    max_length = int(meta.input_shape[-1])
    for length in sorted({2, max(2, max_length // 2 + 1)} - {max_length}) or [2]:
        values, mask = example_inputs(meta, min(length, max_length))
        names = onnx_tools.SEQUENCE_INPUTS[meta.kind]
        try:
            got = sess.run(
                [task.outputs[0]], dict(zip(names, (values.numpy(), mask.numpy()), strict=True))
            )[0]
        except Exception as exc:  # onnxruntime raises its own pybind types
            return f"fails at length {length}: {str(exc).strip().splitlines()[0]}"
        want = export_tasks.first_output(module, values, mask)
        if not task.close(want, got, params):
            return f"differs from PyTorch at length {length}"
    return None


# Parity


@dataclasses.dataclass(frozen=True)
class Probe:
    length: int
    batch: int
    parity: export_tasks.Parity  # of this probe's rows alone

    def to_json(self) -> dict[str, Any]:
        return {"length": self.length, "batch": self.batch, **self.parity.figures()}


@dataclasses.dataclass(frozen=True)
class SequenceParity:
    overall: export_tasks.Parity  # the test split at real lengths and every probe
    probes: tuple[Probe, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.overall.to_json(), "probes": [p.to_json() for p in self.probes]}

    def require(self) -> None:
        if self.overall.passed:
            return
        worst = max(self.probes, key=lambda p: p.parity.severity)
        raise StageError(
            f"{self.overall.problem()}; worst probe: length {worst.length}, batch "
            f"{worst.batch} ({worst.parity.headline})"
        )


def torch_runner(module: nn.Module) -> Callable[[onnx_tools.Feeds], np.ndarray]:
    """``module``'s first output (logits, or a prediction) for one batch of feeds."""

    def run(feeds: onnx_tools.Feeds) -> np.ndarray:
        values, mask = (torch.from_numpy(np.asarray(v)) for v in feeds.values())
        return export_tasks.first_output(module, values, mask)

    return run


def onnx_runner(path: Path, output: str = LOGITS_NAME) -> Callable[[onnx_tools.Feeds], np.ndarray]:
    """ORT's ``output`` for one batch; a failed run names the batch's shape and the likely
    cause."""
    sess = onnx_tools.session(path)

    def run(feeds: onnx_tools.Feeds) -> np.ndarray:
        batch, length = list(feeds.values())[-1].shape  # the mask: [N, T]
        try:
            return sess.run([output], dict(feeds))[0]
        except Exception as exc:  # onnxruntime raises its own pybind types
            first = " ".join(str(exc).split())[:200]
            raise StageError(
                f"{path.name} fails in ONNX Runtime at sequence length {length}, batch "
                f"{batch}: the length may be baked into the graph (export.exporter=legacy "
                f"exports GRU/LSTM with a dynamic length): {first}"
            ) from None

    return run


def probe_lengths(max_length: int) -> tuple[int, ...]:
    return tuple(sorted({min(length, max_length) for length in (*PROBE_LENGTHS, max_length)}))


def measure_parity(
    model: nn.Module,
    onnx_path: Path,
    kind: str,
    split: Split,
    params: ExportParams,
    task: Task = CLASSIFICATION,
) -> export_tasks.Measured:
    """PyTorch vs ONNX Runtime on ``split`` at real lengths and at every probe."""
    assert split.lengths is not None
    module = task.module(model)
    ort_run, torch_run = onnx_runner(onnx_path, task.outputs[0]), torch_runner(module)
    got = onnx_tools.by_length(ort_run, kind, split.x, split.lengths, params.batch_size)
    want = onnx_tools.by_length(torch_run, kind, split.x, split.lengths, params.batch_size)
    pairs, probes = [(want, got)], []
    # np.resize repeats the split cyclically, so batch 64 works on a tiny test split too.
    rows = max(PROBE_BATCH_SIZES)
    x = np.resize(split.x, (rows, *split.x.shape[1:]))
    lengths = np.resize(split.lengths, rows)
    for length in probe_lengths(split.x.shape[-1]):
        feeds = onnx_tools.sequence_feeds(kind, x, lengths, length)
        reference = torch_run(feeds)
        for size in PROBE_BATCH_SIZES:
            pair = (
                reference[:size],
                ort_run({name: value[:size] for name, value in feeds.items()}),
            )
            pairs.append(pair)
            probes.append(Probe(length, size, task.parity([pair], params, "sequences", size)))
    overall = task.parity(pairs, params, "sequences", len(split.x))
    return export_tasks.Measured(SequenceParity(overall, tuple(probes)), want, got)


# Variants


def calibration_feeds(train: Split, kind: str, params: ExportParams) -> list[dict[str, np.ndarray]]:
    """A seeded sample of train rows as feeds of similar length, each trimmed to its longest."""
    assert train.lengths is not None
    index = np.arange(len(train.x))
    chosen = quantize.calibration_sample(index, params.calibration_samples, params.calibration_seed)
    lengths = train.lengths[chosen]
    order = chosen[np.argsort(lengths, kind="stable")]
    batches = []
    for start in range(0, len(order), quantize.CALIBRATION_BATCH):
        rows = order[start : start + quantize.CALIBRATION_BATCH]
        steps = int(train.lengths[rows].max())
        batches.append(
            dict(onnx_tools.sequence_feeds(kind, train.x[rows], train.lengths[rows], steps))
        )
    return batches


def variant_builders(
    kind: str, data_dir: Path, params: ExportParams
) -> dict[str, variants.Builder]:
    @step("int8 quantization")
    def int8(fp32: Path, dst: Path) -> None:
        if params.sequence_int8 == "dynamic":
            quantize.quantize_int8_dynamic(fp32, dst)
            return
        train = load_split("train", data_dir)
        quantize.quantize_int8(fp32, dst, calibration_feeds(train, kind, params))

    return {"int8": int8, "fp16": quantize.convert_fp16}


# The stage's sequence path


def export_all(
    model: nn.Module,
    meta: Meta,
    contract: ModelContract,
    params: ExportParams,
    out: Path,
    data_dir: Path,
) -> dict[str, Any]:
    """Every file of the export into ``out`` (a fresh directory); returns the report."""
    task = export_tasks.for_contract(contract)
    test = load_split("test", data_dir, meta)
    fp32 = out / onnx_tools.VARIANT_FILES["fp32"]
    start = time.perf_counter()
    with step("export fp32"):
        exporter, dynamo_problem = export_sequence_onnx(model, meta, fp32, params, contract)
    with step("fp32 onnx check"):
        variants.check_onnx(fp32)
    export_seconds = time.perf_counter() - start
    with step("parity"):
        measured = measure_parity(model, fp32, meta.kind, test, params, task)
        measured.parity.require()
    with step("contract check"):
        variants.check_graph_io(fp32, contract)
    if meta.kind == "text":
        shutil.copyfile(data_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    reports = {"fp32": task.variant_report(fp32, measured.onnx, measured.onnx, test.y)}
    builders = variant_builders(meta.kind, data_dir, params)
    for name in (v for v in ("int8", "fp16") if v in params.variants):
        dst = out / onnx_tools.VARIANT_FILES[name]
        variants.build_variant(name, fp32, dst, contract, builders[name])
        with step(f"{name} {task.metric_name}"):
            run = onnx_runner(dst, task.outputs[0])
            outputs = onnx_tools.by_length(run, meta.kind, test.x, test.lengths, params.batch_size)
        reports[name] = task.variant_report(dst, outputs, measured.onnx, test.y)
    task.check_variants(reports, params)
    return {
        "model": contract.model_name,
        "kind": meta.kind,
        "task": task.name,
        "exporter": exporter,
        "dynamo_problem": dynamo_problem,  # why auto fell back to legacy, else None
        "opset": params.opset,
        "export_seconds": round(export_seconds, 3),
        **{f"torch_{k}": v for k, v in task.metrics(measured.torch, test.y).items()},
        "parity": measured.parity.to_json(),
        "int8_method": params.sequence_int8 if "int8" in params.variants else None,
        "variants": reports,
        **task.gate(params),
        "params_hash": contract.params_hash,
    }
