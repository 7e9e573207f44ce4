"""The habits that keep the code readable, checked on every run: no function
longer than 60 lines (ruff checks complexity and pyflakes/bugbear in .ci/run)."""
from __future__ import annotations

import ast

from conftest import ROOT

MAX_FUNCTION_LINES = 60


def _python_files():
    for folder in (ROOT, ROOT / "tests"):
        yield from sorted(folder.glob("*.py"))


def test_no_function_longer_than_60_lines():
    long = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_no_module_outside_the_project_is_cited():
    # the design notes live in ARCHITECTURE.md and README.md, inside the repository
    missing_doc = "MODNET" + ".md"  # spelled apart so this file does not cite it either
    for path in _python_files():
        assert missing_doc not in path.read_text(), path
