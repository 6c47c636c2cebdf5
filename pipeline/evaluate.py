"""evaluate stage: test-split metrics, plots for DVC, and PNG figures.

``reports/metrics.json`` holds accuracy, macro precision/recall/F1, log loss and per-class
figures (classification) or mse, rmse, mae and r2 in target units (regression).
``reports/plots/`` holds the task's plots, one directory so that the stage's outputs are
the same for both tasks:

- classification: ``confusion.json`` (a DVC confusion-matrix plot) and ``confusion.png``;
- regression: ``predictions.json`` (actual, predicted and residual per test row, for DVC's
  predicted-vs-actual and residual scatter plots), ``predicted_vs_actual.png`` and
  ``residuals.png``;
- both: ``training_curves.png`` (loss, and accuracy or RMSE, per epoch).

Sequence classification also gets its accuracy by length bucket (quartiles of the test
lengths), since a sequence model's errors tend to gather at the short or the long end.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from pipeline import onnx_tools
from pipeline.artifacts import atomic_path, write_json
from pipeline.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from pipeline.dataset import DEFAULT_DIR, Column, Meta, Split, load_meta, load_split
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.params import EvaluateParams, load_with_overrides
from pipeline.train import DEFAULT_LIVE_DIR

DEFAULT_REPORTS = Path("reports")
PLOTS_DIR = "plots"  # under the reports directory: the stage's one plots output


@torch.no_grad()
def predict_outputs(
    model: torch.nn.Module, x: np.ndarray, batch_size: int, lengths: np.ndarray | None = None
) -> torch.Tensor:
    """The model's outputs (logits, or regression predictions); sequences (``lengths``
    given) go in batches cut to their longest row, with the mask, as in training."""
    chunks = []
    for start in range(0, len(x), batch_size):
        batch = slice(start, start + batch_size)
        if lengths is None:
            inputs = [torch.from_numpy(x[batch])]
        else:
            steps = int(lengths[batch].max())
            mask = np.arange(steps)[None, :] < lengths[batch, None]
            inputs = [
                torch.from_numpy(x[batch, ..., :steps]),
                torch.from_numpy(mask.astype(np.int64)),
            ]
        chunks.append(model(*inputs))
    return torch.cat(chunks)


def predict_probabilities(
    model: torch.nn.Module, x: np.ndarray, batch_size: int, lengths: np.ndarray | None = None
) -> np.ndarray:
    """Class probabilities, float64 rows that sum to 1."""
    return _probabilities(predict_outputs(model, x, batch_size, lengths))


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    probabilities = torch.softmax(logits, dim=1).double()
    # float32 softmax rows sum to 1 +- 1e-7; log_loss warns unless they sum to 1 in float64.
    return (probabilities / probabilities.sum(dim=1, keepdim=True)).numpy()


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    macro = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    per_class = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
        "precision_macro": round(float(macro[0]), 6),
        "recall_macro": round(float(macro[1]), 6),
        "f1_macro": round(float(macro[2]), 6),
        "log_loss": round(float(log_loss(y_true, probabilities, labels=labels)), 6),
        "test_size": int(len(y_true)),
        "per_class": {
            name: {
                "precision": round(float(per_class[0][i]), 6),
                "recall": round(float(per_class[1][i]), 6),
                "f1": round(float(per_class[2][i]), 6),
                "support": int(per_class[3][i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Errors in target units, and r2 (1 is perfect, 0 is predicting the test mean): the
    figures the export and engine stages report (onnx_tools), with the MSE."""
    figures = onnx_tools.regression_metrics(y_pred, y_true)
    return {
        "mse": round(figures["rmse"] ** 2, 6),
        **{key: round(value, 6) for key, value in figures.items()},
        "test_size": int(len(y_true)),
    }


