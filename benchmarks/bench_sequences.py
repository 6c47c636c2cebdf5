"""Sequence-model benchmarks: every stage of the pipeline on real text and time series.

Claims checked (issue 18), on a 2-core CPU:
  text    shared/datasets/sms-spam.tsv (5,574 SMS, 13 % spam): the best sequence model's
          test macro F1 >= a TF-IDF + logistic-regression baseline on the same split,
          measured in the same run; accuracy, macro F1, spam precision/recall, train time
  series  GunPoint >= 99 % and JapaneseVowels >= 98 % test accuracy (aeon's bundled
          copies, published splits), each whole pipeline run <= 5 min

A run is the stage commands `dvc repro` runs (prepare, train, evaluate, export, engine),
in a scratch directory with its own params.yaml, timed end to end.

Usage:
  python benchmarks/bench_sequences.py text [--models gru,lstm,transformer,cnn1d] [--runs 1]
  python benchmarks/bench_sequences.py series [--runs 3]
Prints a Markdown table with the machine and versions; quote medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
SMS = REPO.parent / "shared" / "datasets" / "sms-spam.tsv"
STAGES = ("prepare", "train", "evaluate", "export", "engine")
# The settings the README's commands use; each family's figures come from these.
TEXT_DATA = {
    "source": "text",
    "path": str(SMS),
    "text_columns": ["SMS"],
    "label_column": "Label",
}
SERIES_TRAIN = {"epochs": 100, "batch_size": 16, "lr": 0.003}
SERIES_RUNS = {
    "GunPoint": {"model": {"name": "cnn1d"}, "train": SERIES_TRAIN},
    "JapaneseVowels": {"model": {"name": "cnn1d"}, "train": SERIES_TRAIN},
}
TEXT_RUNS = {
    "gru": {"model": {"name": "gru", "width": 64}, "train": {"epochs": 15}},
    "lstm": {"model": {"name": "lstm", "width": 128}, "train": {"epochs": 15}},
    "transformer": {
        "model": {"name": "transformer", "width": 64},
        "train": {"epochs": 15, "lr": 0.001},
    },
    "cnn1d": {"model": {"name": "cnn1d"}, "train": {"epochs": 15}},
}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def machine() -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_pipeline import machine as describe

    return describe()


def run_pipeline(params: dict[str, dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Every stage in ``workdir``; returns test metrics, stage times and the export report."""
    workdir.mkdir(parents=True)
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        defaults[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(defaults, sort_keys=False))
    seconds = {}
    for stage in STAGES:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}"], cwd=workdir, capture_output=True, text=True
        )
        seconds[stage] = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{result.stdout}\n{result.stderr}")
    reports = workdir / "reports"
    return {
        "metrics": json.loads((reports / "metrics.json").read_text()),
        "export": json.loads((reports / "export.json").read_text()),
        "engine": json.loads((reports / "engine.json").read_text()),
        "seconds": seconds,
    }


