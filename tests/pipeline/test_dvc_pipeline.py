"""End to end: the real repository, copied into a fresh git repo, run by real DVC."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# Small enough to run in seconds, big enough that every stage does real work.
TINY = {
    "data": {"max_per_class": 20, "image_size": 20},
    "train": {"epochs": 2, "batch_size": 32},
    "export": {"max_accuracy_drop": 100.0},
}


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def copy_repository(dest: Path) -> Path:
    files = sh(
        "git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT
    ).stdout.split()
    for name in files:
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest


def shrink_params(repo: Path) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, overrides in TINY.items():
        if section in params:
            params[section].update(overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repository(tmp_path_factory.mktemp("repo"))
    shrink_params(repo)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "tiny params", cwd=repo)
    sh("dvc", "repro", cwd=repo)
    return repo


def test_repro_produces_metrics_and_a_clean_status(repo):
    status = sh("dvc", "status", "--json", cwd=repo).stdout
    assert json.loads(status) == {}
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    workspace = shown[""]["data"]
    accuracy = workspace["reports/metrics.json"]["data"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert "val" in workspace["dvclive/metrics.json"]["data"]


def test_a_changed_helper_makes_the_stages_that_import_it_stale(repo):
    helper = repo / "pipeline" / "distributed.py"  # sets the batch order, hence the weights
    original = helper.read_text()
    helper.write_text(original + "\n# changed\n")
    try:
        stale = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    finally:
        helper.write_text(original)
    assert set(stale) == {"train", "evaluate"}  # evaluate imports pipeline.train
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}


def test_plots_render_offline(repo):
    assert sorted(p.name for p in (repo / "reports" / "plots").iterdir()) == [
        "confusion.json",
        "confusion.png",
        "training_curves.png",
    ]
    sh("dvc", "plots", "show", "-o", "plots_out", cwd=repo)
    page = (repo / "plots_out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
    assert page.count("vegaEmbed(") >= 3  # loss, accuracy, confusion matrix
    assert "vega-lite" in page  # the inlined library
    assert "static/workspace_reports_plots_training_curves.png" in page
    # dvc.yaml lists the regression plots too; a classification run skips them.
    shown = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo).stdout)
    assert {"Training curves (accuracy)", "reports/plots/confusion.json"} <= set(shown["data"])
    assert {error["source"] for error in shown["errors"]} == {
        "dvclive/plots/metrics/train/rmse.tsv",
        "dvclive/plots/metrics/val/rmse.tsv",
        "reports/plots/predictions.json",
        "reports/plots/predicted_vs_actual.png",
        "reports/plots/residuals.png",
    }


def test_forced_rerun_gives_byte_identical_metrics(repo):
    metrics = ["reports/metrics.json", "reports/export.json", "reports/engine.json"]
    metrics.append("dvclive/metrics.json")
    before = {name: (repo / name).read_bytes() for name in metrics}
    sh("dvc", "repro", "-f", cwd=repo)
    assert {name: (repo / name).read_bytes() for name in metrics} == before
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}


def test_outputs_round_trip_through_a_remote(repo, tmp_path):
    sh("dvc", "remote", "add", "--local", "-d", "shelf", str(tmp_path / "remote"), cwd=repo)
    sh("dvc", "push", cwd=repo)
    checkpoint = (repo / "models" / "checkpoint.pt").read_bytes()
    shutil.rmtree(repo / "models")
    shutil.rmtree(repo / "data" / "prepared")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh("dvc", "pull", cwd=repo)
    assert (repo / "models" / "checkpoint.pt").read_bytes() == checkpoint
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}


def test_experiment_with_a_changed_param(repo):
    sh("git", "add", "dvc.lock", cwd=repo)
    sh("git", "commit", "-qm", "baseline results", cwd=repo)
    sh("dvc", "exp", "run", "-S", "train.epochs=1", cwd=repo)
    diff = json.loads(sh("dvc", "params", "diff", "--json", cwd=repo).stdout)
    assert diff["params.yaml"]["train.epochs"] == {"old": 2, "new": 1, "diff": -1}
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    baseline = next(row for row in shown if row["rev"] != "workspace")
    assert len(baseline["experiments"]) == 1
    logged = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert logged["step"] == 0  # one epoch


def test_bad_param_fails_the_stage_and_caches_nothing(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "mnist"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = sh("dvc", "repro", cwd=repo, check=False)
    assert result.returncode != 0
    assert "error: params: data.source must be one of" in result.stdout + result.stderr
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)  # still stale
    sh("git", "checkout", "params.yaml", cwd=repo)


def test_killed_stage_leaves_nothing_and_the_next_repro_recovers(repo):
    import signal
    import time

    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["epochs"] = 500
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not list(repo.glob(".dvclive.*.tmp/dvclive/metrics.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs, mid-epoch
    proc.wait()
    assert not (repo / "models" / "checkpoint.pt").exists()  # DVC cleared it; nothing half-made
    assert not (repo / "dvclive").exists()
    (repo / "params.yaml").write_text(original)
    sh("dvc", "repro", cwd=repo)
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}
    assert not list(repo.glob(".dvclive.*.tmp"))
