"""The shape the package keeps (issue 21): no function anywhere in clip_jax/ over 60 lines (a
function that long does several jobs; split it), no module over 600 lines except the data tables
named below (a module that long holds several jobs; split it by job), and training/loop.py short
enough to read in one screen or two."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "clip_jax")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
MAX_LOOP_LINES = 250
# Modules that are tables of data rather than code: their length is the data's.
DATA_TABLES = {"clip_jax/data/templates.py"}  # the prompt templates of every evaluation dataset


def _modules() -> list[str]:
    """Every .py file of the package, relative to the repository."""
    found = []
    for directory, _, files in os.walk(PACKAGE):
        found += [os.path.relpath(os.path.join(directory, name), REPO) for name in files if name.endswith(".py")]
    return sorted(path.replace(os.sep, "/") for path in found)


def _long_functions(path: str) -> list[str]:
    with open(os.path.join(REPO, path), encoding="utf-8") as file:
        tree = ast.parse(file.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Decorators and the docstring count: they are part of what a reader reads.
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def _line_count(path: str) -> int:
    with open(os.path.join(REPO, path), encoding="utf-8") as file:
        return len(file.read().splitlines())


def test_the_rules_read_the_whole_package():
    modules = _modules()
    # Guards against a walk that silently reads nothing (a moved package, a wrong root).
    assert "clip_jax/training/loop.py" in modules and "clip_jax/models/vit.py" in modules
    assert DATA_TABLES <= set(modules), f"a data table named here is gone: {sorted(DATA_TABLES - set(modules))}"


def test_no_function_in_the_package_is_over_60_lines():
    long = [found for path in _modules() for found in _long_functions(path)]
    assert long == [], "split these functions:\n" + "\n".join(long)


def test_no_module_in_the_package_is_over_600_lines():
    long = [
        f"{path} ({lines} lines)"
        for path in _modules()
        if path not in DATA_TABLES and (lines := _line_count(path)) > MAX_MODULE_LINES
    ]
    assert long == [], "split these modules by job:\n" + "\n".join(long)


def test_the_training_loop_module_stays_short():
    lines = _line_count("clip_jax/training/loop.py")
    assert lines <= MAX_LOOP_LINES, f"clip_jax/training/loop.py has {lines} lines"
