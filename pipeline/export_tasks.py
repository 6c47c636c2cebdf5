"""What a classifier's export and a regressor's differ in, whatever their input kind.

A classifier's graph outputs ``logits`` and ``probabilities``; it matches PyTorch when
every |logit diff| is within ``parity_atol`` and every top-1 class agrees, and a variant
passes when its test accuracy is at most ``max_accuracy_drop`` points below fp32's.

A regressor's graph outputs ``prediction``, float32 [N] in the target's units. Those can
be large (prices, counts), and float32 carries about 7 digits whatever the size, so a
value matches when |ONNX - PyTorch| <= parity_atol + parity_rtol * |PyTorch|; a variant
passes when its test RMSE is at most ``max_rmse_increase`` percent above fp32's.

The input side (images, tabular features, sequences) hands each task pairs of
(PyTorch, ONNX) outputs and never looks at them itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline import onnx_tools, variants
from pipeline.errors import StageError
from pipeline.params import ExportParams
from serving.contract import (
    LOGITS_NAME,
    PREDICTION_NAME,
    PROBABILITIES_NAME,
    REGRESSION,
    ModelContract,
)

Pair = tuple[np.ndarray, np.ndarray]  # (PyTorch, ONNX) outputs of the same rows


# The graphs' outputs


class ClassifierOutputs(nn.Module):
    """Logits plus their softmax: a classifier graph's two outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(*inputs)
        return logits, torch.softmax(logits, dim=1)


class RegressorOutputs(nn.Module):
    """The prediction as [N]: a user's regressor may end in [N, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        prediction = self.model(*inputs)
        return prediction if prediction.dim() == 1 else prediction.squeeze(1)


def first_output(module: nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    """The first of ``module``'s outputs (logits, or a prediction) as float32 numpy."""
    with torch.inference_mode():
        out = module(*inputs)
    return (out[0] if isinstance(out, tuple) else out).float().numpy()


# Parity


@dataclasses.dataclass(frozen=True)
class ClassParity:
    noun: str  # what a row is: "images", "rows", "sequences"
    rows: int
    max_abs_logit_diff: float  # over the test split and every probe
    top1_agreement: float  # likewise, the lowest
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.atol and self.top1_agreement == 1.0

    @property
    def severity(self) -> float:
        """How far outside its tolerance: <= 1 passes; a class flip is worse than any diff."""
        return self.max_abs_logit_diff / self.atol if self.top1_agreement == 1.0 else np.inf

    @property
    def headline(self) -> str:
        return f"max |logit diff| {self.max_abs_logit_diff:.3g}"

    def figures(self) -> dict[str, float]:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "top1_agreement": self.top1_agreement,
        }

    def to_json(self) -> dict[str, Any]:
        return {self.noun: self.rows, **self.figures(), "atol": self.atol}

    def problem(self) -> str:
        return (
            f"ONNX parity check failed on {self.rows} test {self.noun}: max |logit diff| "
            f"{self.max_abs_logit_diff:.3g} (limit {self.atol:g}), top-1 agreement "
            f"{self.top1_agreement:.2%} (must be 100%)"
        )

    def require(self) -> None:
        if not self.passed:
            raise StageError(self.problem())


@dataclasses.dataclass(frozen=True)
class RegressionParity:
    noun: str
    rows: int
    max_abs_diff: float  # over the test split and every probe
    max_rel_diff: float  # |diff| / |PyTorch|, likewise
    atol: float
    rtol: float
    # The value furthest outside its tolerance (or nearest to it): PyTorch's, the diff,
    # and the diff's limit there.
    worst_reference: float
    worst_diff: float
    worst_limit: float

    @property
    def passed(self) -> bool:
        return self.worst_diff <= self.worst_limit

    @property
    def severity(self) -> float:
        return self.worst_diff / self.worst_limit

    @property
    def headline(self) -> str:
        return f"max |diff| {self.max_abs_diff:.3g}"

    def figures(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff}

    def to_json(self) -> dict[str, Any]:
        return {self.noun: self.rows, **self.figures(), "atol": self.atol, "rtol": self.rtol}

    def problem(self) -> str:
        return (
            f"ONNX parity check failed on {self.rows} test {self.noun}: max |diff| "
            f"{self.max_abs_diff:.3g}, max relative {self.max_rel_diff:.3g}; worst "
            f"prediction off by {self.worst_diff:.3g} at PyTorch's {self.worst_reference:.6g} "
            f"(limit parity_atol {self.atol:g} + parity_rtol {self.rtol:g} x |value| = "
            f"{self.worst_limit:.3g})"
        )

    def require(self) -> None:
        if not self.passed:
            raise StageError(self.problem())


Parity = ClassParity | RegressionParity


