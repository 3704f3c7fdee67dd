"""The house rules of docs/ARCHITECTURE.md §2, checked on the source: the import graph (every
import, also those inside functions) has no cycle and no lower package imports a higher one;
no module is over 500 lines, no function over 80 unless it says why on its first line
(``# long on purpose: ...``); no package of index/ holds more than 8 modules besides __init__; an
import inside a function says why."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = ("procdata", "encoder", "index", "eval", "cluster")     # each may import only those before it


def modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the five packages."""
    found = {}
    for package in LAYERS:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imported(path: str, module: str) -> set[str]:
    """The project modules ``module`` imports: ``from package import submodule`` counts as the
    submodule only (a package's __init__ importing its parts is not a cycle)."""
    names = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            names.update(submodules or [base])
    deps = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            deps.add(name)
    return deps


GRAPH = {module: imported(path, module) for module, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}                     # "open" while on the DFS path, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    assert len(GRAPH) > 50                         # the walk found the tree
    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_no_package_imports_a_higher_one():
    rank = {package: n for n, package in enumerate(LAYERS)}
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
              if rank[d.split(".")[0]] > rank[m.split(".")[0]]]
    assert not upward


def test_modules_and_functions_are_short_or_say_why():
    long_modules, long_functions = [], []
    for module, path in MODULES.items():
        lines = open(path).read().splitlines()
        if len(lines) > 500:
            long_modules.append(f"{module} ({len(lines)} lines)")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                body = "\n".join(lines[node.lineno - 1:node.body[0].lineno])
                if "# long on purpose:" not in body:
                    long_functions.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_modules and not long_functions


def test_no_room_of_index_holds_more_than_eight_modules():
    crowded = []
    for folder, _, files in os.walk(os.path.join(ROOT, "index")):
        count = sum(name.endswith(".py") and name != "__init__.py" for name in files)
        if count > 8:
            crowded.append(f"{os.path.relpath(folder, ROOT)} ({count})")
    assert not crowded


def test_every_import_inside_a_function_says_why():
    """At module top unless start-up time needs it lazy (torch, Ray, FAISS, timm): a comment on the
    line, or the module's docstring saying why its imports are inside its functions."""
    silent = []
    for module, path in MODULES.items():
        lines = open(path).read().splitlines()
        tree = ast.parse("\n".join(lines))
        if "import" in (ast.get_docstring(tree) or "").lower():
            continue
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                silent += [f"{module}:{node.lineno} {lines[node.lineno - 1].strip()}" for node in function.body
                           if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]]
    assert not silent
