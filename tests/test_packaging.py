"""Packaging: every package listed, no generic top-level names installed, layering of imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIR = PYPROJECT["tool"]["setuptools"]["package-dir"]
#: Dependency order: a package may import only itself and the packages before it.
LAYERS = ("core", "spaces", "pruning", "objectives", "storage", "search", "cli")


def _folder_packages() -> set[str]:
    found = set()
    for package, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(base).parts
            found.add(".".join((package, *relative)))
    return found


def test_package_dir_maps_every_layer():
    assert set(PACKAGE_DIR) == {f"sparsealloc.{layer}" for layer in LAYERS}
    assert all(PACKAGE_DIR[f"sparsealloc.{layer}"] == layer for layer in LAYERS)


def test_packages_list_matches_the_tree():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = _folder_packages()
    assert listed == found, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_no_generic_top_level_names(tmp_path):
    names = ["search", "storage", "spaces", "objectives", "pruning", "core", "cli"]
    code = (
        "import importlib.util, json; "
        f"print(json.dumps({{n: importlib.util.find_spec(n) is None for n in {names!r}}})); "
        "print(importlib.util.find_spec('sparsealloc.core') is not None)"
    )
    # a fresh interpreter outside the repository (-P: no script directory on sys.path)
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    absent, has_package = result.stdout.strip().splitlines()
    assert all(json.loads(absent).values()), absent
    assert has_package == "True"


def _module_name(node: ast.expr) -> str | None:
    """The constant (or constant-prefix of an f-string) module name passed to import_module."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _imported_layers(source: str, package: list[str]) -> set[tuple[str, int]]:
    """(layer, line) of every sparsealloc layer imported by ``source``, a module of ``package``.

    Covers ``import x``, ``from x import y``, relative imports and ``importlib.import_module("x")``.
    """
    out = set()
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parent = [*base, *([node.module] if node.module else [])]
            modules = [".".join([*parent, alias.name]) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and _module_name(node.args[0]) is not None:
                modules = [_module_name(node.args[0])]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "sparsealloc" and len(parts) > 1:
                out.add((parts[1], node.lineno))
            elif parts[0] in LAYERS:  # a generic top-level name: never valid
                out.add((f"top-level {parts[0]!r}", node.lineno))
    return out


def _package_of(path: Path, layer: str) -> list[str]:
    return ["sparsealloc", layer, *path.parent.relative_to(ROOT / layer).parts]


@pytest.mark.parametrize("layer", LAYERS)
def test_layering(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    files = sorted(p for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python files under {layer}/"
    violations = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for imported, line in _imported_layers(source, _package_of(path, layer)):
            if imported not in allowed:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not violations, f"{layer} may import only {sorted(allowed)}:\n" + "\n".join(sorted(violations))


def test_layering_checker_sees_every_kind_of_import():
    source = """
import sparsealloc.storage.db
from sparsealloc.search import samplers
from ... import objectives
from ...spaces.budget import x
from .. import sibling
import importlib
importlib.import_module("sparsealloc.cli.main")
importlib.import_module(f"sparsealloc.pruning.{name}")
import search
import numpy, torch.nn
"""
    found = {name for name, _ in _imported_layers(source, ["sparsealloc", "core", "sub"])}
    assert found == {"storage", "search", "objectives", "spaces", "core", "cli", "pruning", "top-level 'search'"}
    main = (ROOT / "cli" / "main.py").read_text(encoding="utf-8")
    assert {"core", "cli"} <= {name for name, _ in _imported_layers(main, ["sparsealloc", "cli"])}
