"""The export stage: checkpoint -> one self-contained ONNX file per precision, verified.

An image model is exported with torch's dynamo exporter (dynamic batch, uint8 pixels in,
normalisation baked in, ``logits`` and ``probabilities`` out), passes onnx.checker's full
check and must match PyTorch on the whole test split (max |logit diff| <= parity_atol,
100% top-1 agreement) at several batch sizes. Sequence models (text, series) take the
same gates with a dynamic length too (pipeline/export_sequence.py). int8 and fp16
variants are derived from it and must stay within ``max_accuracy_drop`` points of its
test accuracy. Everything lands
in ``models/onnx`` at once, or not at all; figures go to ``reports/export.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import typer
from torch import nn

from pipeline import export_sequence, onnx_tools, quantize
from pipeline.artifacts import atomic_path, git_revision, params_hash, write_metrics
from pipeline.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from pipeline.dataset import DEFAULT_DIR, Meta, load_meta, load_split
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.params import ExportParams, as_dict, load_with_overrides
from pipeline.variants import (
    build_variant,
    check_accuracy_drops,
    check_onnx,
    quiet_exporter,
    save,
    variant_report,
)
from serving.contract import (
    IMAGE_CLASSIFICATION,
    INPUT_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    SEQUENCE_CLASSIFICATION,
    ImagePreprocessing,
    ModelContract,
)

DEFAULT_OUT = onnx_tools.ONNX_DIR
DEFAULT_REPORT = Path("reports/export.json")
VARIANT_FILES = onnx_tools.VARIANT_FILES
# Upstream reports batch dims baked to a constant (pytorch#148629, #165748): odd sizes catch it.
PARITY_BATCH_SIZES = (1, 7, 64)
OPSETS = range(17, 21)


class ExportModule(nn.Module):
    """The Classifier plus a softmax: the exported graph's two outputs."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(images)
        return logits, torch.softmax(logits, dim=1)


@dataclasses.dataclass(frozen=True)
class Parity:
    images: int
    max_abs_logit_diff: float
    top1_agreement: float
    batch_sizes: tuple[int, ...]

    def to_json(self, atol: float) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "batch_sizes": list(self.batch_sizes), "atol": atol}


# Export


def export_onnx(model: nn.Module, path: Path, opset: int, contract: ModelContract) -> None:
    """Export ``model`` (uint8 NCHW in, logits out) to one ONNX file carrying ``contract``."""
    check_opset(opset)
    # An example batch of 2: with 1, the exporter may specialise the batch dim to a constant.
    example = torch.zeros((2, *contract.image.shape), dtype=torch.uint8)
    with quiet_exporter():
        program = torch.onnx.export(
            ExportModule(model).eval(),
            (example,),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[LOGITS_NAME, PROBABILITIES_NAME],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    proto = program.model_proto
    proto.doc_string = f"tensorferry {contract.model_name} ({contract.precision})"
    onnx_tools.set_metadata(proto, contract.to_metadata())
    save(proto, path)


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise StageError(
            f"params: export.opset must be 17-20 (ONNX Runtime int8 quantization fails "
            f"at 21+), got {opset}"
        )


# Parity


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [
                model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
                for i in range(0, len(x), batch_size)
            ]
        )


def measure_parity(
    model: nn.Module, onnx_path: Path, x: np.ndarray, batch_size: int
) -> tuple[Parity, np.ndarray]:
    """Compare PyTorch and ONNX Runtime on every image of ``x`` and at PARITY_BATCH_SIZES.

    Returns the figures and the ONNX logits (reused as the fp32 reference for variants).
    """
    sess = onnx_tools.session(onnx_path)
    reference = torch_logits(model, x, batch_size)
    logits = onnx_tools.run_logits(sess, x, batch_size)
    diff = float(np.abs(logits - reference).max())
    # np.resize repeats the split cyclically, so batch 64 works on a tiny test split too.
    probe = np.resize(x, (max(PARITY_BATCH_SIZES), *x.shape[1:]))
    probe_reference = torch_logits(model, probe, len(probe))
    for size in PARITY_BATCH_SIZES:
        probe_logits = onnx_tools.run_logits(sess, probe[:size], size)
        diff = max(diff, float(np.abs(probe_logits - probe_reference[:size]).max()))
    parity = Parity(
        images=len(x),
        max_abs_logit_diff=diff,
        top1_agreement=onnx_tools.agreement(logits, reference),
        batch_sizes=PARITY_BATCH_SIZES,
    )
    return parity, logits


def require_parity(parity: Parity, atol: float) -> None:
    if parity.max_abs_logit_diff <= atol and parity.top1_agreement == 1.0:
        return
    raise StageError(
        f"ONNX parity check failed on {parity.images} test images: max |logit diff| "
        f"{parity.max_abs_logit_diff:.3g} (limit {atol:g}), top-1 agreement "
        f"{parity.top1_agreement:.2%} (must be 100%)"
    )


