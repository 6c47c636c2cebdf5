import json

import pytest
import torch

from pipeline.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.errors import StageError
from pipeline.evaluate import evaluate
from pipeline.models import ModelSpec, build_model
from pipeline.params import EvaluateParams, ModelParams, TrainParams
from pipeline.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_dir):
    out = tmp_path_factory.mktemp("trained")
    train(
        ModelParams(),
        TrainParams(epochs=3, batch_size=16, lr=3e-3, seed=1),
        prepared_dir,
        out / "checkpoint.pt",
        out / "live",
    )
    return out


def run(trained, prepared_dir, reports, checkpoint=None):
    return evaluate(
        EvaluateParams(batch_size=50),
        prepared_dir,
        checkpoint or trained / "checkpoint.pt",
        trained / "live",
        reports,
    )


def test_metrics_plots_and_figures(tmp_path, trained, prepared_dir):
    metrics = run(trained, prepared_dir, tmp_path / "reports")
    assert metrics["accuracy"] >= 0.9
    assert set(metrics) >= {"precision_macro", "recall_macro", "f1_macro", "log_loss"}
    assert set(metrics["per_class"]) == {"cat", "dog", "owl"}
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["test_size"] == 120
    saved = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert saved == metrics
    confusion = json.loads((tmp_path / "reports" / "confusion.json").read_text())
    assert len(confusion) == 120 and set(confusion[0]) == {"actual", "predicted"}
    correct = sum(r["actual"] == r["predicted"] for r in confusion)
    assert correct / 120 == pytest.approx(metrics["accuracy"], abs=1e-6)
    for png in ("confusion.png", "training_curves.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_of_another_architecture(tmp_path, trained, prepared_dir):
    good = load_checkpoint(trained / "checkpoint.pt")
    mlp = build_model(ModelSpec("mlp", good.spec.input_shape, 3))
    foreign = Checkpoint(
        spec=good.spec,
        class_names=good.class_names,
        mean=good.mean,
        std=good.std,
        state_dict={f"network.{k}": v for k, v in mlp.state_dict().items()},
    )
    save_checkpoint(foreign, tmp_path / "foreign.pt")
    with pytest.raises(StageError, match="does not fit architecture 'seed_cnn'"):
        run(trained, prepared_dir, tmp_path / "reports", tmp_path / "foreign.pt")
    assert not (tmp_path / "reports").exists()


def test_corrupt_and_foreign_checkpoint_files(tmp_path, trained, prepared_dir):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(StageError, match="cannot be read"):
        run(trained, prepared_dir, tmp_path / "r", tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(StageError, match="not a tensorferry checkpoint"):
        run(trained, prepared_dir, tmp_path / "r", tmp_path / "other.pt")
    with pytest.raises(StageError, match="not found; run the train stage"):
        run(trained, prepared_dir, tmp_path / "r", tmp_path / "absent.pt")


def test_checkpoint_for_other_data(tmp_path, trained, prepared_dir):
    good = load_checkpoint(trained / "checkpoint.pt")
    spec = ModelSpec("seed_cnn", (1, 24, 24), 3)
    other = Checkpoint(
        spec=spec,
        class_names=good.class_names,
        mean=good.mean,
        std=good.std,
        state_dict={},
    )
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(StageError, match=r"expects input \[1, 24, 24\]"):
        run(trained, prepared_dir, tmp_path / "r", tmp_path / "other.pt")
