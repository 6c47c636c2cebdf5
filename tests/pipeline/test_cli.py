import shutil
import subprocess
import sys

import typer
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO_ROOT, run_prepare


def test_every_stage_is_a_subcommand_with_help():
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"])
    assert listing.exit_code == 0
    for stage in ("prepare", "train", "evaluate", "export", "build-engine"):
        assert stage in listing.output
        assert runner.invoke(app, [stage, "--help"]).exit_code == 0
    assert "--variant" in runner.invoke(app, ["export", "--help"]).output


def test_every_cli_option_has_help():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        undocumented = [p.name for p in command.params if p.name != "help" and not p.help]
        assert not undocumented, f"tensorferry {name}: options without help: {undocumented}"


def test_prepare_via_cli_writes_the_data(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  max_per_class: 3\n")
    result = CliRunner().invoke(
        app, ["prepare", "--params", str(params), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "prepared 10 classes" in result.output
    assert (tmp_path / "out" / "meta.json").is_file()


def test_prepare_without_a_params_file_does_what_dvc_repro_does(tmp_path):
    """No params.yaml in the working directory: the built-in defaults, which are the repo's."""
    with_file, without = tmp_path / "with", tmp_path / "without"
    for cwd in (with_file, without):
        cwd.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", with_file / "params.yaml")
    for cwd in (with_file, without):
        subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=cwd, check=True)
    meta = "data/prepared/meta.json"
    assert (with_file / meta).read_bytes() == (without / meta).read_bytes()


def test_bad_params_give_one_line_and_exit_1(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: mnist\n")
    out = tmp_path / "out"
    result = run_prepare(params, out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params: data.source must be one of 'digits', 'cifar10', 'imagefolder', 'text', "
        "'series', 'tabular' or 'package.module:loader', got 'mnist'"
    ]
    assert not out.exists()


def test_missing_inputs_give_one_line_and_exit_1(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none' / 'meta.json'} not found; run the prepare stage first"
    ]
