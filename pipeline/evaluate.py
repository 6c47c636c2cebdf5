"""evaluate stage: test-split metrics, a confusion-matrix plot for DVC, and PNG figures.

Sequence data also gets its accuracy by length bucket (quartiles of the test lengths), since
a sequence model's errors tend to gather at the short or the long end.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from pipeline.artifacts import atomic_path, write_json
from pipeline.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from pipeline.dataset import DEFAULT_DIR, Meta, load_meta, load_split
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.models import ModelSpec
from pipeline.params import EvaluateParams, load_with_overrides
from pipeline.train import DEFAULT_LIVE_DIR

DEFAULT_REPORTS = Path("reports")


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, x: np.ndarray, batch_size: int, lengths: np.ndarray | None = None
) -> np.ndarray:
    """Class probabilities; sequences (``lengths`` given) go in batches cut to their longest
    row, with the mask, as in training."""
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
        chunks.append(torch.softmax(model(*inputs), dim=1))
    probabilities = torch.cat(chunks).double()
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


def check_fits(spec: ModelSpec, meta: Meta, source: Path) -> None:
    """The checkpoint must take this data: same kind, and the same input the network sees
    (image shape, series channels, text vocabulary); sequences may differ in length."""
    if spec.kind != meta.kind:
        raise StageError(
            f"checkpoint {source} was trained on {spec.kind} data but the prepared data is "
            f"{meta.kind}; retrain"
        )
    expected, got = {
        "image": (list(spec.input_shape), list(meta.input_shape)),
        "series": (spec.channels, meta.input_shape[0]),
        "text": (spec.vocab_size, meta.vocab_size),
    }[meta.kind]
    if expected != got:
        what = {"image": "input", "series": "channels", "text": "vocabulary size"}[meta.kind]
        raise StageError(
            f"checkpoint {source} expects {what} {expected} but the prepared data has {got}; "
            "retrain"
        )


def evaluate(
    params: EvaluateParams,
    data_dir: Path = DEFAULT_DIR,
    checkpoint_path: Path = DEFAULT_CHECKPOINT,
    live_dir: Path = DEFAULT_LIVE_DIR,
    reports: Path = DEFAULT_REPORTS,
) -> dict[str, Any]:
    meta = load_meta(data_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    check_fits(checkpoint.spec, meta, checkpoint_path)
    if checkpoint.class_names != meta.class_names:
        raise StageError(f"checkpoint {checkpoint_path} was trained on other classes; retrain")
    with step("build model"):
        model = checkpoint.build(str(checkpoint_path))
    with step("predict"):
        test = load_split("test", data_dir, meta)
        probabilities = predict_probabilities(model, test.x, params.batch_size, test.lengths)
    predicted = probabilities.argmax(axis=1)
    with step("metrics"):
        metrics = classification_metrics(test.y, probabilities, meta.class_names)
        if test.lengths is not None:
            metrics["by_length"] = accuracy_by_length(test.lengths, test.y, predicted)
    write_json(reports / "metrics.json", metrics)
    write_json(
        reports / "confusion.json",
        [
            {"actual": meta.class_names[a], "predicted": meta.class_names[p]}
            for a, p in zip(test.y.tolist(), predicted.tolist(), strict=True)
        ],
    )
    with step("figures"):
        _save_figures(test.y, predicted, meta.class_names, live_dir, reports)
    return metrics


# ---------------------------------------------------------------- figures


def _save_figures(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: tuple[str, ...],
    live_dir: Path,
    reports: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        colorbar=False,
    )
    display.ax_.set_title("Confusion matrix (test split)")
    _save_figure(display.figure_, reports / "confusion.png")
    _save_figure(_training_curves(live_dir), reports / "training_curves.png")


def _training_curves(live_dir: Path):  # noqa: ANN202 - matplotlib Figure
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        for metric, ax in (("loss", loss_ax), ("acc", acc_ax)):
            steps, values = _read_tsv(live_dir / "plots" / "metrics" / split / f"{metric}.tsv")
            ax.plot(steps, values, marker="o", label=split)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
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
        Path, typer.Option(help="Directory for metrics.json, confusion.json and PNGs.")
    ] = DEFAULT_REPORTS,
) -> None:
    """Evaluate the checkpoint on the test split."""
    params = load_with_overrides("evaluate", EvaluateParams, params_file)
    metrics = evaluate(params, data_dir, checkpoint, live_dir, reports)
    typer.echo(
        f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}, "
        f"log loss {metrics['log_loss']:.4f} -> {reports / 'metrics.json'}"
    )


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
