"""The shape the training and data code keeps: no function in clip_jax/training/ or clip_jax/data/
over 60 lines (a function that long does several jobs; split it), and training/loop.py short
enough to read in one screen or two."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60
MAX_LOOP_LINES = 250


def _long_functions(directory: str) -> list[str]:
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # Decorators and the docstring count: they are part of what a reader reads.
                first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_training_or_data_is_over_60_lines():
    long = [
        *_long_functions(os.path.join(REPO, "clip_jax", "training")),
        *_long_functions(os.path.join(REPO, "clip_jax", "data")),
    ]
    assert long == [], "split these functions:\n" + "\n".join(long)


def test_the_training_loop_module_stays_short():
    with open(os.path.join(REPO, "clip_jax", "training", "loop.py"), encoding="utf-8") as file:
        lines = len(file.read().splitlines())
    assert lines <= MAX_LOOP_LINES, f"clip_jax/training/loop.py has {lines} lines"
