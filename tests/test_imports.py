"""The package's import graph: no cycles, and every module imports on its own.

Edges are read from the source with ``ast``: every ``import`` and ``from ...
import`` of a module of the package, at module level or inside a function
(a lazy import still ties the two modules together; it only hides the cycle
until the function runs). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Importing a submodule
also runs its parent packages' ``__init__``; that implicit edge is not
counted (it would make every module re-exported by ``__init__`` a cycle).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys

from tests.conftest import REPO

PKG = REPO / "rcc"


def module_names() -> dict[str, object]:
    """``{dotted module name: path}`` of every ``.py`` file of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path, modules) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # ``import rcc.eval.plot`` -> rcc.eval.plot; attributes -> their module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles_and_lazy_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    src = tmp_path / "m.py"
    src.write_text("from . import x\nfrom .y import f\n\ndef g():\n    from ..z import h\n    import rcc.q.w\n")
    modules = {"rcc.p.m": src, "rcc.p.x": None, "rcc.p.y": None, "rcc.z": None, "rcc.q": None}
    assert imports_of("rcc.p.m", src, modules) == {"rcc.p.x", "rcc.p.y", "rcc.z", "rcc.q"}


def test_the_graph_sees_the_package():
    edges = graph()
    assert {"rcc", "rcc.cli", "rcc.model", "rcc.eval", "rcc.eval.runner"} <= set(edges)
    assert "rcc.hooks" in edges["rcc.model"] and "rcc.io" in edges["rcc.memory"]
    assert "rcc.ask" in edges["rcc.cli"]  # a function-level import counts


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_entry_points_sit_on_top():
    """The library never imports the CLI, the evaluation or the benchmark."""
    edges = graph()
    tops = ("rcc.cli", "rcc.bench", "rcc.eval")
    for name, deps in edges.items():
        if name.startswith(tops) or name == "rcc":
            continue
        bad = sorted(d for d in deps if d.startswith(tops))
        assert not bad, f"{name} imports {bad}"


def test_every_module_imports_alone():
    """Each module imported first, in one fresh interpreter: the package's modules are
    dropped from ``sys.modules`` before each (torch and transformers stay loaded, so
    this takes seconds), so a module that only imports after another would fail."""
    names = sorted(module_names())
    if importlib.util.find_spec("vllm") is None:  # the vLLM model class needs vLLM (.venv-vllm)
        names.remove("rcc.vllm.model")
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'rcc' or m.startswith('rcc.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        bad.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
