"""The export stage for sequence classifiers (text, series): two inputs, batch and length dynamic.

The model is any ``nn.Module`` with ``forward(values, mask) -> logits`` (values: int64 ids
[N, L] or float32 raw series [N, C, T]; mask: int64 [N, T]). The graph takes the inputs
serving.contract names per kind and returns ``logits`` and ``probabilities``; one
``torch.export.Dim`` is the length of both inputs. The parity gate runs the whole test split
at its real lengths (batches of similar length, each trimmed to its longest row), then
probes at lengths 2, 7 and the maximum with batches of 1, 7 and 64: a graph whose length
was baked in fails there with one line naming the probe.
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

from pipeline import onnx_tools, quantize, variants
from pipeline.dataset import TOKENIZER_FILE, Meta, Split, load_split
from pipeline.errors import StageError, step
from pipeline.params import ExportParams
from serving.contract import (
    KEY_MODEL_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    ModelContract,
    PaddedInput,
    SequencePreprocessing,
)

PROBE_LENGTHS = (2, 7)  # and the maximum length; 7: an odd size a constant is unlikely to hit
PROBE_BATCH_SIZES = (1, 7, 64)
EXAMPLE_BATCH = 3  # >= 2 (torch.export specialises 0 and 1) and unlike the example length


class SequenceExportModule(nn.Module):
    """The classifier plus a softmax: the exported graph's two outputs."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.classifier(values, mask)
        return logits, torch.softmax(logits, dim=1)


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
    model: nn.Module, meta: Meta, path: Path, params: ExportParams, metadata: dict[str, str]
) -> tuple[str, str | None]:
    """Export ``model`` to one ONNX file carrying ``metadata``; returns the exporter used and,
    when auto fell back to legacy, what was wrong with dynamo's graph."""
    max_length = int(meta.input_shape[-1])
    # The longest length, unless it equals the example batch: torch.export would then give
    # batch and length one symbol.
    length = max_length - 1 if max_length == EXAMPLE_BATCH else max_length
    if length < 2:
        raise StageError(f"sequences of {max_length} step cannot have a dynamic length")
    module = SequenceExportModule(model).eval()
    example = example_inputs(meta, length)
    used = "legacy" if params.exporter == "legacy" else "dynamo"
    proto = _export(used, module, example, meta, params.opset, max_length)
    problem = None
    if params.exporter == "auto":
        problem = length_problem(module, meta, proto, params.parity_atol)
    if problem is not None:
        used, proto = "legacy", _export("legacy", module, example, meta, params.opset, max_length)
    proto.doc_string = f"tensorferry {metadata.get(KEY_MODEL_NAME, '')} (fp32)"
    onnx_tools.set_metadata(proto, metadata)
    variants.save(proto, path)
    return used, problem


def _export(
    exporter: str,
    module: nn.Module,
    example: tuple[torch.Tensor, torch.Tensor],
    meta: Meta,
    opset: int,
    max_length: int,
) -> Any:
    import onnx

    names = list(onnx_tools.SEQUENCE_INPUTS[meta.kind])
    outputs = [LOGITS_NAME, PROBABILITIES_NAME]
    with variants.quiet_exporter():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            length = torch.export.Dim("length", min=1, max=max_length)
            values_axes = {0: batch, len(meta.input_shape): length}
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_shapes={"values": values_axes, "mask": {0: batch, 1: length}},
                verbose=False,
            )
            return program.model_proto
        buffer = io.BytesIO()
        axes = {names[0]: {0: "batch", len(meta.input_shape): "length"}}
        axes |= {names[1]: {0: "batch", 1: "length"}} | {name: {0: "batch"} for name in outputs}
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
        )
        return onnx.load_from_string(buffer.getvalue())