# Variants


def image_builders(
    train_x: Callable[[], np.ndarray], params: ExportParams
) -> dict[str, Callable[[Path, Path], None]]:
    @step("int8 quantization")
    def int8(fp32: Path, dst: Path) -> None:
        sample = quantize.calibration_sample(
            train_x(), params.calibration_samples, params.calibration_seed
        )
        quantize.quantize_int8(fp32, dst, quantize.image_batches(sample, INPUT_NAME))

    return {"int8": int8, "fp16": quantize.convert_fp16}


# The stage


def check_data_matches(checkpoint: Checkpoint, meta: Meta, data_dir: Path) -> None:
    """The checkpoint must have been trained on this prepared data (shape, classes, stats)."""
    if tuple(checkpoint.spec.input_shape) != tuple(meta.input_shape):
        raise StageError(
            f"checkpoint expects input {list(checkpoint.spec.input_shape)} but {data_dir} "
            f"holds {list(meta.input_shape)}; rerun the train stage"
        )
    if tuple(checkpoint.class_names) != tuple(meta.class_names):
        raise StageError(f"checkpoint's class names differ from {data_dir}/meta.json")
    stats_differ = not np.allclose(checkpoint.mean, meta.mean, atol=1e-6) or not np.allclose(
        checkpoint.std, meta.std, atol=1e-6
    )
    fingerprints_differ = (
        checkpoint.data_fingerprint
        and meta.fingerprint
        and checkpoint.data_fingerprint != meta.fingerprint
    )
    if stats_differ or fingerprints_differ:
        raise StageError(
            f"checkpoint was trained on other data than {data_dir} (fingerprint "
            f"{checkpoint.data_fingerprint[:12] or '?'} vs {meta.fingerprint[:12]}); "
            "rerun the train stage"
        )


def make_contract(
    model_name: str,
    meta: Meta,
    params: ExportParams,
    data_dir: Path,
    *,
    data_fingerprint: str = "",
    train_params_hash: str = "",
) -> ModelContract:
    """The contract the fp32 file carries: image or sequence preprocessing from ``meta``."""
    sequence = export_sequence.preprocessing(meta, data_dir) if meta.is_sequence else None
    image = None
    if not meta.is_sequence:
        image = ImagePreprocessing(
            input_name=INPUT_NAME,
            layout="NCHW",
            shape=tuple(meta.input_shape),  # type: ignore[arg-type]
            dtype="uint8",
            value_range=(0.0, 255.0),
        )
    return ModelContract(
        model_name=model_name,
        task=SEQUENCE_CLASSIFICATION if meta.is_sequence else IMAGE_CLASSIFICATION,
        class_names=tuple(meta.class_names),
        image=image,
        sequence=sequence,
        precision="fp32",
        data_fingerprint=data_fingerprint or meta.fingerprint,
        params_hash=params_hash({"train": train_params_hash, "export": as_dict(params)}),
        git_revision=git_revision(),
    )


def export_model(
    params: ExportParams,
    checkpoint_path: Path = DEFAULT_CHECKPOINT,
    data_dir: Path = DEFAULT_DIR,
    out: Path = DEFAULT_OUT,
    report_path: Path | None = DEFAULT_REPORT,
) -> dict[str, Any]:
    """Run the export stage; returns the report (also written to ``report_path``)."""
    with step("load checkpoint"):
        checkpoint = load_checkpoint(checkpoint_path)
        model = checkpoint.build(source=f"checkpoint {checkpoint_path}")
    with step("load data"):
        meta = load_meta(data_dir)
        check_data_matches(checkpoint, meta, data_dir)
    contract = make_contract(
        checkpoint.spec.name,
        meta,
        params,
        data_dir,
        data_fingerprint=checkpoint.data_fingerprint,
        train_params_hash=checkpoint.params_hash,
    )
    return export_built(model, meta, contract, params, data_dir, out, report_path)


def export_built(
    model: nn.Module,
    meta: Meta,
    contract: ModelContract,
    params: ExportParams,
    data_dir: Path = DEFAULT_DIR,
    out: Path = DEFAULT_OUT,
    report_path: Path | None = DEFAULT_REPORT,
) -> dict[str, Any]:
    """Export a built model of ``meta``'s kind into ``out`` (all files or none)."""
    check_opset(params.opset)
    with step("load data"):
        test = None if meta.is_sequence else load_split("test", data_dir, meta)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if test is None:
            report = export_sequence.export_all(model, meta, contract, params, tmp, data_dir)
        else:
            report = _export_all(model, contract, params, tmp, test.x, test.y, data_dir)
    if report_path is not None:
        write_metrics(report_path, report)
    return report


