"""The habits that keep the code readable, checked on every run (ruff checks complexity,
pyflakes and bugbear in .ci/run): short functions, short modules, few files at the root,
no import cycles in the package, and the torch-free modules importable without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = "modnet_npu"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
MAX_ROOT_PYTHON_FILES = 12  # the command lines and the brief's modules; the rest lives in the package

# Modules that must import without torch (small tools, and code that must run before torch loads).
# The one list: add a module here when it becomes part of that contract.
TORCH_FREE = (
    PACKAGE,
    f"{PACKAGE}.errors",
    f"{PACKAGE}.cli",
    f"{PACKAGE}.runtime.process_setup",  # sets OpenMP's spin bound, which only counts before torch loads
    # the ONNX Runtime and OpenVINO paths, which start without torch (import torch alone takes seconds):
    # options, the device facts (--backend auto decides without torch on a machine without an accelerator),
    # the engines and the torch-free model check, the matting API and its jobs, the Ray driver, the service,
    # and the two command lines that run them
    f"{PACKAGE}.runtime.options",
    f"{PACKAGE}.runtime.devices",
    f"{PACKAGE}.runtime.engines",
    f"{PACKAGE}.runtime.openvino_engine",
    f"{PACKAGE}.graph.contract",
    f"{PACKAGE}.matting.matter",
    f"{PACKAGE}.matting.jobs",
    f"{PACKAGE}.matting.scaleout",
    f"{PACKAGE}.service.core",
    f"{PACKAGE}.service.app",
    "inference",
    "serve",
)


def _python_files() -> list[Path]:
    return sorted([*ROOT.glob("*.py"), *(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "tests").glob("*.py")])


def _package_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


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


def test_no_module_longer_than_600_lines():
    product = [p for p in _python_files() if p.parent.name != "tests"]  # a test file may hold many cases
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in product
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them at their seams):\n" + "\n".join(long)


def test_the_root_keeps_only_the_command_lines_and_the_brief_modules():
    names = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(names) <= MAX_ROOT_PYTHON_FILES, f"{len(names)} Python files at the root: {names}"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, at the top level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else a name from a
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name: its deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycles_are_found():
    # the finder itself, on a graph with one cycle of three and a tail
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_at_every_level_and_relative_ones_resolved(tmp_path):
    modules = {name: tmp_path / f"{name}.py" for name in ("p", "p.a", "p.b", "p.sub", "p.sub.c")}
    source = tmp_path / "c.py"
    source.write_text("from .. import a\nfrom ..b import helper\nimport os\n\n"
                      "def late():\n    import p.sub\n    from . import c\n")
    assert _imports("p.sub.c", source, modules) == {"p.a", "p.b", "p.sub"}


def test_no_import_cycles_in_the_package():
    modules = _package_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert any(graph.values()), "no imports found: the graph builder is broken"
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_torch_free_modules_import_without_torch():
    # in a fresh interpreter where `import torch` fails, as on a machine without it
    code = ("import importlib, sys\n"
            "sys.modules['torch'] = None\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as exc:\n"
            "        print(f'{name}: {exc}')\n")
    out = subprocess.run([sys.executable, "-c", code, *TORCH_FREE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def test_the_marker_lists_name_tests_and_fixtures_that_exist():
    # conftest.py marks tests by name: a renamed test would silently leave its marker behind
    import conftest

    def defined(module: str) -> set[str]:
        path = ROOT / "tests" / module
        if not path.exists():
            return set()
        tree = ast.parse(path.read_text())
        return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    wanted = [(m, t) for (m, t) in conftest.TEST_MARKERS] + [(m, f) for (m, f) in conftest.FIXTURE_MARKERS]
    wanted += [(m, t) for m, tests in conftest.SLOW_TESTS.items() for t in tests]
    stale = [f"{m}::{name}" for m, name in wanted if name not in defined(m) | defined("conftest.py")]
    stale += [m for m in (*conftest.MODULE_MARKERS, *conftest.LONGEST_FIRST) if not (ROOT / "tests" / m).exists()]
    assert not stale, "tests/conftest.py marks what does not exist (renamed?):\n" + "\n".join(stale)
