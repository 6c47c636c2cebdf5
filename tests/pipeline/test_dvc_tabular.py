"""End to end for tabular data: real DVC runs every stage in a temporary git repo, once on
a regression CSV (numeric and categorical columns, missing cells imputed) with the mlp,
and once with a user's own loader and model factory from a package in the repo; the
server then answers with the engine the pipeline built."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from tests.pipeline.tabular_fixtures import CATEGORICAL_COLUMNS, write_csv
from tests.pipeline.test_dvc_pipeline import copy_repository, sh
from tests.serving.serving_helpers import fetch, start_server

pytestmark = pytest.mark.slow

USER_LOADER = '''
import numpy as np

from pipeline.user_data import UserData


def load(path, options):
    """Two noisy rings: the class is the radius."""
    rng = np.random.default_rng(0)
    rows = options["rows"]
    angle = rng.uniform(0, 2 * np.pi, rows)
    label = np.arange(rows) % 2
    radius = 1.0 + 2.0 * label + rng.normal(0, 0.2, rows)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return UserData("classification", {"all": (x, label)}, class_names=("inner", "outer"),
                    feature_names=("u", "v"))
'''

USER_MODEL = """
from torch import nn

from pipeline.models import TabularPreprocess


def build(meta, options):
    preprocess = TabularPreprocess(meta.columns)
    return nn.Sequential(preprocess, nn.Linear(preprocess.out_features, options["hidden"]),
                         nn.Tanh(), nn.Linear(options["hidden"], meta.num_outputs))
"""

CASES = {
    "regression": {
        "data": {
            "source": "tabular",
            "path": "houses.csv",
            "label_column": "price",
            "task": "regression",
            "categorical_columns": list(CATEGORICAL_COLUMNS),
            "missing": "impute",
        },
        "model": {"name": "mlp", "hidden": [32, 16]},
        "train": {"epochs": 40, "batch_size": 16, "lr": 0.01},
    },
    "user": {
        "data": {"source": "userpkg.rings:load", "options": {"rows": 160}},
        "model": {"name": "userpkg.net:build", "options": {"hidden": 16}},
        "train": {"epochs": 30, "batch_size": 16, "lr": 0.01},
    },
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> its repo after `dvc repro`, each built once, on first use."""
    repos: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in repos:
            repos[case] = _reproduce(case, tmp_path_factory.mktemp(case))
        return repos[case]

    return get


def _reproduce(case: str, root: Path) -> Path:
    repo = copy_repository(root)
    write_csv(repo / "houses.csv", rows=200, task="regression", missing=6)
    (repo / "userpkg").mkdir()
    (repo / "userpkg" / "__init__.py").write_text("")
    (repo / "userpkg" / "rings.py").write_text(textwrap.dedent(USER_LOADER))
    (repo / "userpkg" / "net.py").write_text(textwrap.dedent(USER_MODEL))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, overrides in CASES[case].items():
        params[section].update(overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", f"tiny {case} params", cwd=repo)
    sh("dvc", "repro", cwd=repo)
    return repo


def reports(repo: Path, name: str) -> dict:
    return json.loads((repo / "reports" / f"{name}.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_stage_runs_and_reports(built, case):
    repo = built(case)
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}
    metrics, export, engine = (reports(repo, n) for n in ("metrics", "export", "engine"))
    assert {"fp32", "int8", "fp16"} <= set(export["variants"])
    if case == "user":
        assert metrics["accuracy"] >= 0.9  # two rings apart: a small net separates them
        assert export["parity"]["top1_agreement"] == 1.0
        assert engine["top1_agreement_fp32"] >= 0.95
        return
    assert metrics["r2"] > 0.5 and metrics["rmse"] > 0
    assert set(metrics) >= {"mse", "rmse", "mae", "r2", "test_size"}
    plots = repo / "reports" / "plots"
    for name in ("predictions.json", "predicted_vs_actual.png", "residuals.png"):
        assert (plots / name).stat().st_size > 0, name
    assert export["parity"]["max_abs_diff"] <= 1e-3
    assert engine["rmse"] == pytest.approx(metrics["rmse"], rel=0.05)


def test_the_checkpoint_records_the_user_factory(built):
    import torch

    repo = built("user")

    payload = torch.load(repo / "models" / "checkpoint.pt", weights_only=True)
    assert payload["model"]["name"] == "userpkg.net:build"
    assert payload["model"]["options"] == {"hidden": 16}
    assert payload["params"]["model"]["options"] == {"hidden": 16}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_served_engine_answers_as_onnxruntime(built, case):
    """/v1/predict takes named records; infer returns what onnxruntime computes."""
    import tritonclient.http as triton

    repo = built(case)
    engine = repo / "models" / "engine" / "model.optimized.onnx"
    with np.load(repo / "data" / "prepared" / "test.npz") as test:
        x = test["x"][:5]
    session = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    output = "prediction" if case == "regression" else "logits"
    expected = session.run([output], {"features": x})[0]
    server = start_server(engine)
    try:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        # The served name: a built-in model's name, or the factory's path made URL-safe.
        name = "mlp" if case == "regression" else "userpkg.net.build"
        request = triton.InferInput("features", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        answer = client.infer(name, [request]).as_numpy(output)
        np.testing.assert_allclose(answer, expected, rtol=1e-6, atol=1e-6)
        columns = _columns(engine)
        body = {"instances": [_record(row, columns) for row in x]}
        status, _, raw = fetch(
            server, "/v1/predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, raw
        predictions = json.loads(raw)["predictions"]
        if case == "regression":
            np.testing.assert_allclose(predictions, expected, rtol=1e-5)
            status, _, raw = fetch(server, "/v1/classify", json.dumps(body).encode())
            assert status == 404 and b"regression" in raw, raw
        else:
            assert [p["index"] for p in predictions] == expected.argmax(axis=1).tolist()
    finally:
        server.terminate()


def _columns(engine: Path) -> list[dict]:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(engine)).metadata_props}
    return json.loads(props["tensorferry.preprocessing"])["tabular"]["columns"]


def _record(row: np.ndarray, columns: list[dict]) -> dict:
    """A prepared row as a client sends it: named values, categories by name, NaN as null."""
    record = {}
    for value, column in zip(row.tolist(), columns, strict=True):
        if np.isnan(value):
            record[column["name"]] = None
        elif column["type"] == "categorical":
            code = int(value)
            record[column["name"]] = column["categories"][code] if code >= 0 else "unseen"
        else:
            record[column["name"]] = value
    return record


def test_a_missing_factory_at_evaluate_time_is_one_error(built):
    repo = built("user")
    moved = repo / "userpkg" / "net.py"
    moved.rename(repo / "net.py.away")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.evaluate", "--reports", "elsewhere"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
    finally:
        (repo / "net.py.away").rename(moved)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "userpkg.net:build" in lines[0], result.stderr
    assert "No module named 'userpkg.net'" in lines[0]
    assert not (repo / "elsewhere").exists()
