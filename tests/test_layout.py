"""The package's shape: no import cycles (lazy imports inside functions count), no `nonlocal`,
modules of readable size. Read from the source, so a new module is checked without a list."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tpt_jax"
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules `name` imports anywhere in its body (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` depends on the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(u: str):
        colour[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if colour.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if colour.get(v) == 0:
                cycle = visit(v)
                if cycle:
                    return cycle
        stack.pop()
        colour[u] = 2
        return None

    for u in sorted(graph):
        if colour[u] == 0:
            cycle = visit(u)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "tpt_jax.loop.rounds" in graph and graph["tpt_jax.loop.rounds"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_nonlocal():
    used = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p in _modules().values()
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, ast.Nonlocal)]
    assert not used, used


def test_modules_stay_readable():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long


# Layers, lowest first: a module imports only from its own rank or below. The longest matching
# prefix gives a module's rank. `gemma.config` (the model's hyperparameters, importing only
# errors) is configuration; `prompts` (template names and text, importing only errors) is what
# config validates `prompt` against; `plotting` writes files, as io does.
LAYERS = {
    "tpt_jax.errors": 0, "tpt_jax.faults": 0,
    "tpt_jax.config": 1, "tpt_jax.config_io": 1, "tpt_jax.gemma.config": 1, "tpt_jax.prompts": 1,
    "tpt_jax.io": 2, "tpt_jax.distributed": 2, "tpt_jax.plotting": 2,
    "tpt_jax.gemma": 3,
    "tpt_jax.engine": 4,
    "tpt_jax.stages": 5,
    "tpt_jax.data": 6, "tpt_jax.methods": 6,
    "tpt_jax.loop": 7,
    "tpt_jax.bench": 8,
    "tpt_jax.cli": 9,
}


def layer(module: str) -> int:
    """The rank of the longest prefix of `module` in LAYERS; the package's __init__ is 0."""
    if module == "tpt_jax":
        return 0
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no rank in LAYERS: add it")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def test_layer_order():
    assert layer("tpt_jax.gemma.config") < layer("tpt_jax.gemma.model") < layer("tpt_jax.engine.x")
    assert upward_imports({"tpt_jax.gemma.model": {"tpt_jax.stages.loss"}}) == [
        "tpt_jax.gemma.model -> tpt_jax.stages.loss"]
    assert upward_imports(import_graph()) == []


def test_command_line_code_lives_in_cli():
    """Library modules hold no argparse code; only `cli` and the benchmarks' own arguments."""
    found = [f"{name}:{n.lineno}" for name, path in _modules().items()
             if not name.startswith(("tpt_jax.cli", "tpt_jax.bench"))
             for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Attribute) and n.attr in ("add_argument", "set_defaults")]
    assert not found, found
