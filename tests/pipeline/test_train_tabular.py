import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.checkpoint import load_checkpoint
from pipeline.dataset import load_meta, load_split
from pipeline.distributed import World
from pipeline.errors import StageError
from pipeline.models import TabularModel
from pipeline.params import ModelParams, TrainParams
from pipeline.train import Objective, epoch_batches, train
from tests.pipeline.tabular_prepared import write_tabular_prepared

MLP = ModelParams(name="mlp", hidden=(32, 16), dropout=0.0)
QUICK = TrainParams(epochs=12, batch_size=32, lr=0.01, seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    return {
        "regression": write_tabular_prepared(root / "regression", "regression", impute=True),
        "classification": write_tabular_prepared(root / "classification", "classification"),
    }


def run(tmp_path, data_dir, model=MLP, params=QUICK, tag="run"):
    out = tmp_path / tag
    return train(model, params, data_dir, out / "checkpoint.pt", out / "live"), out


def test_regression_learns_logs_rmse_and_checkpoints_its_meta(tmp_path, prepared):
    history, out = run(tmp_path, prepared["regression"])
    meta = load_meta(prepared["regression"])
    last = history[-1]
    assert last.train_acc is None and last.val_acc is None
    # Predicting the mean scores the target's sd (7.2); the imputed x1 cells (about 6
    # points of error each on 15% of the rows) keep it above the noise's 0.5.
    assert last.val_rmse < 0.5 * meta.target_std
    assert last.val_rmse < history[0].val_rmse
    metrics = out / "live" / "plots" / "metrics"
    assert sorted(p.name for p in (metrics / "val").iterdir()) == ["loss.tsv", "rmse.tsv"]
    assert json.loads((out / "live" / "metrics.json").read_text())["val"].keys() == {
        "loss",
        "rmse",
    }
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.meta == meta and checkpoint.spec.task == "regression"
    model = checkpoint.build()
    val = load_split("val", prepared["regression"], meta)
    with torch.no_grad():
        predicted = model(torch.from_numpy(val.x)).double().numpy()
    assert predicted.shape == (len(val.y),)
    rmse = math.sqrt(float(np.mean((predicted - val.y) ** 2)))
    assert rmse == pytest.approx(last.val_rmse, rel=1e-5)


def test_tabular_classification_learns_and_logs_accuracy(tmp_path, prepared):
    history, out = run(tmp_path, prepared["classification"], ModelParams(name="mlp", hidden=(32,)))
    assert history[-1].val_acc >= 0.85 and history[-1].val_rmse is None
    model = load_checkpoint(out / "checkpoint.pt").build()
    assert isinstance(model, TabularModel)
    assert (out / "live" / "plots" / "metrics" / "train" / "acc.tsv").is_file()


def test_huber_trains_and_a_lone_last_row_joins_the_batch_before(tmp_path, prepared):
    # 160 train rows in batches of 53: the last has one row, too few for batch norm.
    params = TrainParams(epochs=1, batch_size=53, loss="huber", seed=1)
    history, _ = run(tmp_path, prepared["regression"], ModelParams(name="mlp", hidden=(8,)), params)
    assert history[0].train_rmse > 0


def test_epoch_batches_merge_only_a_single_trailing_row():
    sizes = {n: [len(b) for b in epoch_batches(torch.arange(n), 16, World())] for n in (1, 32, 33)}
    assert sizes == {1: [1], 32: [16, 16], 33: [16, 17]}


@pytest.mark.parametrize(
    ("task", "params", "message"),
    [
        ("regression", TrainParams(loss="cross_entropy"), "train.loss cross_entropy is a clas"),
        ("classification", TrainParams(loss="mse"), "train.loss mse is a regression loss"),
        ("classification", TrainParams(loss="huber"), "set it to auto or cross_entropy"),
        ("regression", TrainParams(label_smoothing=0.1), "label_smoothing 0.1 applies to clas"),
    ],
)
def test_a_loss_of_the_other_task_is_one_clear_error(tmp_path, prepared, task, params, message):
    with pytest.raises(StageError, match=message):
        run(tmp_path, prepared[task], params=params)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_regression_losses_are_on_the_standardised_target():
    pred, y = torch.tensor([110.0, 90.0, 130.0]), torch.tensor([100.0, 100.0, 100.0])
    mse = Objective("mse", target_mean=100.0, target_std=10.0)
    assert float(mse(pred, y)) == pytest.approx((1 + 1 + 9) / 3)
    huber = Objective("huber", target_mean=100.0, target_std=10.0)
    assert float(huber(pred, y)) == pytest.approx(float(F.huber_loss(pred / 10, y / 10)))
    assert float(huber(pred, y)) == pytest.approx((0.5 + 0.5 + 2.5) / 3)  # delta 1 sd
    assert mse.score(mse.score_sum(pred, y), 3) == pytest.approx(math.sqrt(1100 / 3))


def test_tabular_training_is_deterministic_on_cpu(tmp_path, prepared):
    model = ModelParams(name="mlp", hidden=(16, 16), dropout=0.2, batch_norm=True)
    params = TrainParams(epochs=2, batch_size=16, seed=7, device="cpu")
    first, out_a = run(tmp_path, prepared["regression"], model, params, "a")
    second, out_b = run(tmp_path, prepared["regression"], model, params, "b")
    assert [(h.train_loss, h.val_rmse) for h in first] == [
        (h.train_loss, h.val_rmse) for h in second
    ]
    a, b = load_checkpoint(out_a / "checkpoint.pt"), load_checkpoint(out_b / "checkpoint.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("name", ["seed_cnn", "transformer"])
def test_image_and_sequence_models_on_tabular_data_are_one_clear_error(tmp_path, prepared, name):
    with pytest.raises(StageError, match=f"model '{name}' is an? .* tabular; set model.name"):
        run(tmp_path, prepared["classification"], ModelParams(name=name))
