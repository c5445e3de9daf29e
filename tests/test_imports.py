"""The package's import graph: the rule table of which area imports which, no cycles, no
import of another module's private name, and every module imports on its own.

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
    assert {"rcc", "rcc.cli", "rcc.cli.ask", "rcc.model", "rcc.eval", "rcc.eval.runner"} <= set(edges)
    assert "rcc.hooks" in edges["rcc.model"] and "rcc.files" in edges["rcc.memory"]
    assert "rcc.ask" in edges["rcc.cli.ask"]  # a function-level import counts


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: which areas each area may import: the root library (``rcc/*.py``), then one folder per feature.
#: ``cli`` may import anything and nothing imports it; a module may always import its own area.
RULES: dict[str, set[str]] = {
    "root": {"root"},
    "data": {"root"},
    "train": {"root", "data"},
    "eval": {"root", "data"},
    "bench": {"root", "data", "train"},
    "vllm": {"root"},
    "serve": {"root", "vllm"},
    "cli": {"root", "data", "train", "eval", "bench", "vllm", "serve"},
}


def area(name: str) -> str:
    """``rcc.model`` -> ``root``, ``rcc.eval.niah`` -> ``eval``, ``rcc`` -> ``root``."""
    parts = name.split(".")
    if len(parts) > 1 and (PKG / parts[1]).is_dir():
        return parts[1]
    return "root"


def test_every_area_is_in_the_rule_table():
    areas = {area(name) for name in module_names()}
    assert areas == set(RULES), f"areas without a rule (or rules without an area): {areas ^ set(RULES)}"


def test_imports_follow_the_rule_table():
    bad = []
    for name, deps in graph().items():
        if name == "rcc":  # the package's lazy public names (PEP 562) are the root's own
            continue
        for dep in deps:
            here, there = area(name), area(dep)
            if there != here and there not in RULES[here]:
                bad.append(f"{name} ({here}) imports {dep} ({there})")
    assert not bad, "\n".join(sorted(bad))


def test_the_root_holds_at_most_about_twenty_modules():
    root = [p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "_version.py")]
    assert len(root) <= 22, sorted(root)


def private_imports() -> list[str]:
    """``from M import _name`` anywhere in the package, tests, benchmarks and recipes, where M is
    another module of the package (a module's own private names stay inside it)."""
    bad = []
    for folder in ("rcc", "tests", "benchmarks", "recipes", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rcc") and not node.level:
                    names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if names:
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {', '.join(names)}")
    return bad


def test_no_import_of_another_modules_private_name():
    bad = private_imports()
    assert not bad, "\n".join(bad)


def test_argparse_only_in_the_cli():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).parts[0] == "cli":
            continue
        text = path.read_text(encoding="utf-8")
        if "import argparse" in text or "add_argument(" in text or "Namespace" in text:
            bad.append(str(path.relative_to(REPO)))
    assert not bad, f"argument parsing outside rcc/cli/: {bad}"


def test_every_module_imports_alone():
    """Each module imported first, in one fresh interpreter: the package's modules are
    dropped from ``sys.modules`` before each (torch and transformers stay loaded, so
    this takes seconds), so a module that only imports after another would fail."""
    names = sorted(n for n in module_names() if not n.endswith(".__main__"))  # those run the command
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


def test_every_name_imported_from_the_package_exists():
    """``from rcc.M import name`` anywhere (a function-level import too, in the package,
    the tests, benchmarks, recipes and scripts) names something ``rcc.M`` has: a lazy
    import of a moved or renamed name fails here, not when its command first runs."""
    import importlib

    bad = []
    for folder in ("rcc", "tests", "benchmarks", "recipes", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "rcc"):
                    continue
                if node.module.startswith("rcc.vllm.model") and importlib.util.find_spec("vllm") is None:
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, "\n".join(bad)
