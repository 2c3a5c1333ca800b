"""The package's import graph has no cycles: every module can be read (and imported) after the ones it uses."""

import ast
import os

import pytest


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmpeft")


def module_names() -> dict[str, str]:
    """`{dotted module name: file}` of every module of the package (packages by their `__init__.py`)."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))
                dotted = path.removesuffix(".py").replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = os.path.join(folder, name)
    return modules


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that module `name` imports, at any depth of its code (function-level imports too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from .x import y` imports y's module when y is one, else x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def test_the_import_graph_has_no_cycles():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["mmpeft.training.run"] >= {"mmpeft.hub", "mmpeft.training.trainer"}  # the graph is really read

    state, path = {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
