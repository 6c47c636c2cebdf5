"""Atomic writes and provenance helpers shared by the stages.

Every output is written next to its final path and renamed into place, so a stage that
is killed midway leaves nothing that DVC could mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it over ``final`` on success.

    Works for files and directories: the caller creates whatever it needs at the
    yielded path. On any exception the temporary path is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A run killed with SIGKILL never reaches the cleanup below; sweep its leftovers.
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        _replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_metrics(path: Path, report: dict[str, Any]) -> None:
    """Write a DVC metrics file without its wall-clock figures (top-level ``*_seconds``).

    Metrics must be byte-identical across reruns of the same inputs (`dvc repro -f` twice,
    `dvc metrics diff` between identical runs); timings stay in the returned report and
    the stage's log line.
    """
    write_json(path, {k: v for k, v in report.items() if not k.endswith("_seconds")})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of resolved params (for provenance in artifacts)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def git_revision() -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or "" outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"{rev}-dirty" if dirty else rev
