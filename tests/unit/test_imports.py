"""Imports point down (DESIGN §2), read from the source of every module, including imports inside functions.

Layers, each allowed to import only those listed (besides itself, the standard library and third parties):

* ``medsilo.errors``, ``medsilo.fs`` (atomic files), ``medsilo.config`` — leaves (the config layer learns algorithm and backbone names through
  :mod:`medsilo.config.registry`, which their owners fill);
* ``secure`` → config; ``medical`` → config, and ``secure`` only for DP (``secure.dp``, ``secure.budget``);
* ``components`` → secure, medical; ``jobs`` → components and below; ``provisioning`` → secure;
* the CLI (``medsilo.cli``, ``medsilo.report``, ``medsilo.audit_report``, ``medsilo.stats``) → anything shipped;
* nothing shipped imports ``tests`` or ``benchmarks``; benchmarks never import tests.

NVFlare: algorithm modules and ``medical`` never import it; ``secure`` only its client-side filter API
(``nvflare.apis``), never server code.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = {"medsilo", "errors", "fs"}  # the package root (its version), error types, atomic files: every layer
ALLOWED: dict[str, set[str]] = {
    "errors": {"medsilo"},
    "fs": {"medsilo", "errors"},
    "config": BASE,
    "secure": BASE | {"config"},
    "medical": BASE | {"config", "secure.dp", "secure.budget"},
    "components": BASE | {"config", "secure", "medical"},
    "jobs": BASE | {"config", "secure", "medical", "components"},
    "provisioning": BASE | {"config", "secure"},
    "cli": BASE | {"config", "secure", "medical", "components", "jobs", "provisioning", "cli"},
    "benchmarks": BASE | {"config", "secure", "medical", "components", "jobs", "provisioning", "cli"},
}
"""Layer → what it may import (a name with a dot allows that module only)."""


def _layer(path: Path) -> str | None:
    """The layer of a source file (relative to the repository root), or ``None`` for tests."""
    top = path.parts[0]
    if top == "medsilo":
        name = path.parts[1]
        return {"config": "config", "errors.py": "errors", "fs.py": "fs", "__init__.py": "medsilo"}.get(name, "cli")
    return None if top == "tests" else top


def _target(module: str) -> str | None:
    """The layer (or ``layer.module``) an absolute import of ``module`` reaches; ``None`` outside medsilo and
    the checkout's ``tests`` and ``benchmarks``."""
    parts = module.split(".")
    if parts[0] in ("tests", "benchmarks"):  # top-level folders of a checkout, not in the wheel
        return parts[0]
    if parts[0] != "medsilo":
        return None
    if len(parts) == 1:
        return "medsilo"
    head = parts[1]
    if head in ("cli", "report", "audit_report", "stats", "__main__"):
        return "cli"
    if head.startswith("__"):  # the package's own attributes (``__version__``)
        return "medsilo"
    return head if len(parts) == 2 else f"{head}.{parts[2]}"


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import; ``from a.b import c`` gives ``a.b.c`` (``c`` may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def _sources() -> dict[Path, str]:
    folders = ["medsilo", "components", "secure", "medical", "jobs", "provisioning", "benchmarks"]
    files = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                   if "work" not in p.relative_to(ROOT).parts)  # benchmarks/work: runs' scratch  # fmt: skip
    return {p.relative_to(ROOT): p.read_text() for p in files}


def _violations(sources: dict[Path, str]) -> list[str]:
    problems = []
    for path, text in sources.items():
        layer = _layer(path)
        tree = ast.parse(text, filename=str(path))
        algorithm = path.parts[:2] == ("components", "algorithms")
        for line, module in _imports(tree):
            where = f"{path}:{line}: {module}"
            if module.startswith("nvflare") and (algorithm or layer == "medical" or
                                                 (layer == "secure" and not module.startswith("nvflare.apis"))):  # fmt: skip
                problems.append(f"{where} (NVFlare in {'an algorithm' if algorithm else layer})")
            target = _target(module)
            if target is None or layer in (None, "medsilo") or target.split(".")[0] == layer:
                continue
            if target.split(".")[0] in ("tests", "benchmarks"):
                problems.append(f"{where} (shipped code and benchmarks never import {target.split('.')[0]})")
                continue
            allowed = ALLOWED[layer]
            if target.split(".")[0] not in allowed and target not in allowed:
                problems.append(f"{where} ({layer} may not import {target})")
    return problems


def test_imports_point_down():
    sources = _sources()
    assert len(sources) > 100 and Path("components/executor.py") in sources  # the check reads the real tree
    assert _violations(sources) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from medsilo.components.algorithms import ALGORITHMS\n", "config may not import components"),
    ("import tests.helpers\n", "never import tests"),
    ("from benchmarks.runner import WORK\n", "never import benchmarks"),
    ("def f():\n    from nvflare.app_common.workflows.model_controller import ModelController\n", "NVFlare in secure"),
])  # fmt: skip
def test_the_check_sees_an_upward_import_even_inside_a_function(source, expected):
    folder = {"config": "medsilo/config", "never": "medsilo/config", "NVFlare": "secure"}[expected.split()[0]]
    if expected == "never import benchmarks":
        folder = "components"
    found = _violations({Path(folder) / "probe.py": source})
    assert len(found) == 1 and expected in found[0] and found[0].startswith(f"{folder}/probe.py:")



def test_tests_and_benchmarks_stay_out_of_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(setup["packages"]) | set(setup["package-dir"])
    assert "medsilo.components" in shipped  # read the real table
    assert not [p for p in shipped if p.split(".")[1:2] in (["tests"], ["benchmarks"])]
    assert not [d for d in setup["package-dir"].values() if d.split("/")[0] in ("tests", "benchmarks")]
