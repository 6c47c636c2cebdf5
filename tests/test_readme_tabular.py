"""The README's tabular commands, run exactly as it shows them, each a DVC experiment in a
temporary git repo: the bundled sets, a CSV (written here under the README's name), and
the worked examples of a user loader and a user model in examples/."""

import json
import shlex
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.pipeline.tabular_fixtures import write_csv
from tests.pipeline.test_dvc_pipeline import copy_repository, sh

pytestmark = pytest.mark.slow

SECTION = "### Tabular data, regression, and your own model and data"


def readme_commands() -> list[str]:
    """The section's first bash block, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "README.md").read_text().split(SECTION, 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repository(tmp_path_factory.mktemp("readme"))
    write_csv(repo / "houses.csv", rows=200, task="regression", missing=6)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "a fresh clone", cwd=repo)
    return repo


def run(repo: Path, command: str) -> dict:
    """Run one README command as on a fresh clone; `dvc exp run` applies the experiment's
    params and results to the workspace, so the params go back to the commit's first."""
    sh("git", "checkout", "--", "params.yaml", cwd=repo)
    sh(*shlex.split(command), cwd=repo)
    return {
        name: json.loads((repo / "reports" / f"{name}.json").read_text())
        for name in ("metrics", "export", "engine")
    }


def test_the_readme_lists_one_command_per_case():
    commands = readme_commands()
    assert len(commands) == 4 and all(c.startswith("dvc exp run ") for c in commands)


@pytest.mark.parametrize("index", range(4))
def test_each_readme_command_runs_every_stage(repo, index):
    command = readme_commands()[index]
    reports = run(repo, command)
    metrics, export = reports["metrics"], reports["export"]
    if "accuracy" in metrics:  # breast_cancer, and the user loader's digits
        assert metrics["accuracy"] >= 0.9, command
        assert export["parity"]["top1_agreement"] == 1.0
    else:  # diabetes and the CSV: regression
        assert metrics["r2"] > 0.3, command
        assert export["parity"]["max_abs_diff"] <= 1e-2
    assert {"fp32", "int8", "fp16"} <= set(export["variants"])
    if "examples.resmlp:build" in command:
        payload = torch.load(repo / "models" / "checkpoint.pt", weights_only=True)
        assert payload["model"]["name"] == "examples.resmlp:build"
        assert payload["model"]["options"] == {"blocks": 3}
