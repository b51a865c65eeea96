"""The package's layering rules, checked on the source: the training loops stay small, lower layers never
import the loops, and no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "opd_megatron"
LOWER_LAYERS = ("mopd", "teachers", "losses", "rollout", "models", "data", "tokenization", "distributed")


def _modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_train_modules_and_functions_stay_small():
    too_long = []
    for path in _modules("train"):
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_import_the_loops(layer):
    upward = [
        f"{path.relative_to(PKG)}:{line} imports {name}"
        for path in _modules(layer)
        for line, name in _imported_modules(ast.parse(path.read_text()))
        if name.startswith(("opd_megatron.train", "opd_megatron.recipes", "opd_megatron.cli"))
    ]
    assert not upward, upward


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opd_megatron"):
                found += [
                    f"{path.relative_to(PKG)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, found


def test_no_call_of_another_project_modules_private_function():
    """``module._name(...)`` where ``module`` is one of the project's imported modules."""
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        local_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                local_modules |= {
                    (a.asname or a.name) for a in node.names if a.name.startswith("opd_megatron")
                }
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opd_megatron"):
                local_modules |= {(a.asname or a.name) for a in node.names}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in local_modules
                and node.func.attr.startswith("_")
                and not node.func.attr.startswith("__")
            ):
                found.append(f"{path.relative_to(PKG)}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not found, found
