import json

import numpy as np
import pytest

from pipeline.errors import StageError
from pipeline.evaluate import accuracy_by_length, evaluate
from pipeline.params import EvaluateParams, ModelParams, TrainParams
from pipeline.train import train
from tests.pipeline.sequence_fixtures import write_series_prepared, write_text_prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A GRU trained on tiny series and a transformer on tiny text, with their data."""
    root = tmp_path_factory.mktemp("evaluate_sequence")
    runs = {}
    for kind, writer, name in (
        ("series", write_series_prepared, "gru"),
        ("text", write_text_prepared, "transformer"),
    ):
        data = writer(root / kind / "data")
        train(
            ModelParams(name=name, width=16, layers=1, heads=2),
            TrainParams(epochs=15, batch_size=16, lr=0.01),
            data,
            root / kind / "checkpoint.pt",
            root / kind / "live",
        )
        runs[kind] = root / kind
    return runs


def run(out, reports, data=None, checkpoint=None):
    return evaluate(
        EvaluateParams(batch_size=10),  # several batches, each cut to its own longest row
        data or out / "data",
        checkpoint or out / "checkpoint.pt",
        out / "live",
        reports,
    )


@pytest.mark.parametrize("kind", ["series", "text"])
def test_sequence_metrics_with_accuracy_by_length(tmp_path, trained, kind):
    metrics = run(trained[kind], tmp_path / "reports")
    assert metrics["accuracy"] >= 0.85 and metrics["test_size"] == 48
    buckets = metrics["by_length"]
    assert 2 <= len(buckets) <= 4
    assert sum(b["count"] for b in buckets.values()) == 48
    overall = sum(b["accuracy"] * b["count"] for b in buckets.values()) / 48
    assert overall == pytest.approx(metrics["accuracy"], abs=1e-5)
    ranges = [(b["min_length"], b["max_length"]) for _, b in sorted(buckets.items())]
    assert ranges == sorted(ranges) and all(
        a[1] < b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True)
    )
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == metrics
    for png in ("confusion.png", "training_curves.png"):
        assert (tmp_path / "reports" / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = json.loads((tmp_path / "reports" / "plots" / "confusion.json").read_text())
    assert len(confusion) == 48


def test_length_buckets_are_quartiles_and_merge_ties():
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    y = np.zeros(8, dtype=np.int64)
    predicted = np.array([0, 0, 1, 1, 0, 0, 0, 1])
    assert accuracy_by_length(lengths, y, predicted) == {
        "bucket_1": {"min_length": 1, "max_length": 2, "count": 2, "accuracy": 1.0},
        "bucket_2": {"min_length": 3, "max_length": 4, "count": 2, "accuracy": 0.0},
        "bucket_3": {"min_length": 5, "max_length": 6, "count": 2, "accuracy": 1.0},
        "bucket_4": {"min_length": 7, "max_length": 8, "count": 2, "accuracy": 0.5},
    }
    same = accuracy_by_length(np.full(5, 150), np.zeros(5), np.zeros(5))
    assert same == {"bucket_1": {"min_length": 150, "max_length": 150, "count": 5, "accuracy": 1.0}}


def test_checkpoint_for_other_sequence_data(tmp_path, trained):
    with pytest.raises(StageError, match="trained on series data but the prepared data is text"):
        run(trained["series"], tmp_path / "r", data=trained["text"] / "data")
    other = write_series_prepared(tmp_path / "three", channels=3)
    with pytest.raises(StageError, match="expects channels 2 but the prepared data has 3"):
        run(trained["series"], tmp_path / "r", data=other)
    assert not (tmp_path / "r").exists()
