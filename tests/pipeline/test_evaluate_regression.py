import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import StageError
from pipeline.evaluate import evaluate
from pipeline.params import EvaluateParams, ModelParams, TrainParams
from pipeline.train import train
from tests.conftest import REPO_ROOT
from tests.pipeline.tabular_prepared import rename_column, write_tabular_prepared

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    data = write_tabular_prepared(root / "prepared", "regression", impute=True)
    train(
        ModelParams(name="mlp", hidden=(32,)),
        TrainParams(epochs=8, batch_size=32, lr=0.01),
        data,
        root / "checkpoint.pt",
        root / "dvclive",
    )
    return root


def run(trained, reports, data=None):  # noqa: ANN001
    data = data or trained / "prepared"
    params = EvaluateParams(batch_size=16)
    return evaluate(params, data, trained / "checkpoint.pt", trained / "dvclive", reports)


@pytest.fixture(scope="module")
def reports(trained):
    run(trained, trained / "reports")
    return trained / "reports"


def test_metrics_equal_sklearns_on_the_models_predictions(trained, reports):
    metrics = json.loads((reports / "metrics.json").read_text())
    test = np.load(trained / "prepared" / "test.npz")
    model = load_checkpoint(trained / "checkpoint.pt").build()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test["x"])).double().numpy()
    actual = test["y"].astype(np.float64)
    mse = mean_squared_error(actual, predicted)
    assert metrics == {
        "mse": pytest.approx(mse, abs=1e-6),
        "rmse": pytest.approx(np.sqrt(mse), abs=1e-6),
        "mae": pytest.approx(mean_absolute_error(actual, predicted), abs=1e-6),
        "r2": pytest.approx(r2_score(actual, predicted), abs=1e-6),
        "test_size": 60,
    }
    assert metrics["r2"] > 0.7
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON numbers


def test_plots_hold_the_predictions_and_the_figures(trained, reports):
    plots = reports / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [
        "predicted_vs_actual.png",
        "predictions.json",
        "residuals.png",
        "training_curves.png",
    ]
    rows = json.loads((plots / "predictions.json").read_text())
    y = np.load(trained / "prepared" / "test.npz")["y"]
    assert len(rows) == 60 and set(rows[0]) == {"actual", "predicted", "residual"}
    assert [r["actual"] for r in rows] == pytest.approx(y.tolist(), abs=1e-5)
    assert all(r["residual"] == pytest.approx(r["actual"] - r["predicted"], abs=2e-6) for r in rows)
    rmse = np.sqrt(np.mean([r["residual"] ** 2 for r in rows]))
    metrics = json.loads((reports / "metrics.json").read_text())
    assert rmse == pytest.approx(metrics["rmse"], abs=1e-4)
    for png in ("predicted_vs_actual.png", "residuals.png", "training_curves.png"):
        assert (plots / png).read_bytes()[:8] == PNG


def test_a_rerun_for_the_other_task_leaves_no_stale_plots(tmp_path, trained, reports):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "confusion.json").write_text("[]")
    run(trained, tmp_path)
    assert "confusion.json" not in {p.name for p in (tmp_path / "plots").iterdir()}


def test_checkpoint_for_another_task_or_other_columns(tmp_path, trained):
    other = write_tabular_prepared(tmp_path / "classification", "classification")
    with pytest.raises(StageError, match="trained for regression but the prepared data is a cl"):
        run(trained, tmp_path / "r", other)
    renamed = write_tabular_prepared(tmp_path / "renamed", "regression", impute=True)
    rename_column(renamed, "x2", "weight")
    with pytest.raises(
        StageError, match="expects numeric column 'x2' but the prepared data has numeric column"
    ):
        run(trained, tmp_path / "r", renamed)
    assert not (tmp_path / "r").exists()


def test_dvc_renders_the_regression_plots_and_skips_the_classification_ones(tmp_path, reports):
    """dvc.yaml lists both tasks' plots; the files a regression run lacks are skipped."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(reports, repo / "reports")
    shutil.copytree(reports.parent / "dvclive", repo / "dvclive")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
    shown = subprocess.run(
        [*dvc, "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert set(report["data"]) >= {
        "Training curves (loss)",
        "Training curves (RMSE)",
        "Predicted vs actual (test split)",
        "Residuals (test split)",
        "reports/plots/predicted_vs_actual.png",
        "reports/plots/residuals.png",
        "reports/plots/training_curves.png",
    }
    missing = {error["source"] for error in report.get("errors", [])}
    assert missing == {
        "dvclive/plots/metrics/train/acc.tsv",
        "dvclive/plots/metrics/val/acc.tsv",
        "reports/plots/confusion.json",
        "reports/plots/confusion.png",
    }
