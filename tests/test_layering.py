"""The C core's layering: every csrc/*.c calls only functions defined in files of lower layers.

The layer order is written once, in the LAYERS block of csrc/lm_internal.h (docs/design.md,
"Layers", mirrors it; the last test checks that). Each file is compiled on its own (`gcc -c`,
the warning flags of pylazymem/_build.py) and its symbols read with `nm`: a global function
(T) is defined by that file, an undefined one (U) is called by it. A call from a file to an
lm_* function defined in another file of the same or a higher layer fails the test, as does a
file that is not in the list. That test needs a C toolchain, not the compiled core (marker
`cc`); the checker's own test and the docs check need neither.
"""

import ast
import os
import re
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CSRC = os.path.join(REPO, "csrc")
NOT_CORE = {"pybuffer.c"}   # the Python buffer type: a separate extension, needs Python.h


def read_layers(path=os.path.join(CSRC, "lm_internal.h")):
    """The LAYERS block: one layer per line, bottom first; its leading *.c words are the files."""
    with open(path) as f:
        text = f.read()
    m = re.search(r"LAYERS BEGIN[^\n]*\n(.*?)\n[ *]*LAYERS END", text, re.S)
    assert m, "csrc/lm_internal.h has no LAYERS BEGIN ... LAYERS END block"
    layers = []
    for line in m.group(1).splitlines():
        words = line.strip().lstrip("*").split()
        files = []
        for w in words:
            if not w.endswith(".c"):
                break
            files.append(w)
        if files:
            layers.append(files)
    return layers


def build_flags(path=os.path.join(REPO, "pylazymem", "_build.py")):
    """The `args = [...]` list of _build.compile_args(), read without importing cffi."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "compile_args":
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "args"):
                    return ast.literal_eval(stmt.value)
    raise AssertionError("pylazymem/_build.py: no `args = [...]` in compile_args()")


def symbol_tables(tmp_path, sources):
    """{file: (defined lm_* functions, undefined lm_* symbols)} from gcc -c and nm."""
    flags = [f for f in build_flags() if not f.startswith("-fvisibility")]
    tables = {}
    for name in sources:
        obj = os.path.join(str(tmp_path), name[:-2] + ".o")
        cc = subprocess.run(["gcc", *flags, "-I", CSRC, "-c", os.path.join(CSRC, name),
                             "-o", obj], capture_output=True, text=True)
        assert cc.returncode == 0, "gcc -c %s failed:\n%s" % (name, cc.stderr)
        nm = subprocess.run(["nm", "-P", obj], capture_output=True, text=True, check=True)
        defined, used = set(), set()
        for line in nm.stdout.splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[0].startswith("lm_"):
                continue
            if parts[1] == "T":
                defined.add(parts[0])
            elif parts[1] == "U":
                used.add(parts[0])
        tables[name] = (defined, used)
    return tables


def violations(tables, layers, files):
    """Messages for every call that does not point down, and every file outside the layers."""
    out = []
    level = {}
    for i, layer in enumerate(layers):
        for f in layer:
            if f in level:
                out.append("%s is listed in two layers" % f)
            level[f] = i
    for f in sorted(set(files) - set(level)):
        out.append("%s is not in the layer list (csrc/lm_internal.h, LAYERS)" % f)
    for f in sorted(set(level) - set(files)):
        out.append("the layer list names %s, which does not exist" % f)
    owner = {}
    for f, (defined, _) in sorted(tables.items()):
        for sym in defined:
            if sym in owner:
                out.append("%s is defined in both %s and %s" % (sym, owner[sym], f))
            owner[sym] = f
    for f, (_, used) in sorted(tables.items()):
        for sym in sorted(used):
            g = owner.get(sym)
            if g is None or g == f or f not in level or g not in level:
                continue
            if level[g] >= level[f]:
                out.append("%s (layer %d) calls %s, defined in %s (layer %d): calls must point "
                           "to a lower layer" % (f, level[f] + 1, sym, g, level[g] + 1))
    return out


def core_files():
    return sorted(f for f in os.listdir(CSRC) if f.endswith(".c") and f not in NOT_CORE)


@pytest.mark.source
@pytest.mark.cc
def test_csrc_calls_only_downwards(tmp_path):
    files = core_files()
    tables = symbol_tables(tmp_path, files)
    # The check below reads real tables: make sure they are not empty by accident.
    assert "lm_fail" in tables["util.c"][0] and "lm_fail" in tables["region.c"][1]
    problems = violations(tables, read_layers(), files)
    assert not problems, "\n".join(problems)


def test_checker_catches_upward_and_sideways_calls_and_unlisted_files():
    layers = [["low.c"], ["mid.c", "side.c"], ["top.c"]]
    tables = {
        "low.c": ({"lm_low"}, {"lm_mid"}),            # upward: low calls mid
        "mid.c": ({"lm_mid"}, {"lm_low", "lm_side"}),  # down is fine, sideways is not
        "side.c": ({"lm_side"}, {"lm_low", "memcpy"}),
        "top.c": ({"lm_top"}, {"lm_low", "lm_mid", "lm_top"}),
        "stray.c": ({"lm_stray"}, set()),
    }
    problems = violations(tables, layers, list(tables))
    assert any(p.startswith("low.c (layer 1) calls lm_mid, defined in mid.c (layer 2)")
               for p in problems), problems
    assert any(p.startswith("mid.c (layer 2) calls lm_side, defined in side.c (layer 2)")
               for p in problems), problems
    assert any("stray.c is not in the layer list" in p for p in problems), problems
    assert len(problems) == 3, problems
    ok = {f: t for f, t in tables.items() if f not in ("stray.c",)}
    ok["low.c"] = ({"lm_low"}, set())
    ok["mid.c"] = ({"lm_mid"}, {"lm_low"})
    assert violations(ok, layers, list(ok)) == []


@pytest.mark.source
def test_layer_list_parses_and_design_doc_mirrors_it():
    layers = read_layers()
    flat = [f for layer in layers for f in layer]
    assert flat[0] == "util.c" and flat[-1] == "region.c" and "meta.c" in flat
    with open(os.path.join(REPO, "docs", "design.md")) as f:
        doc = f.read()
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    # The file a line describes is its first word.
    named = [w for w in re.findall(r"(?m)^\s+([a-z_]+\.c)\s", section) if w in flat]
    assert named == list(reversed(flat)), (
        "docs/design.md, Layers, must list the C files top first as csrc/lm_internal.h's "
        "LAYERS block does bottom first")