class Gate(Protocol):
    """What the stage does with parity figures: a Parity, or a sequence model's with its
    length probes (pipeline/export_sequence.py)."""

    def to_json(self) -> dict[str, Any]: ...

    def require(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Measured:
    parity: Gate
    torch: np.ndarray  # PyTorch's first output on the test split
    onnx: np.ndarray  # the fp32 ONNX model's: the reference for the variants


def _regression_parity(
    pairs: Sequence[Pair], params: ExportParams, noun: str, rows: int
) -> RegressionParity:
    reference = np.concatenate([want.ravel() for want, _ in pairs]).astype(np.float64)
    got = np.concatenate([got.ravel() for _, got in pairs]).astype(np.float64)
    if got.size == 0:
        raise StageError("the test split is empty; rerun the prepare stage")
    # A NaN on one side only must fail (as an infinite diff); the same NaN on both passes.
    both = np.isnan(got) & np.isnan(reference)
    diff = np.where(both, 0.0, np.nan_to_num(np.abs(got - reference), nan=np.inf))
    magnitude = np.nan_to_num(np.abs(reference), nan=0.0)
    limit = params.parity_atol + params.parity_rtol * magnitude
    worst = int(np.argmax(diff / limit))
    relative = diff / np.maximum(magnitude, np.finfo(np.float32).tiny)
    return RegressionParity(
        noun=noun,
        rows=rows,
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(relative.max()),
        atol=params.parity_atol,
        rtol=params.parity_rtol,
        worst_reference=float(reference[worst]),
        worst_diff=float(diff[worst]),
        worst_limit=float(limit[worst]),
    )


def _class_parity(pairs: Sequence[Pair], params: ExportParams, noun: str, rows: int) -> ClassParity:
    return ClassParity(
        noun=noun,
        rows=rows,
        max_abs_logit_diff=max(float(np.abs(got - want).max(initial=0.0)) for want, got in pairs),
        top1_agreement=min(onnx_tools.agreement(got, want) for want, got in pairs),
        atol=params.parity_atol,
    )


# The tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's outputs, checks, figures and gates (see the module docstring)."""

    name: str  # "classification" | "regression"
    outputs: tuple[str, ...]  # graph output names; the first is what parity and metrics read

    @property
    def regression(self) -> bool:
        return self.name == "regression"

    @property
    def metric_name(self) -> str:
        """The figure the variants are judged by."""
        return "rmse" if self.regression else "accuracy"

    def module(self, model: nn.Module) -> nn.Module:
        """``model`` with the graph's outputs, in eval mode."""
        wrapper = RegressorOutputs if self.regression else ClassifierOutputs
        return wrapper(model).eval()

    def check_output(self, output: torch.Tensor, rows: int, classes: int) -> None:
        """The model's raw output for ``rows`` example rows must have the task's shape."""
        shape = tuple(output.shape)
        fits = shape in ((rows,), (rows, 1)) if self.regression else shape == (rows, classes)
        if fits:
            return
        want = "[N] or [N, 1]" if self.regression else f"[N, {classes}] (one logit per class)"
        raise StageError(
            f"the model returns {list(shape)} for {rows} rows; a {self.name} model must "
            f"return {want}"
        )

    def parity(self, pairs: Sequence[Pair], params: ExportParams, noun: str, rows: int) -> Parity:
        """How closely ONNX follows PyTorch over every (PyTorch, ONNX) pair of outputs: the
        test split's ``rows`` and whatever probes the input side adds."""
        judge = _regression_parity if self.regression else _class_parity
        return judge(pairs, params, noun, rows)

    def close(self, want: np.ndarray, got: np.ndarray, params: ExportParams) -> bool:
        """Every output within the parity tolerance (the diff alone: no class agreement)."""
        if self.regression:
            return _regression_parity([(want, got)], params, "", len(want)).passed
        return float(np.abs(got - want).max(initial=0.0)) <= params.parity_atol

    def metrics(self, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
        if self.regression:
            return onnx_tools.regression_metrics(outputs, y)
        return {"accuracy": onnx_tools.accuracy(outputs, y)}

    def variant_report(
        self, path: Path, outputs: np.ndarray, fp32: np.ndarray, y: np.ndarray
    ) -> dict[str, Any]:
        report = variants.regression_report if self.regression else variants.variant_report
        return report(path, outputs, fp32, y)

    def check_variants(self, reports: dict[str, dict[str, Any]], params: ExportParams) -> None:
        if self.regression:
            variants.check_rmse_increases(reports, params.max_rmse_increase)
        else:
            variants.check_accuracy_drops(reports, params.max_accuracy_drop)

    def gate(self, params: ExportParams) -> dict[str, float]:
        """The variant gate's limit, as the report records it."""
        if self.regression:
            return {"max_rmse_increase_pct": params.max_rmse_increase}
        return {"max_accuracy_drop_pp": params.max_accuracy_drop}


CLASSIFICATION = Task("classification", (LOGITS_NAME, PROBABILITIES_NAME))
REGRESSION_TASK = Task("regression", (PREDICTION_NAME,))


def for_contract(contract: ModelContract) -> Task:
    return REGRESSION_TASK if contract.task == REGRESSION else CLASSIFICATION


# The CLI's summary


def summary_lines(result: dict[str, Any], rows: str, out: Path) -> list[str]:
    """The export command's lines: parity on ``rows`` (e.g. "90 test images"), then one
    line per variant."""
    parity, regression = result["parity"], result.get("task") == "regression"
    head = (
        f"exported {result['model']} (opset {result['opset']}) in {result['export_seconds']:.1f} s"
    )
    if regression:
        figures = (
            f"max |diff| {parity['max_abs_diff']:.2g}, max relative {parity['max_rel_diff']:.2g}"
        )
    else:
        figures = (
            f"max |logit diff| {parity['max_abs_logit_diff']:.2g}, "
            f"top-1 agreement {parity['top1_agreement']:.0%}"
        )
    lines = [f"{head}; parity on {rows}: {figures}"]
    for name, variant in result["variants"].items():
        size = f"{variant['bytes'] / 1024:.0f} KiB"
        if regression:
            score = (
                f"rmse {variant['rmse']:.4g} ({variant['rmse_increase_pct']:+.2f} %, "
                f"r2 {variant['r2']:.3f}, {size})"
            )
        else:
            score = (
                f"accuracy {variant['accuracy']:.2%} "
                f"(drop {variant['accuracy_drop_pp']:+.2f} pp, {size})"
            )
        lines.append(f"  {name}: {out / variant['file']} {score}")
    return lines
