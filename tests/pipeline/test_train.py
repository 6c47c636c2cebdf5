import json

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.params import ModelParams, TrainParams
from pipeline.train import build_optimizer, build_schedule, random_translate, train

QUICK = TrainParams(epochs=3, batch_size=16, lr=3e-3, augment=True, seed=3)


def run(tmp_path, prepared_dir, model=None, params=QUICK, tag="run"):
    model = model or ModelParams()
    history = train(
        model, params, prepared_dir, tmp_path / tag / "checkpoint.pt", tmp_path / tag / "live"
    )
    return history, tmp_path / tag


def test_training_learns_and_writes_a_weights_only_checkpoint(tmp_path, prepared_dir):
    history, out = run(tmp_path, prepared_dir)
    assert len(history) == 3
    assert history[-1].val_acc >= 0.9  # the bars are easy to tell apart
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["class_names"] == ["cat", "dog", "owl"]
    assert payload["model"]["name"] == "seed_cnn"
    assert payload["params"]["train"]["epochs"] == 3
    assert len(payload["normalization"]["mean"]) == 1
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.build().preprocess.mean.shape == (1, 1, 1, 1)


def test_dvclive_logs_every_epoch(tmp_path, prepared_dir):
    _, out = run(tmp_path, prepared_dir, params=TrainParams(epochs=2, batch_size=32))
    rows = (out / "live" / "plots" / "metrics" / "val" / "acc.tsv").read_text().splitlines()
    assert rows[0] == "step\tacc" and len(rows) == 3
    summary = json.loads((out / "live" / "metrics.json").read_text())
    assert set(summary) == {"train", "val", "step"}


def test_cpu_training_is_deterministic(tmp_path, prepared_dir):
    params = TrainParams(epochs=2, batch_size=16, augment=True, seed=5)
    first, out_a = run(tmp_path, prepared_dir, params=params, tag="a")
    second, out_b = run(tmp_path, prepared_dir, params=params, tag="b")
    assert [(h.train_loss, h.val_loss, h.val_acc) for h in first] == [
        (h.train_loss, h.val_loss, h.val_acc) for h in second
    ]
    a, b = load_checkpoint(out_a / "checkpoint.pt"), load_checkpoint(out_b / "checkpoint.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert (out_a / "live" / "metrics.json").read_bytes() == (
        out_b / "live" / "metrics.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("model", "params"),
    [
        (ModelParams(name="mlp", hidden=(32,)), TrainParams(epochs=1, optimizer="sgd", lr=0.05)),
        (
            ModelParams(name="resnet", width=4),
            TrainParams(epochs=1, optimizer="adamw", schedule="cosine", label_smoothing=0.1),
        ),
    ],
)
def test_other_models_and_optimizers_train(tmp_path, prepared_dir, model, params):
    history, out = run(tmp_path, prepared_dir, model=model, params=params)
    assert history[0].train_loss > 0
    assert load_checkpoint(out / "checkpoint.pt").spec.name == model.name


def test_random_translate_shifts_without_changing_content():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 3:5, 3:5] = 200
    shifted = random_translate(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and shifted.dtype == torch.uint8
    assert (shifted.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3))).all()  # a 2px shift keeps it in
    assert not torch.equal(shifted, x)


def test_cuda_request_without_gpu_is_clear(tmp_path, prepared_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from pipeline.errors import StageError

    with pytest.raises(StageError, match="no CUDA GPU"):
        run(tmp_path, prepared_dir, params=TrainParams(device="cuda"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_killed_training_leaves_no_output(tmp_path, prepared_dir):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 500\n  batch_size: 8\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--data-dir", str(prepared_dir)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".dvclive.*.tmp/dvclive/metrics.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "dvclive").exists()
    assert not (tmp_path / "models" / "checkpoint.pt").exists()
    # The next run sweeps the dead run's temporary directory away.
    train(
        ModelParams(), TrainParams(epochs=1), prepared_dir, tmp_path / "c.pt", tmp_path / "dvclive"
    )
    assert not list(tmp_path.glob(".dvclive.*.tmp"))
    assert (tmp_path / "dvclive" / "metrics.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", [ModelParams(), ModelParams(name="resnet", width=8)])
def test_trains_on_the_gpu_in_bf16_channels_last(tmp_path, prepared_dir, model):
    params = TrainParams(epochs=4, batch_size=16, lr=3e-3, device="auto")
    history, out = run(tmp_path, prepared_dir, model=model, params=params)
    assert history[-1].val_acc >= 0.9
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert all(t.device.type == "cpu" for t in checkpoint.state_dict.values())
    assert checkpoint.build().network is not None  # loads and rebuilds on a CPU-only reader


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_every_schedule_runs_any_number_of_steps(schedule):
    for total_steps in range(1, 50):  # tiny data sets make runs of a few steps
        model = torch.nn.Linear(2, 2)
        optimizer = build_optimizer(model, TrainParams())
        lr_schedule = build_schedule(optimizer, TrainParams(schedule=schedule), total_steps)
        for _ in range(total_steps):
            optimizer.step()
            lr_schedule.step()
