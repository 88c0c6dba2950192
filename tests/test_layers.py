"""The package's import graph: layers that point one way, no circles, the study above the library.

Read from the source with `ast` (every `import` and `from ... import`, at any depth, lazy ones
included), so a circle or a wrong-way import fails here even where it would only bite at run
time. The one allowed way from the library into the study is the command line's dispatch.
"""

from __future__ import annotations

import ast
import pathlib

import poissonflow

ROOT = pathlib.Path(poissonflow.__file__).resolve().parent
STUDY = "poissonflow.experiments"
# modules of the library allowed to reach the study: the command line's lazy dispatch only
STUDY_DISPATCH = {"poissonflow.__main__"}
# the backends: they may import only these modules of the package (and each other's internals)
BACKEND_MAY_IMPORT = (
    "poissonflow._ext",
    "poissonflow._checks",
    "poissonflow.ode",
    "poissonflow.ops",
    "poissonflow.registry",
    "poissonflow.kernels",
)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """Package modules that `name` imports (a `from pkg import sub` counts as importing sub)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("poissonflow"):
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.add(t)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_library_never_imports_the_study():
    graph = _graph()
    wrong = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if not mod.startswith(STUDY) and dep.startswith(STUDY) and mod not in STUDY_DISPATCH
    )
    assert not wrong, wrong


def test_backends_import_nothing_above_them():
    graph = _graph()
    wrong = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.startswith("poissonflow.kernels")
        for dep in deps
        if dep != "poissonflow" and not dep.startswith(BACKEND_MAY_IMPORT)
    )
    assert not wrong, wrong


def test_no_import_circles():
    """No cycle among modules, a package's `__init__` importing its own submodules aside (those
    edges are how a package exposes its parts, and Python resolves them by construction)."""
    graph = _graph()
    edges = {m: {d for d in deps if d not in _ancestors(m) | {m}} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, [" -> ".join(c) for c in cycles]
