"""The architecture, enforced: engines imports no shell and no Ray anywhere (recursively, lazy
imports included), has no import cycle, imports with the base dependencies alone; the shells
enter engines through its facade only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("serve_app", "data_jobs")
FORBIDDEN_IN_ENGINES = ("ray", *SHELLS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    """Every module of ``package``, subpackages included (pkgutil.iter_modules stops at the top)."""
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))
            if "protos" not in p.parts}


_ALL_MODULES = {name for package in ("engines", *SHELLS) for name in _modules(package)}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``(absolute target, line)`` of every runtime import in the file: module level and inside
    functions (a lazy import is a dependency too), ``if TYPE_CHECKING:`` blocks left out.
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in _ALL_MODULES else target, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package in packages:
        modules.update(_modules(package))
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in _imports(module, path):
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_module_walk_reaches_every_subpackage():
    names = set(_modules("engines"))
    for module in ("engines.backends.onnx", "engines.tensorrt.plan_cache", "engines.models.precision",
                   "engines.config.typed", "engines.bench.workers", "engines.cli.plans",
                   "engines.base.engine"):
        assert module in names


def test_no_engines_module_imports_a_shell_or_ray_not_even_lazily():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for module, path in _modules("engines").items()
        for target, line in _imports(module, path)
        if target.split(".")[0] in FORBIDDEN_IN_ENGINES
    ]
    assert offenders == []


def test_there_is_no_import_cycle():
    assert _cycles(_graph(("engines", *SHELLS))) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_shells_import_engines_through_its_facade_only():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for shell in SHELLS
        for module, path in _modules(shell).items()
        for target, line in _imports(module, path)
        if target.startswith("engines.") and target.split(".")[1] not in _facade_names()
    ]
    assert offenders == []


def _facade_names() -> set[str]:
    import engines

    return set(engines.__all__)


@pytest.mark.slow
def test_every_engines_module_imports_without_ray_or_gpu_packages():
    modules = sorted(m for m in _modules("engines") if m != "engines.__main__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "heavy = ('ray', 'tensorrt', 'cuda', 'torch', 'serve_app', 'data_jobs')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"engines imported {out.stdout.strip()}"


@pytest.mark.slow
def test_arcface_help_imports_no_ray_and_lists_the_shell_commands():
    code = (
        "import sys\n"
        "from engines.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('RAY-LOADED' if 'ray' in sys.modules else 'RAY-FREE')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "RAY-FREE"
    for name in ("serve", "bench-serve", "embed-episodes", "sample-episodes", "build", "engines"):
        assert name in proc.stdout
