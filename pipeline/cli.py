"""`tensorferry`: one sub-command per pipeline stage, the same functions DVC runs."""

from __future__ import annotations

import typer

from pipeline import engine, evaluate, export, prepare, train

app = typer.Typer(
    name="tensorferry",
    help="Prepare data, train, evaluate, export and build engines (the stages in dvc.yaml).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("prepare")(prepare.command)
app.command("train")(train.command)
app.command("evaluate")(evaluate.command)
app.command("export")(export.command)
app.command("build-engine")(engine.command)
