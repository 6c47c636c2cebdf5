"""Readers for the deployment files (Dockerfiles, .dockerignore, manifests) and a server
started the way the images start it: through deploy/docker/entrypoint.py."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.py"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

# tests/serving has no package marker: its helpers are importable once its folder is on the path.
sys.path.insert(0, str(REPO / "tests" / "serving"))
_serving_helpers = importlib.import_module("serving_helpers")
ServerProcess = _serving_helpers.ServerProcess


# Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # the rest, continuation lines joined

    def exec_form(self) -> list[str]:
        """ENTRYPOINT/CMD/... in JSON (exec) form, after any --options."""
        return json.loads(self.value[self.value.index("[") :])


def parse_dockerfile(path: Path) -> list[Instruction]:
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by FROM, each stage starting with its FROM."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (the only ENV form our Dockerfiles use)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for pair in ins.value.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Build-context paths that COPY instructions read (COPY --from reads a stage instead)."""
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and "--from" not in ins.value:
            *srcs, _dest = ins.value.split()
            sources += [s.rstrip("/") for s in srcs if not s.startswith("--")]
    return sources


# .dockerignore (moby's rules: patterns in order, the last match wins, a match on a
# parent directory applies to everything under it)


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").rstrip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        tail = pattern[3:]
        return any(fnmatch.fnmatchcase(p, tail) for p in parts)
    return any(
        fnmatch.fnmatchcase(prefix, pattern) and prefix.count("/") == pattern.count("/")
        for prefix in prefixes
    )


def dockerignored(path: str) -> bool:
    excluded = False
    for negate, pattern in dockerignore_patterns():
        if _matches(pattern, path):
            excluded = not negate
    return excluded


# The entrypoint


def load_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tensorferry_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_entrypoint(
    python: str, entrypoint: Path, args: list[str], env: dict[str, str], cwd: Path
) -> ServerProcess:
    """``python entrypoint.py ARGS`` (as the images run it) on an ephemeral port, until ready."""
    return _serving_helpers.launch([python, str(entrypoint), *args], cwd, env, wait_s=60)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def infer_json(url: str, model: str, images: Any) -> dict[str, Any]:
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.flatten().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
