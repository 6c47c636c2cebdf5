"""dvc.yaml must list, for every stage, each project module its command can import.

DVC reruns a stage only when one of its deps changes. A helper the stage imports but does
not list (the batch order in pipeline/distributed.py, say) would leave `dvc repro` calling
stale results current, so the list is derived from the code here and compared both ways.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

PACKAGES = ("pipeline", "serving")


def module_file(module: str) -> Path | None:
    """The project file that defines ``module``, or None outside PACKAGES."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import onnx_tools` imports a module, not a name.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def transitive_files(module: str) -> set[str]:
    """Repository-relative project files that running ``module`` can execute.

    An empty ``__init__.py`` is left out: it cannot change a result until it has code.
    """
    seen: set[Path] = set()
    pending = [module]
    while pending:
        path = module_file(pending.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            pending += with_parents(name)
    return {
        str(path.relative_to(REPO_ROOT))
        for path in seen
        if path.name != "__init__.py" or path.read_text().strip()
    }


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"])
    assert match, f"unexpected stage command {stage['cmd']!r}"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_imports_is_a_dep(name: str) -> None:
    stage = stages()[name]
    needed = transitive_files(stage_module(stage))
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert sorted(needed - listed) == [], f"{name} imports these but dvc.yaml omits them"
    assert sorted(listed - needed) == [], f"{name} lists these in dvc.yaml but never imports them"


def test_the_import_walk_sees_lazy_and_package_imports() -> None:
    # engine imports onnxruntime-side helpers lazily inside functions; train reaches
    # distributed.py, which sets the batch order and hence the weights.
    assert "pipeline/distributed.py" in transitive_files("pipeline.train")
    assert "pipeline/onnx_tools.py" in transitive_files("pipeline.engine")
    assert "serving/contract.py" in transitive_files("pipeline.export")
    assert "pipeline/__init__.py" not in transitive_files("pipeline.train")  # empty