def accuracy_by_length(
    lengths: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Accuracy per quartile bucket of ``lengths``, keyed bucket_1.. from the shortest up
    (metrics.json sorts its keys); equal quartiles merge, so there may be fewer than four."""
    edges = np.unique(np.quantile(lengths, [0.25, 0.5, 0.75], method="lower"))
    # side="left": bucket i holds lengths in (edges[i-1], edges[i]], the last one the rest.
    buckets = np.searchsorted(edges, lengths, side="left")
    report = {}
    for number, bucket in enumerate(np.unique(buckets), start=1):
        members = buckets == bucket
        report[f"bucket_{number}"] = {
            "min_length": int(lengths[members].min()),
            "max_length": int(lengths[members].max()),
            "count": int(members.sum()),
            "accuracy": round(float((y_true[members] == y_pred[members]).mean()), 6),
        }
    return report


def check_fits(checkpoint: Checkpoint, meta: Meta, source: Path) -> None:
    """The checkpoint must take this data: same kind and task, the same input the network
    sees (image shape, series channels, text vocabulary, tabular columns) and the same
    classes; sequences may differ in length."""
    spec = checkpoint.spec
    if spec.kind != meta.kind:
        raise StageError(
            f"checkpoint {source} was trained on {spec.kind} data but the prepared data is "
            f"{meta.kind}; retrain"
        )
    if spec.task != meta.task:
        raise StageError(
            f"checkpoint {source} was trained for {spec.task} but the prepared data is a "
            f"{meta.task} task; retrain"
        )
    problem = _input_problem(checkpoint, meta)
    if problem:
        raise StageError(f"checkpoint {source} expects {problem}; retrain")
    if checkpoint.class_names != meta.class_names:
        raise StageError(f"checkpoint {source} was trained on other classes; retrain")


def _input_problem(checkpoint: Checkpoint, meta: Meta) -> str | None:
    spec = checkpoint.spec
    what, expected, got = {
        "image": ("input", list(spec.input_shape), list(meta.input_shape)),
        "series": ("channels", spec.channels, meta.input_shape[0]),
        "text": ("vocabulary size", spec.vocab_size, meta.vocab_size),
        "tabular": ("columns", spec.input_shape[0], meta.input_shape[0]),
    }[meta.kind]
    if expected != got:
        return f"{what} {expected} but the prepared data has {got}"
    if meta.kind != "tabular":
        return None
    return _column_problem(checkpoint.data_meta().columns, meta.columns)


def _column_problem(trained: tuple[Column, ...], data: tuple[Column, ...]) -> str | None:
    """The first column whose name, type or categories (what its codes mean) differ."""
    for old, new in zip(trained, data, strict=False):
        if (old.name, old.type, old.categories) != (new.name, new.type, new.categories):
            return f"{_describe(old)} but the prepared data has {_describe(new)}"
    return None


def _describe(column: Column) -> str:
    described = f"{column.type} column {column.name!r}"
    return described + (f" of categories {list(column.categories)}" if column.categories else "")


def evaluate(
    params: EvaluateParams,
    data_dir: Path = DEFAULT_DIR,
    checkpoint_path: Path = DEFAULT_CHECKPOINT,
    live_dir: Path = DEFAULT_LIVE_DIR,
    reports: Path = DEFAULT_REPORTS,
) -> dict[str, Any]:
    """Write ``reports/metrics.json`` and ``reports/plots/`` for the test split."""
    meta = load_meta(data_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    check_fits(checkpoint, meta, checkpoint_path)
    with step("build model"):
        model = checkpoint.build(f"checkpoint {checkpoint_path}")
    with step("predict"):
        test = load_split("test", data_dir, meta)
        outputs = predict_outputs(model, test.x, params.batch_size, test.lengths)
    if meta.is_regression:
        return _evaluate_regression(test, outputs.double().numpy(), live_dir, reports)
    return _evaluate_classification(test, outputs, meta.class_names, live_dir, reports)


def _evaluate_classification(
    test: Split,
    logits: torch.Tensor,
    class_names: tuple[str, ...],
    live_dir: Path,
    reports: Path,
) -> dict[str, Any]:
    probabilities = _probabilities(logits)
    predicted = probabilities.argmax(axis=1)
    with step("metrics"):
        metrics = classification_metrics(test.y, probabilities, class_names)
        if test.lengths is not None:
            metrics["by_length"] = accuracy_by_length(test.lengths, test.y, predicted)
    write_json(reports / "metrics.json", metrics)
    confusion = [
        {"actual": class_names[a], "predicted": class_names[p]}
        for a, p in zip(test.y.tolist(), predicted.tolist(), strict=True)
    ]
    with step("figures"), atomic_path(reports / PLOTS_DIR) as plots:
        plots.mkdir()
        write_json(plots / "confusion.json", confusion)
        _save_figure(_confusion_figure(test.y, predicted, class_names), plots / "confusion.png")
        _save_figure(_training_curves(live_dir, "acc"), plots / "training_curves.png")
    return metrics


def _evaluate_regression(
    test: Split, predicted: np.ndarray, live_dir: Path, reports: Path
) -> dict[str, Any]:
    actual = test.y.astype(np.float64)
    with step("metrics"):
        metrics = regression_metrics(actual, predicted)
    write_json(reports / "metrics.json", metrics)
    rows = [
        {"actual": round(a, 6), "predicted": round(p, 6), "residual": round(a - p, 6)}
        for a, p in zip(actual.tolist(), predicted.tolist(), strict=True)
    ]
    with step("figures"), atomic_path(reports / PLOTS_DIR) as plots:
        plots.mkdir()
        write_json(plots / "predictions.json", rows)
        scatter, residuals = _regression_figures(actual, predicted)
        _save_figure(scatter, plots / "predicted_vs_actual.png")
        _save_figure(residuals, plots / "residuals.png")
        _save_figure(_training_curves(live_dir, "rmse"), plots / "training_curves.png")
    return metrics


# ---------------------------------------------------------------- figures


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    return plt


def _confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]):  # noqa: ANN202 - matplotlib Figure
    _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        colorbar=False,
    )
    display.ax_.set_title("Confusion matrix (test split)")
    return display.figure_


def _regression_figures(actual: np.ndarray, predicted: np.ndarray) -> tuple[Any, Any]:
    """Predicted against actual (on the diagonal when right), and the residuals (actual -
    predicted) against the prediction, where a trend or a funnel shows a biased model."""
    plt = _pyplot()
    scatter, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual, predicted, s=12, alpha=0.6)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", label="predicted = actual")
    ax.set(title="Predicted vs actual (test split)", xlabel="actual", ylabel="predicted")
    ax.legend()
    scatter.tight_layout()
    residuals, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(predicted, actual - predicted, s=12, alpha=0.6)
    ax.axhline(0.0, color="grey", linestyle="--")
    ax.set(title="Residuals (test split)", xlabel="predicted", ylabel="actual - predicted")
    residuals.tight_layout()
    return scatter, residuals


def _training_curves(live_dir: Path, metric: str):  # noqa: ANN202 - matplotlib Figure
    """Loss and ``metric`` (acc or rmse) per epoch, train and val, from dvclive's files."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        for name, ax in (("loss", loss_ax), (metric, metric_ax)):
            steps, values = _read_tsv(live_dir / "plots" / "metrics" / split / f"{name}.tsv")
            ax.plot(steps, values, marker="o", label=split)
    loss_title, metric_title = {
        "acc": ("loss", "accuracy"),
        "rmse": ("loss (standardised target)", "RMSE (target units)"),
    }[metric]
    for ax, title in ((loss_ax, loss_title), (metric_ax, metric_title)):
        ax.set_title(title)
        ax.set_xlabel("epoch (step)")
        ax.legend()
    fig.tight_layout()
    return fig


def _read_tsv(path: Path) -> tuple[list[int], list[float]]:
    if not path.is_file():
        raise StageError(f"{path} not found; run the train stage first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [int(r["step"]) for r in rows], [float(r[path.stem]) for r in rows]


def _save_figure(fig, path: Path) -> None:  # noqa: ANN001 - matplotlib Figure
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@exit_on_stage_error
def command(
    params_file: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="params.yaml to read the `evaluate` section from (default: ./params.yaml when "
            "it exists, else the built-in defaults, which are params.yaml's).",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Prepared data directory.")] = DEFAULT_DIR,
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to evaluate.")] = DEFAULT_CHECKPOINT,
    live_dir: Annotated[
        Path, typer.Option(help="dvclive directory of the training run (for the curves).")
    ] = DEFAULT_LIVE_DIR,
    reports: Annotated[
        Path, typer.Option(help="Directory for metrics.json and plots/ (DVC plots, PNGs).")
    ] = DEFAULT_REPORTS,
) -> None:
    """Evaluate the checkpoint on the test split."""
    params = load_with_overrides("evaluate", EvaluateParams, params_file)
    metrics = evaluate(params, data_dir, checkpoint, live_dir, reports)
    if "rmse" in metrics:
        summary = f"rmse {metrics['rmse']:.4f}, mae {metrics['mae']:.4f}, r2 {metrics['r2']:.4f}"
    else:
        summary = (
            f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}, "
            f"log loss {metrics['log_loss']:.4f}"
        )
    typer.echo(f"test {summary} -> {reports / 'metrics.json'}")


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
