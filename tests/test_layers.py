"""The package's layers: no import cycle between ``cmafnet`` subpackages (function-local imports count
too), and the benchmark sits above the trainer, never below it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import cmafnet

PACKAGE = Path(cmafnet.__file__).parent


def _unit(module: str) -> str | None:
    """``cmafnet.a.b`` -> ``a`` (a subpackage or top-level module of cmafnet)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "cmafnet" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    """Edges between cmafnet units from every ``import`` in every module (TYPE_CHECKING blocks excluded)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        me = _unit(module) or "cmafnet"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(n) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                unit = _unit(target)
                exists = unit and ((PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file())
                if exists and unit != me:
                    edges.setdefault(me, set()).add(unit)
    return edges


def _reaches(edges: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        u = todo.pop()
        if u == goal:
            return True
        if u not in seen:
            seen.add(u)
            todo.extend(edges.get(u, ()))
    return False


def test_no_import_cycle_between_subpackages() -> None:
    edges = import_graph()
    assert edges, "no imports found: the walker is broken"
    cycles = sorted(
        f"{a} -> {b} -> ... -> {a}" for a, bs in edges.items() for b in bs if _reaches(edges, b, a)
    )
    assert not cycles, cycles


@pytest.mark.parametrize(("lower", "upper"), [("training", "bench"), ("models", "run"), ("models", "training"),
                                              ("data", "training"), ("models", "data")])  # fmt: skip
def test_lower_layers_never_import_upper_ones(lower: str, upper: str) -> None:
    assert not _reaches(import_graph(), lower, upper), f"cmafnet.{lower} reaches cmafnet.{upper}"


def test_the_walker_sees_a_cycle(tmp_path, monkeypatch) -> None:
    """The check can fail: two modules importing each other are reported."""
    pkg = tmp_path / "cmafnet"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("def f():\n    from cmafnet.b import g\n")
    (pkg / "b" / "__init__.py").write_text("from cmafnet.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    edges = import_graph()
    assert edges == {"a": {"b"}, "b": {"a"}} and _reaches(edges, "a", "a")
