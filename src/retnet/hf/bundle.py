"""The self-contained remote code of an exported folder, generated from this package's source.

A folder written by `retnet export --hf` must load with `trust_remote_code=True` where retnet
is not installed. Instead of a second copy of the model kept by hand, each export concatenates
the package modules the model is made of, in dependency order, with their `from retnet...`
imports removed: the model stays defined once. Two files, as transformers expects:

    configuration_retnet.py   ops/decay.py, model/config.py, hf/configuration.py
    modeling_retnet.py        the ops, modules, model, hf/views.py and hf/modeling.py, plus
                              `from .configuration_retnet import ...` for the names above;
                              hf/reference_dispatch.py stands in for retnet.kernels.dispatch
                              (no fast path travels: every operation runs its reference)

The bundle refuses (BundleError, at export time) anything it cannot carry over faithfully: a
name imported from retnet that no bundled module defines (a new dependency: add its module
below), a name defined twice (the bundle is one namespace), an aliased or nested retnet import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from retnet import __version__

CONFIG_FILE, MODELING_FILE = "configuration_retnet.py", "modeling_retnet.py"
# Paths inside the retnet package; each module after those it imports from.
CONFIG_MODULES = ("ops/decay.py", "model/config.py", "hf/configuration.py")
MODELING_MODULES = ("ops/rotary.py", "hf/reference_dispatch.py", "ops/linear.py", "ops/low_rank.py",
                    "ops/documents.py", "ops/retention.py", "ops/loss.py", "ops/gate.py",
                    "ops/activation.py",
                    "ops/norm_linear.py", "modules/linear.py", "modules/layout.py",
                    "modules/retention.py", "modules/block.py", "model/state.py", "model/lm.py",
                    "hf/views.py", "hf/modeling.py")
# config.json's auto_map: what AutoConfig / AutoModelForCausalLM load with trust_remote_code.
AUTO_MAP = {"AutoConfig": "configuration_retnet.RetNetHFConfig",
            "AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM"}


class BundleError(RuntimeError):
    """The package source cannot be bundled as it is; the message names the module and why."""


@dataclass(frozen=True)
class _Module:
    path: str
    body: str  # the source without its docstring and top-level imports, comments kept
    summary: str  # the docstring's first line
    imports: tuple[str, ...]  # the other top-level imports, normalised by ast.unparse
    needs: frozenset[str]  # names it imports from retnet
    defines: frozenset[str]  # names bound at its top level


def _is_retnet(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "retnet"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "retnet"
                                                for a in node.names)


def _defined(tree: ast.Module) -> frozenset[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return frozenset(names)


def _retnet_names(path: str, node: ast.stmt) -> set[str]:
    """The names a `from retnet... import a, b` binds; other forms cannot be carried over."""
    if not isinstance(node, ast.ImportFrom) or node.level > 0 or node.names[0].name == "*" or any(
            a.asname for a in node.names):
        raise BundleError(f"{path}:{node.lineno}: `{ast.unparse(node)}` cannot be bundled; "
                          "import names with `from retnet.x import name`")
    return {a.name for a in node.names}


def _parse(path: str) -> _Module:
    source = files("retnet").joinpath(*path.split("/")).read_text(encoding="utf-8")
    tree = ast.parse(source)
    drop: set[int] = set()
    imports, needs = [], set()
    doc = ast.get_docstring(tree) or ""
    for i, node in enumerate(tree.body):
        is_import = isinstance(node, (ast.Import, ast.ImportFrom))
        if is_import or (i == 0 and doc):
            drop.update(range(node.lineno, node.end_lineno + 1))
        if _is_retnet(node):
            needs |= _retnet_names(path, node)
        elif is_import and getattr(node, "module", None) != "__future__":
            imports.append(ast.unparse(node))  # hoisted: the file opens with every import
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if id(node) not in top and isinstance(node, ast.stmt) and _is_retnet(node):
            raise BundleError(f"{path}:{node.lineno}: a retnet import below the top level cannot "
                              "be bundled; move it to the top of the module")
    lines = [line for n, line in enumerate(source.splitlines(), 1) if n not in drop]
    return _Module(path, "\n".join(lines).strip(), doc.split("\n")[0], tuple(imports),
                   frozenset(needs), _defined(tree))


def _bound(statement: str) -> set[str]:
    node = ast.parse(statement).body[0]
    return {a.asname or a.name.split(".")[0] for a in node.names}


def _check(modules: list[_Module], base: frozenset[str], imports: list[str]) -> set[str]:
    """Every retnet name defined before use, none twice; returns the names the bundle defines."""
    owner = dict.fromkeys(base, CONFIG_FILE)
    for m in modules:
        missing = sorted(m.needs - owner.keys())
        if missing:
            raise BundleError(f"{m.path} imports {', '.join(missing)} from retnet, which no "
                              "earlier bundled module defines: add its module to "
                              "retnet.hf.bundle in dependency order")
        twice = sorted(m.defines & owner.keys())
        if twice:
            raise BundleError(f"{twice[0]} is defined in both {owner[twice[0]]} and {m.path}; "
                              "the bundle is one namespace: rename one")
        owner.update(dict.fromkeys(m.defines, m.path))
    clash = sorted(set().union(*map(_bound, imports)) & owner.keys())
    if clash:
        raise BundleError(f"{', '.join(clash)}: both imported and defined by bundled modules")
    return set(owner) - base


def bundle(paths: tuple[str, ...], base: frozenset[str] = frozenset()) -> tuple[str, set[str]]:
    """The source of one self-contained file made of the retnet modules `paths`, importing
    the names in `base` from configuration_retnet.py; returns it and the names it defines."""
    modules = [_parse(p) for p in paths]
    imports = list(dict.fromkeys(s for m in modules for s in m.imports))
    defined = _check(modules, base, imports)
    from_base = sorted(set().union(*(m.needs for m in modules)) & base)
    head = [f"# Generated by `retnet export --hf` (retnet {__version__}) from the retnet modules",
            "# named below, in this order. Do not edit: the model is defined once, in retnet.",
            '"""RetNet for transformers\' trust_remote_code, self-contained (no retnet import)."""',
            "", "from __future__ import annotations", "", *imports]
    if from_base:
        head.append(f"from .{Path(CONFIG_FILE).stem} import {', '.join(from_base)}")
    parts = [f"# retnet/{m.path}: {m.summary}\n\n{m.body}" for m in modules]
    text = "\n".join(head) + "\n\n\n" + "\n\n\n".join(parts) + "\n"
    compile(text, paths[-1], "exec")  # a syntax error here is a bundling bug, not a user's
    return text, defined


def remote_code() -> dict[str, str]:
    """{file name: source} of configuration_retnet.py and modeling_retnet.py."""
    config_text, config_names = bundle(CONFIG_MODULES)
    modeling_text, _ = bundle(MODELING_MODULES, frozenset(config_names))
    return {CONFIG_FILE: config_text, MODELING_FILE: modeling_text}


def write_remote_code(folder: str | Path, code: dict[str, str] | None = None) -> list[Path]:
    """Write `code` (by default `remote_code()`) into `folder`; returns the files."""
    paths = []
    for name, text in (code or remote_code()).items():
        paths.append(Path(folder) / name)
        paths[-1].write_text(text, encoding="utf-8")
    return paths
