"""The layering of docs/architecture.md, checked on the source: every `import` of a retnet module
(at module level or inside a function: both are real dependencies) points from a higher layer
to a lower one or stays in its layer, and the modules import each other in no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Lower layers first. A module belongs to the first prefix that matches it.
LAYERS: list[tuple[str, ...]] = [
    # no retnet imports but these
    ("retnet.options", "retnet.memory", "retnet.device", "retnet.files"),
    ("retnet.ops", "retnet.kernels"),
    ("retnet.modules",),
    ("retnet.model",),
    ("retnet.tokenizer", "retnet.data", "retnet.corpus", "retnet.checkpoint", "retnet.loading",
     "retnet.convert", "retnet.adapter"),
    ("retnet.generation", "retnet.train", "retnet.eval", "retnet.serve", "retnet.hf",
     "retnet.info", "retnet.prepare"),
    ("retnet.compare", "retnet.bench", "retnet.study"),  # features built from other features
    ("retnet.cli", "retnet.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / "retnet").rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The retnet modules that `path` imports (`from a.b import c` is a.b.c when that is a
    module, else a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("retnet")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retnet"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if node.module == "retnet" and a.name in ("__version__", "__doc__"):
                    continue  # the package's metadata, not its facade of re-exports
                out.add(sub if sub in known else node.module)
    return out & known


def layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} is in no layer of LAYERS: place it (and document it in "
                         "docs/architecture.md)")


def table_edges() -> set[str]:
    """The modules of the fast paths the dispatch table names as "module:function" strings
    (imported when first chosen): dependencies of the table like its imports."""
    from retnet.kernels.dispatch import TABLE

    return {f"retnet.kernels.{fast.impl.split(':')[0]}" for row in TABLE.values()
            for fast in row.fast}


def graph() -> dict[str, set[str]]:
    found = modules()
    # `retnet` itself is the public facade: it imports from below; inside, only the CLI
    # imports it (anyone may read its __version__).
    edges = {name: imports(path, set(found)) for name, path in found.items() if name != "retnet"}
    edges["retnet.kernels.dispatch"] |= table_edges()
    return edges


def test_the_dispatch_table_names_fast_paths_in_kernels_only():
    """Every fast path's code lives in retnet.kernels (layer 1, beside the ops that ask the
    table), so that the table's string edges obey the layering as its imports do."""
    assert table_edges() and all(m in modules() for m in table_edges()), table_edges()


def test_every_import_points_down_or_sideways():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if target == "retnet":
                if layer(name) != len(LAYERS) - 1:
                    wrong.append(f"{name} -> retnet (only the CLI imports the facade)")
            elif layer(target) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) -> {target} (layer {layer(target)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path, or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        colour[node] = 2
        stack.pop()
        return None

    for start in sorted(edges):
        if start not in colour and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    edges = graph()
    assert _cycle(edges) is None, "import cycle: " + " -> ".join(_cycle(edges))


def test_the_checker_sees_cycles_and_upward_imports():
    """Planted: a two-module cycle is reported; a layer-less module is refused."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert layer("retnet.ops.retention") < layer("retnet.model.lm") < layer("retnet.cli")


def test_only_the_loader_builds_a_model_from_a_checkpoint():
    """One inference loader (`retnet.load`, retnet/loading.py): a feature that read a run's
    weights itself (`load_checkpoint(...).build_model()`) could drift from what generate,
    serve and eval load (#34)."""
    callers = [module_name(path) for path in SRC.joinpath("retnet").rglob("*.py")
               if "build_model()" in path.read_text()]
    assert callers == ["retnet.loading"]
