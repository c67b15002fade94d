"""The Python package in layers: no module imports (at the top or inside a function) a module
that imports it back, and the error module is a leaf (issue 10). The C core's layers are
checked by tests/test_layering.py.

Imports are read from the sources (ast), so a lazy import inside a function counts like one
at the top: a cycle that only closes at run time is still a cycle.
"""
import ast
import importlib.util
import os

import pytest

# The package that runs (the source tree, or an installed one as in the container matrix),
# found without importing it.
PKG = os.path.dirname(importlib.util.find_spec("pylazymem").origin)
ROOT = os.path.dirname(PKG)

# Modules that import nothing of the package but the ones listed.
LEAVES = {
    "pylazymem._uffd_errors": set(),
    "pylazymem._errors": {"pylazymem._uffd_errors"},
    "pylazymem._meta": set(),
    "pylazymem._version": set(),
}


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path, name):
    """The package modules `name` (at `path`) imports, anywhere in its code."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pylazymem"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("pylazymem"):
                continue
            # `from . import x` / `from .bench import y`: x may be a module of the package
            for a in node.names:
                sub = mod + "." + a.name
                if _exists(sub):
                    found.add(sub)
                elif _exists(mod):
                    found.add(mod)
    found.discard(name)
    return found


def _exists(mod):
    p = os.path.join(ROOT, *mod.split("."))
    return os.path.isfile(p + ".py") or os.path.isfile(os.path.join(p, "__init__.py"))


def package_graph():
    graph = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = _module_name(path)
                graph[name] = _imports(path, name)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in color:
                continue   # not a module of ours (a compiled extension)
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_only_their_leaves(leaf):
    got = package_graph()[leaf]
    assert got <= LEAVES[leaf], "%s imports %s" % (leaf, sorted(got - LEAVES[leaf]))


def test_region_server_snapshot_layers():
    """The snapshot reader and the wire protocol sit below region, server and snapshot."""
    g = package_graph()
    assert "pylazymem.snapshot" not in g["pylazymem.region"]
    assert "pylazymem.server" not in g["pylazymem.region"]
    assert "pylazymem.snapshot" not in g["pylazymem.server"]
    assert "pylazymem.region" not in g["pylazymem._snapfile"]


def test_the_checker_finds_a_cycle():
    """The checker itself: a cycle closed by a lazy import is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g = package_graph()
    g["pylazymem._errors"] = g["pylazymem._errors"] | {"pylazymem._binding"}
    assert find_cycle(g), "a lazy import of _binding from _errors closes a cycle"