def tfidf_baselines(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression on the pipeline's own
    train/test split (the prepare stage's split of the raw texts: same seed and fractions),
    with scikit-learn's defaults and with C picked by 5-fold macro F1 on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, precision_score, recall_score
    from sklearn.model_selection import GridSearchCV

    from pipeline.params import DataParams, from_mapping
    from pipeline.prepare import split_data
    from pipeline.text_data import load_text

    params = from_mapping(DataParams, data, prefix="data")
    raw = load_text(params)
    splits = split_data(raw, params)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    spam = raw.class_names.index("spam")
    classifiers = {
        "TF-IDF + logistic regression (defaults)": LogisticRegression(max_iter=2000),
        "TF-IDF + logistic regression (C by 5-fold CV)": GridSearchCV(
            LogisticRegression(max_iter=2000),
            {"C": [0.1, 1, 10, 100, 1000]},
            cv=5,
            scoring="f1_macro",
        ),
    }
    figures = {}
    for name, classifier in classifiers.items():
        start = time.perf_counter()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        classifier.fit(vectorizer.fit_transform(x_train.tolist()), y_train)
        seconds = time.perf_counter() - start
        predicted = classifier.predict(vectorizer.transform(x_test.tolist()))
        figures[name] = {
            "accuracy": float((predicted == y_test).mean()),
            "f1_macro": float(f1_score(y_test, predicted, average="macro")),
            "spam_precision": float(precision_score(y_test, predicted, pos_label=spam)),
            "spam_recall": float(recall_score(y_test, predicted, pos_label=spam)),
            "train_seconds": seconds,
            "pipeline_s": 0.0,
        }
    return figures


def _spam_figures(metrics: dict[str, Any]) -> dict[str, float]:
    spam = metrics["per_class"]["spam"]
    return {
        "accuracy": metrics["accuracy"],
        "f1_macro": metrics["f1_macro"],
        "spam_precision": spam["precision"],
        "spam_recall": spam["recall"],
    }


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


@app.command()
def text(
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = (
        "gru,lstm,transformer,cnn1d"
    ),
    runs: Annotated[int, typer.Option(help="Pipeline runs per model (seeds 0, 1, ...).")] = 1,
) -> None:
    """SMS spam: each sequence model against TF-IDF + logistic regression."""
    if not SMS.is_file():
        raise SystemExit(f"{SMS} not found")
    print(f"Machine: {machine()}\n")
    rows = {name: [row] for name, row in tfidf_baselines(TEXT_DATA).items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.split(","):
            rows[name] = []
            for seed in range(runs):
                settings = TEXT_RUNS[name]
                params = {
                    "data": TEXT_DATA,
                    "model": settings["model"],
                    "train": {**settings["train"], "seed": seed},
                }
                result = run_pipeline(params, Path(tmp) / f"{name}-{seed}")
                rows[name].append(
                    {
                        **_spam_figures(result["metrics"]),
                        "train_seconds": result["seconds"]["train"],
                        "pipeline_s": sum(result["seconds"].values()),
                    }
                )
                print(f"{name} seed {seed}: {rows[name][-1]}", file=sys.stderr)
    print(f"SMS spam test split, median of {runs} run(s) per model:\n")
    print("| model | accuracy | macro F1 | spam precision | spam recall | train s | pipeline s |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in rows.items():
        m = _median_of(figures)
        print(
            f"| {name} | {m['accuracy']:.2%} | {m['f1_macro']:.4f} | {m['spam_precision']:.2%} "
            f"| {m['spam_recall']:.2%} | {m['train_seconds']:.1f} | {m['pipeline_s']:.0f} |"
        )


@app.command()
def series(runs: Annotated[int, typer.Option(help="Pipeline runs per set.")] = 3) -> None:
    """GunPoint and JapaneseVowels: test accuracy and whole-pipeline time."""
    print(f"Machine: {machine()}\n")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, params in SERIES_RUNS.items():
            results = []
            for seed in range(runs):
                run_params = {
                    "data": {"source": "series", "dataset": dataset},
                    "model": params["model"],
                    "train": {**params["train"], "seed": seed},
                }
                results.append(run_pipeline(run_params, Path(tmp) / f"{dataset}-{seed}"))
                accuracy = results[-1]["metrics"]["accuracy"]
                print(f"{dataset} seed {seed}: {accuracy}", file=sys.stderr)
            table.append((dataset, params["model"]["name"], results))
    print(f"Test accuracy and wall time of the whole pipeline, median of {runs} runs:\n")
    print("| set | model | test accuracy (median, min-max) | int8 engine | pipeline s | train s |")
    print("|---|---|---|---|---|---|")
    for dataset, model, results in table:
        accuracies = [r["metrics"]["accuracy"] for r in results]
        engine = statistics.median(r["engine"]["accuracy"] for r in results)
        total = statistics.median(sum(r["seconds"].values()) for r in results)
        train = statistics.median(r["seconds"]["train"] for r in results)
        print(
            f"| {dataset} | {model} | {statistics.median(accuracies):.2%} "
            f"({min(accuracies):.2%}-{max(accuracies):.2%}) | {engine:.2%} | {total:.0f} "
            f"| {train:.0f} |"
        )


if __name__ == "__main__":
    app()