def _export_all(
    model: nn.Module,
    contract: ModelContract,
    params: ExportParams,
    out: Path,
    x: np.ndarray,
    y: np.ndarray,
    data_dir: Path,
) -> dict[str, Any]:
    fp32 = out / VARIANT_FILES["fp32"]
    start = time.perf_counter()
    with step("export fp32"):
        export_onnx(model, fp32, params.opset, contract)
    with step("fp32 onnx check"):
        check_onnx(fp32)
    export_seconds = time.perf_counter() - start
    with step("parity"):
        parity, fp32_logits = measure_parity(model, fp32, x, params.batch_size)
        require_parity(parity, params.parity_atol)
    variants = {"fp32": variant_report(fp32, fp32_logits, fp32_logits, y)}
    builders = image_builders(lambda: load_split("train", data_dir).x, params)
    for name in (v for v in ("int8", "fp16") if v in params.variants):
        dst = out / VARIANT_FILES[name]
        build_variant(name, fp32, dst, contract, builders[name])
        with step(f"{name} accuracy"):
            logits = onnx_tools.run_logits(onnx_tools.session(dst), x, params.batch_size)
        variants[name] = variant_report(dst, logits, fp32_logits, y)
    check_accuracy_drops(variants, params.max_accuracy_drop)
    return {
        "model": contract.model_name,
        "opset": params.opset,
        "export_seconds": round(export_seconds, 3),
        "torch_accuracy": onnx_tools.accuracy(torch_logits(model, x, params.batch_size), y),
        "parity": parity.to_json(params.parity_atol),
        "variants": variants,
        "max_accuracy_drop_pp": params.max_accuracy_drop,
        "params_hash": contract.params_hash,
    }


Exporter = Literal["auto", "dynamo", "legacy"]


@exit_on_stage_error
def command(
    checkpoint: Annotated[
        Path, typer.Option(help="Training checkpoint to export.")
    ] = DEFAULT_CHECKPOINT,
    out: Annotated[
        Path,
        typer.Option(help="Output directory: model.onnx, model.int8.onnx, model.fp16.onnx."),
    ] = DEFAULT_OUT,
    data_dir: Annotated[
        Path,
        typer.Option(help="Prepared data: test split for parity/accuracy, train for calibration."),
    ] = DEFAULT_DIR,
    report: Annotated[
        Path, typer.Option(help="Where to write the JSON report (DVC metrics).")
    ] = DEFAULT_REPORT,
    params_file: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="params.yaml to read the `export` section from (default: ./params.yaml "
            "when it exists, else built-in defaults). Options below override it.",
        ),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset, 17-20 [params: export.opset, 18].")
    ] = None,
    # list[str], not list[Literal]: typer rejects lists of Literal; the params loader checks.
    variants: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="Precision to write: fp32, int8 or fp16; repeat for several. fp32 is "
            "always written [params: export.variants, fp32 int8 fp16].",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            help="Fail when a variant's test accuracy is more than this many percentage "
            "points below fp32 [params: export.max_accuracy_drop, 1.0]."
        ),
    ] = None,
    calibration_samples: Annotated[
        int | None,
        typer.Option(
            help="int8: train images used for calibration [params: export.calibration_samples]."
        ),
    ] = None,
    exporter: Annotated[
        Exporter | None,
        typer.Option(
            help="Sequence models: dynamo, legacy, or auto (dynamo, legacy when the graph "
            "fails at other lengths) [params: export.exporter, auto]."
        ),
    ] = None,
) -> None:
    """Export the checkpoint to ONNX (uint8 in, logits + probabilities out), verify parity
    with PyTorch on the test split, and write the int8/fp16 variants."""
    params = load_with_overrides(
        "export",
        ExportParams,
        params_file,
        opset=opset,
        variants=variants,
        max_accuracy_drop=max_accuracy_drop,
        calibration_samples=calibration_samples,
        exporter=exporter,
    )
    result = export_model(params, checkpoint, data_dir, out, report)
    parity = result["parity"]
    rows = (
        f"{parity['images']} test images"
        if "images" in parity
        else (
            f"{parity['sequences']} test sequences and {len(parity['probes'])} length probes "
            f"({result['exporter']} exporter)"
        )
    )
    typer.echo(
        f"exported {result['model']} (opset {result['opset']}) "
        f"in {result['export_seconds']:.1f} s; "
        f"parity on {rows}: max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2g}, top-1 agreement {parity['top1_agreement']:.0%}"
    )
    for name, variant in result["variants"].items():
        typer.echo(
            f"  {name}: {out / variant['file']} accuracy {variant['accuracy']:.2%} "
            f"(drop {variant['accuracy_drop_pp']:+.2f} pp, {variant['bytes'] / 1024:.0f} KiB)"
        )


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
