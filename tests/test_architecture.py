"""The package's import graph: no cycle, and no import that runs up the layers
(cli → runs → algorithms → nn/models → ops → kernels; docs/design.md, Layers).

Every ``import`` statement counts, those inside functions too: a lazy import that runs upward is
still an upward dependency."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent

# Source folders and the module prefix each installs as (setup.py's package_dir).
SOURCES = {"supsup_fast": "supsup_fast", "kernels": "supsup_fast.kernels", "csrc": "supsup_fast.csrc"}

# Lowest layer first. A module may import from its own layer or any layer below it.
LAYERS = [
    ("kernels", ["supsup_fast.kernels", "supsup_fast.csrc"]),
    ("base", ["supsup_fast.bits", "supsup_fast.distributed", "supsup_fast.machine", "supsup_fast.atomic_files"]),
    ("ops", ["supsup_fast.ops", "supsup_fast.backends"]),
    ("nn/models", ["supsup_fast.nn", "supsup_fast.models", "supsup_fast.optim", "supsup_fast.data",
                   "supsup_fast.compat", "supsup_fast.convert"]),
    ("algorithms", ["supsup_fast.algorithms"]),
    ("runs", ["supsup_fast.runs", "supsup_fast.bench"]),
    ("cli", ["supsup_fast.cli", "supsup_fast.__main__"]),
]
FACADE = "supsup_fast"  # the package's own __init__: re-exports the public API, imported by no module of it


def modules() -> Dict[str, Path]:
    found = {}
    for folder, prefix in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = path
    return found


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules that ``name`` imports (``from pkg import sub`` counts as importing sub)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            # ``import supsup_fast._C``: a compiled extension, not a module of the source tree
            targets = [a.name for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in modules():
        if name != FACADE:
            layer_of(name)


def test_no_import_runs_up_the_layers():
    upward = []
    for name, targets in graph().items():
        if name == FACADE:
            continue
        for t in targets:
            if t == FACADE:
                upward.append(f"{name} imports the package facade {FACADE} (import the module it needs)")
            elif layer_of(t) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    # The two checks above would pass on an empty graph: show they catch what they look for.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer_of("supsup_fast.ops.registry") < layer_of("supsup_fast.runs.loop")
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..runs import loop\n")
    assert imports_of("supsup_fast.ops.mod", path, {"supsup_fast.runs", "supsup_fast.runs.loop"}) == {"supsup_fast.runs.loop"}
