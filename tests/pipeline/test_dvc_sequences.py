"""End to end per sequence family: real DVC runs every stage on tiny text and series data,
and the server classifies raw text with the engine the pipeline built."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.pipeline.test_dvc_pipeline import copy_repository, sh
from tests.serving.serving_helpers import fetch, start_server

pytestmark = pytest.mark.slow

POSITIVE = ("good", "great", "fine", "lovely", "nice", "superb")
NEGATIVE = ("bad", "awful", "poor", "nasty", "grim", "dire")
FILLER = ("the", "film", "was", "a", "plot", "and", "cast", "very", "really", "quite")


def write_reviews(path: Path, per_class: int = 40) -> Path:
    """label<TAB>text rows whose class is the sentiment word they hold, among filler."""
    rng = np.random.default_rng(0)
    rows = ["label\ttext"]
    for label, words in (("pos", POSITIVE), ("neg", NEGATIVE)):
        for _ in range(per_class):
            filler = rng.choice(FILLER, size=int(rng.integers(2, 12))).tolist()
            filler.insert(int(rng.integers(0, len(filler) + 1)), str(rng.choice(words)))
            rows.append(f"{label}\t{' '.join(filler)}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_ts(path: Path, series: list[np.ndarray], labels: list[str]) -> Path:
    """A UCR/UEA .ts file of univariate, variable-length series."""
    header = [
        "@problemName waves",
        "@timeStamps false",
        "@missing false",
        "@univariate true",
        "@equalLength false",
        f"@classLabel true {' '.join(sorted(set(labels)))}",
        "@data",
    ]
    rows = [
        ",".join(f"{v:.5f}" for v in s) + f":{label}"
        for s, label in zip(series, labels, strict=True)
    ]
    path.write_text("\n".join(header + rows) + "\n")
    return path


def write_waves(folder: Path) -> Path:
    """Slow against fast sine waves of 20-40 steps, as a TRAIN/TEST pair."""
    rng = np.random.default_rng(1)
    for split, count in (("TRAIN", 30), ("TEST", 20)):
        series, labels = [], []
        for i in range(count):
            label = ("slow", "fast")[i % 2]
            steps = np.arange(int(rng.integers(20, 41)))
            freq = 0.15 if label == "slow" else 0.6
            series.append(np.sin(freq * steps + rng.uniform(0, 6)) + rng.normal(0, 0.1, steps.size))
            labels.append(label)
        write_ts(folder / f"waves_{split}.ts", series, labels)
    return folder / "waves_TRAIN.ts"


FAMILIES = {
    "text": {
        "data": {"source": "text", "path": "reviews.tsv", "max_length": 16, "vocab_size": 100},
        "model": {"name": "gru", "width": 16},
        "train": {"epochs": 20, "batch_size": 16, "lr": 0.01},
    },
    "series": {
        "data": {"source": "series", "path": "waves/waves_TRAIN.ts"},
        "model": {"name": "cnn1d", "width": 16},
        "train": {"epochs": 3, "batch_size": 16},
    },
}
TINY = {"export": {"max_accuracy_drop": 100.0}}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def repo(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    repo = copy_repository(tmp_path_factory.mktemp(family))
    write_reviews(repo / "reviews.tsv")
    (repo / "waves").mkdir()
    write_waves(repo / "waves")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, overrides in {**TINY, **FAMILIES[family]}.items():
        params[section].update(overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", f"tiny {family} params", cwd=repo)
    sh("dvc", "repro", cwd=repo)
    return family, repo


def test_every_stage_runs_and_reports(repo):
    family, repo = repo
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5  # two classes: above chance
    assert sum(b["count"] for b in metrics["by_length"].values()) == metrics["test_size"]
    export = json.loads((repo / "reports" / "export.json").read_text())
    assert export["parity"]["top1_agreement"] == 1.0
    assert {"fp32", "int8", "fp16"} <= set(export["variants"])
    engine = json.loads((repo / "reports" / "engine.json").read_text())
    assert engine["top1_agreement_fp32"] >= 0.9
    meta = json.loads((repo / "data" / "prepared" / "meta.json").read_text())
    assert meta["kind"] == family


def test_the_served_engine_classifies_raw_text(repo):
    """Text engines take raw strings; a series engine's /v1/classify names the infer route."""
    family, repo = repo
    server = start_server(repo / "models" / "engine" / "model.optimized.onnx")
    try:
        body = json.dumps({"texts": ["the film was superb", "a really awful plot"]}).encode()
        status, _, answer = fetch(
            server, "/v1/classify", body, {"Content-Type": "application/json"}
        )
        if family == "series":
            assert status == 404 and b"/v2/models/cnn1d/infer" in answer, answer
            return
        assert status == 200, answer
        results = json.loads(answer)["results"]
        assert [r["predictions"][0]["class"] for r in results] == ["pos", "neg"]
    finally:
        server.terminate()