def length_problem(module: nn.Module, meta: Meta, proto: Any, atol: float) -> str | None:
    """Why the graph is wrong at two lengths besides the example's, or None when it is not."""
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    max_length = int(meta.input_shape[-1])
    for length in sorted({2, max(2, max_length // 2 + 1)} - {max_length}) or [2]:
        values, mask = example_inputs(meta, min(length, max_length))
        names = onnx_tools.SEQUENCE_INPUTS[meta.kind]
        try:
            got = sess.run(
                [LOGITS_NAME], dict(zip(names, (values.numpy(), mask.numpy()), strict=True))
            )[0]
        except Exception as exc:  # onnxruntime raises its own pybind types
            return f"fails at length {length}: {str(exc).strip().splitlines()[0]}"
        with torch.inference_mode():
            want = module(values, mask)[0].numpy()
        if np.abs(got - want).max() > atol:
            return f"differs from PyTorch at length {length}"
    return None


# Parity


@dataclasses.dataclass(frozen=True)
class Probe:
    length: int
    batch: int
    max_abs_logit_diff: float
    top1_agreement: float


@dataclasses.dataclass(frozen=True)
class SequenceParity:
    sequences: int
    max_abs_logit_diff: float  # over the test split and every probe
    top1_agreement: float  # on the test split at real lengths
    probes: tuple[Probe, ...]

    def to_json(self, atol: float) -> dict[str, Any]:
        probes = [dataclasses.asdict(p) for p in self.probes]
        return {**dataclasses.asdict(self), "probes": probes, "atol": atol}


def torch_runner(model: nn.Module) -> Callable[[onnx_tools.Feeds], np.ndarray]:
    def run(feeds: onnx_tools.Feeds) -> np.ndarray:
        values, mask = (torch.from_numpy(np.asarray(v)) for v in feeds.values())
        with torch.inference_mode():
            return model(values, mask).float().numpy()

    return run


def onnx_runner(path: Path) -> Callable[[onnx_tools.Feeds], np.ndarray]:
    """ORT logits for one batch; a failed run names the batch's shape and the likely cause."""
    sess = onnx_tools.session(path)

    def run(feeds: onnx_tools.Feeds) -> np.ndarray:
        batch, length = list(feeds.values())[-1].shape  # the mask: [N, T]
        try:
            return sess.run([LOGITS_NAME], dict(feeds))[0]
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
    model: nn.Module, onnx_path: Path, kind: str, split: Split, batch_size: int
) -> tuple[SequenceParity, np.ndarray]:
    """PyTorch vs ONNX Runtime on ``split`` at real lengths and at every probe.

    Returns the figures and the ONNX logits (the fp32 reference for variants).
    """
    assert split.lengths is not None
    ort_run, torch_run = onnx_runner(onnx_path), torch_runner(model)
    logits = onnx_tools.by_length(ort_run, kind, split.x, split.lengths, batch_size)
    reference = onnx_tools.by_length(torch_run, kind, split.x, split.lengths, batch_size)
    probes = []
    # np.resize repeats the split cyclically, so batch 64 works on a tiny test split too.
    rows = max(PROBE_BATCH_SIZES)
    x = np.resize(split.x, (rows, *split.x.shape[1:]))
    lengths = np.resize(split.lengths, rows)
    for length in probe_lengths(split.x.shape[-1]):
        feeds = onnx_tools.sequence_feeds(kind, x, lengths, length)
        want = torch_run(feeds)
        for size in PROBE_BATCH_SIZES:
            got = ort_run({name: value[:size] for name, value in feeds.items()})
            diff = float(np.abs(got - want[:size]).max())
            probes.append(Probe(length, size, diff, onnx_tools.agreement(got, want[:size])))
    parity = SequenceParity(
        sequences=len(split.x),
        max_abs_logit_diff=max(
            float(np.abs(logits - reference).max()), *(p.max_abs_logit_diff for p in probes)
        ),
        top1_agreement=onnx_tools.agreement(logits, reference),
        probes=tuple(probes),
    )
    return parity, logits


def require_parity(parity: SequenceParity, atol: float) -> None:
    worst = max(parity.probes, key=lambda p: (p.max_abs_logit_diff, -p.top1_agreement))
    agreement = min(parity.top1_agreement, *(p.top1_agreement for p in parity.probes))
    if parity.max_abs_logit_diff <= atol and agreement == 1.0:
        return
    raise StageError(
        f"ONNX parity check failed on {parity.sequences} test sequences: max |logit diff| "
        f"{parity.max_abs_logit_diff:.3g} (limit {atol:g}), top-1 agreement "
        f"{agreement:.2%} (must be 100%); worst probe: length {worst.length}, batch "
        f"{worst.batch} ({worst.max_abs_logit_diff:.3g})"
    )


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
    metadata = contract.to_metadata()
    test = load_split("test", data_dir, meta)
    fp32 = out / onnx_tools.VARIANT_FILES["fp32"]
    start = time.perf_counter()
    with step("export fp32"):
        exporter, dynamo_problem = export_sequence_onnx(model, meta, fp32, params, metadata)
    with step("fp32 onnx check"):
        variants.check_onnx(fp32)
    export_seconds = time.perf_counter() - start
    with step("parity"):
        parity, fp32_logits = measure_parity(model, fp32, meta.kind, test, params.batch_size)
        require_parity(parity, params.parity_atol)
    with step("contract check"):
        variants.check_graph_io(fp32, contract)
    if meta.kind == "text":
        shutil.copyfile(data_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    reports = {"fp32": variants.variant_report(fp32, fp32_logits, fp32_logits, test.y)}
    builders = variant_builders(meta.kind, data_dir, params)
    for name in (v for v in ("int8", "fp16") if v in params.variants):
        dst = out / onnx_tools.VARIANT_FILES[name]
        variants.build_variant(name, fp32, dst, contract, builders[name])
        with step(f"{name} accuracy"):
            run = onnx_runner(dst)
            logits = onnx_tools.by_length(run, meta.kind, test.x, test.lengths, params.batch_size)
        reports[name] = variants.variant_report(dst, logits, fp32_logits, test.y)
    variants.check_accuracy_drops(reports, params.max_accuracy_drop)
    torch_logits = onnx_tools.by_length(
        torch_runner(model), meta.kind, test.x, test.lengths, params.batch_size
    )
    return {
        "model": contract.model_name,
        "kind": meta.kind,
        "exporter": exporter,
        "dynamo_problem": dynamo_problem,  # why auto fell back to legacy, else None
        "opset": params.opset,
        "export_seconds": round(export_seconds, 3),
        "torch_accuracy": onnx_tools.accuracy(torch_logits, test.y),
        "parity": parity.to_json(params.parity_atol),
        "int8_method": params.sequence_int8 if "int8" in params.variants else None,
        "variants": reports,
        "max_accuracy_drop_pp": params.max_accuracy_drop,
        "params_hash": contract.params_hash,
    }
