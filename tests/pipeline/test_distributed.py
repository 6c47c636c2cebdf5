"""torchrun with the gloo backend: two real CPU processes on loopback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import World, shard_batches
from pipeline.errors import StageError
from pipeline.params import ModelParams, TrainParams
from pipeline.train import train


def test_shards_cover_each_global_batch_evenly():
    order = torch.arange(11)
    shards = [shard_batches(order, 4, World(rank=r, size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    for step in range(3):
        merged = sorted(torch.cat([shards[0][step], shards[1][step]]).tolist())
        assert len(shards[0][step]) == len(shards[1][step]) > 0
        if step < 2:
            assert merged == sorted(order[4 * step : 4 * step + 4].tolist())
    assert sorted(torch.cat([b for s in shards for b in s]).tolist()) == sorted(
        list(range(11)) + [0]  # padded by wrapping around, like DistributedSampler
    )


def test_batch_size_must_split_across_processes():
    with pytest.raises(StageError, match="multiple of the 3 processes"):
        shard_batches(torch.arange(10), 8, World(rank=0, size=3))


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_single_process(tmp_path, prepared_dir):
    params = "train:\n  epochs: 2\n  batch_size: 16\n  augment: false\n  device: cpu\n"
    (tmp_path / "params.yaml").write_text(params)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline.train",
            "--data-dir",
            str(prepared_dir),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained seed_cnn") == 1  # rank 0 alone reports and writes
    logged = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert logged["step"] == 1 and 0.0 <= logged["val"]["acc"] <= 1.0

    # Same seed, same global batches, gradients averaged over equal shards: DDP must land
    # on the weights single-process training reaches, up to float summation order.
    single = tmp_path / "single"
    train(
        ModelParams(),
        TrainParams(epochs=2, batch_size=16, augment=False, device="cpu"),
        prepared_dir,
        single / "checkpoint.pt",
        single / "live",
    )
    ddp = load_checkpoint(tmp_path / "models" / "checkpoint.pt").state_dict
    reference = load_checkpoint(single / "checkpoint.pt").state_dict
    for name, tensor in reference.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-5)
    single_logged = json.loads((single / "live" / "metrics.json").read_text())
    assert logged["val"]["acc"] == pytest.approx(single_logged["val"]["acc"], abs=0.01)
