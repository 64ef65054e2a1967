"""The import structure of the package, read from the source (no imports executed): no cycles between cmjax
modules (imports at any scope), the training loop imported by nobody but the CLI, distances a leaf, and config
files that import only ml_collections, the standard library and each other."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, known) -> set[str]:
    """Modules of `known` that `module` imports anywhere in its file (a package's own parent excluded)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        targets |= {n for n in names if n in known and n != module and not module.startswith(n + ".")}
    return targets


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a cycle of imports."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_cmjax():
    assert find_cycles(_graph("cmjax")) == []


def test_only_the_cli_imports_the_training_loop():
    importers = sorted(m for m, deps in _graph("cmjax").items() if "cmjax.train" in deps)
    assert set(importers) <= {"cmjax.main"}, importers  # main.py names it in MODES and imports it lazily
    assert "cmjax.train:train_and_evaluate" in open(os.path.join(ROOT, "cmjax", "main.py")).read()


def test_distances_and_errors_are_leaves():
    graph = _graph("cmjax")
    assert graph["cmjax.errors"] == set()
    assert graph["cmjax.distances"] <= {"cmjax.errors"}


def test_configs_import_only_ml_collections_and_each_other():
    allowed = {"ml_collections", "configs", "__future__"} | set(sys.stdlib_module_names)
    for module, path in _modules("configs").items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]] if not node.level else []
            else:
                continue
            assert set(roots) <= allowed, (module, roots)
