"""What every export shares: the ONNX checks, the exporter's silence, and the
reduced-precision variants with their gates (accuracy for classifiers, RMSE for
regressors)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import onnx_tools
from pipeline.errors import StageError, step
from serving.contract import ContractError, ModelContract, check_io

Builder = Callable[[Path, Path], None]  # fp32 ONNX path -> variant path


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (shape and type inference) as a StageError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise StageError(f"{path.name} fails onnx.checker: {first}") from None


def check_graph_io(path: Path, contract: ModelContract) -> None:
    """The graph must take what its contract says a server will send (serving's own check)."""
    try:
        check_io(contract, onnx_tools.signature(onnx_tools.session(path)), path.name)
    except ContractError as exc:
        raise StageError(str(exc)) from None


def save(proto: Any, path: Path) -> None:
    import onnx

    onnx.save_model(proto, str(path))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs progress, torchvision hints and deprecation warnings; hide them."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_accuracy_drops(variants: dict[str, dict[str, Any]], max_drop: float) -> None:
    """Fail when any variant's test accuracy falls more than ``max_drop`` points below fp32."""
    over = [
        f"{name} {report['accuracy']:.2%} ({report['accuracy_drop_pp']:+.2f} pp)"
        for name, report in variants.items()
        if not report["accuracy_drop_pp"] <= max_drop
    ]
    if over:
        raise StageError(
            f"accuracy drop above export.max_accuracy_drop {max_drop:g} pp against fp32 "
            f"{variants['fp32']['accuracy']:.2%}: {', '.join(over)}"
        )


def variant_report(
    path: Path, logits: np.ndarray, fp32_logits: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    accuracy = onnx_tools.accuracy(logits, labels)
    fp32_accuracy = onnx_tools.accuracy(fp32_logits, labels)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "accuracy": accuracy,
        # Percentage points; positive means worse than fp32. Rounded so 0.0 prints as 0.0.
        "accuracy_drop_pp": round((fp32_accuracy - accuracy) * 100, 6),
        "top1_agreement_fp32": onnx_tools.agreement(logits, fp32_logits),
        "max_abs_logit_diff_fp32": float(np.abs(logits - fp32_logits).max()),
    }


def check_rmse_increases(variants: dict[str, dict[str, Any]], max_increase: float) -> None:
    """Fail when any variant's test RMSE is more than ``max_increase`` percent above fp32's."""
    fp32 = variants["fp32"]["rmse"]
    over = [
        f"{name} rmse {report['rmse']:.4g} ({report['rmse_increase_pct']:+.2f} %)"
        for name, report in variants.items()
        if not report["rmse_increase_pct"] <= max_increase  # NaN fails too
    ]
    if over:
        raise StageError(
            f"test RMSE above fp32's {fp32:.4g} by more than export.max_rmse_increase "
            f"{max_increase:g} % (limit {fp32 * (1 + max_increase / 100):.4g}): {', '.join(over)}"
        )


def regression_report(
    path: Path, predictions: np.ndarray, fp32_predictions: np.ndarray, targets: np.ndarray
) -> dict[str, Any]:
    metrics = onnx_tools.regression_metrics(predictions, targets)
    fp32_rmse = onnx_tools.regression_metrics(fp32_predictions, targets)["rmse"]
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        **metrics,
        # Percent of fp32's RMSE; positive means worse. Rounded so 0.0 prints as 0.0.
        "rmse_increase_pct": round(onnx_tools.percent_increase(metrics["rmse"], fp32_rmse), 6),
        "max_abs_diff_fp32": float(np.abs(predictions - fp32_predictions).max()),
    }


def build_variant(
    name: str, fp32: Path, dst: Path, contract: ModelContract, builder: Builder
) -> None:
    """Derive variant ``name`` from the fp32 file, stamp its precision, and check it."""
    import onnx

    builder(fp32, dst)
    proto = onnx.load(str(dst))
    metadata = dataclasses.replace(contract, precision=name).to_metadata()
    onnx_tools.set_metadata(proto, metadata)
    proto.doc_string = f"tensorferry {contract.model_name} ({name})"
    save(proto, dst)
    with step(f"{name} onnx check"):
        check_onnx(dst)
