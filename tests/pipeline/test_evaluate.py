import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.dataset import load_meta
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
    plots = tmp_path / "reports" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [
        "confusion.json",
        "confusion.png",
        "training_curves.png",
    ]
    confusion = json.loads((plots / "confusion.json").read_text())
    assert len(confusion) == 120 and set(confusion[0]) == {"actual", "predicted"}
    correct = sum(r["actual"] == r["predicted"] for r in confusion)
    assert correct / 120 == pytest.approx(metrics["accuracy"], abs=1e-6)
    for png in ("confusion.png", "training_curves.png"):
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_checkpoint_from_before_meta_and_batch_norm_still_evaluates(tmp_path, prepared_dir):
    """The payload an older save_checkpoint wrote: no meta, a spec without task,
    batch_norm and options, and an mlp of Linear/ReLU layers only."""
    class_names = load_meta(prepared_dir).class_names
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(400, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    state = {f"network.net.{k}": v for k, v in net.state_dict().items()}
    state |= {
        "preprocess.mean": torch.full((1, 1, 1, 1), 0.3),
        "preprocess.std": torch.ones(1, 1, 1, 1),
    }
    spec = {"name": "mlp", "input_shape": [1, 20, 20], "num_classes": 3, "width": 32}
    spec |= {"hidden": [16], "kind": "image", "vocab_size": 0, "layers": 2}
    spec |= {"bidirectional": True, "dropout": 0.1, "heads": 4}
    payload = {
        "format": "tensorferry-checkpoint/1",
        "model": spec,
        "class_names": list(class_names),
        "normalization": {"mean": [0.3], "std": [1.0]},
        "state_dict": state,
        "data_fingerprint": "",
        "params": {},
        "params_hash": "",
    }
    torch.save(payload, tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint.meta is None and checkpoint.data_meta().kind == "image"
    live = tmp_path / "live"
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            (live / "plots" / "metrics" / split).mkdir(parents=True, exist_ok=True)
            (live / "plots" / "metrics" / split / f"{metric}.tsv").write_text(
                f"step\t{metric}\n0\t0.5\n"
            )
    metrics = evaluate(EvaluateParams(), prepared_dir, tmp_path / "old.pt", live, tmp_path / "r")
    assert metrics["test_size"] == 120
    with torch.no_grad():
        pixels = torch.from_numpy(np.load(prepared_dir / "test.npz")["x"][:4])
        expected = net((pixels.float() / 255 - 0.3) / 1.0)
    assert torch.allclose(checkpoint.build()(pixels), expected, atol=1e-5)
