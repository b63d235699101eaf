"""A study's grid: named model sizes, one training budget, and blocks of cells (architecture ×
size × seed × variant × learning rate), read from a TOML file or a named preset and checked
before any work, each mistake one line naming the key and the fix."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retnet.options import check_types, short

# Every architecture a cell can name; `retnet.study.archs` builds each.
ARCHS = ("retnet", "linear", "llama", "mamba", "mamba2", "rwkv")
# What a cell trains on: the language-model corpus, or the synthetic recall task (study.mqar).
TASKS = ("lm", "mqar")
# Variants of our own model (the paper's Table 6) apply to these only.
RETNET_ARCHS = ("retnet",)
BASE = "base"


@dataclass(frozen=True)
class Size:
    """A RetNet shape; every other architecture of the size is matched to its non-embedding
    parameters at the same width and depth."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int = 2


@dataclass(frozen=True)
class Budget:
    """What every cell of a study shares: data, tokenizer, batches, schedule, evaluation."""

    batch_size: int = 8
    seq_len: int = 128
    # One rule for every size: tokens = ratio × the size's RetNet non-embedding parameters.
    tokens_per_param: float = 2.0
    min_steps: int = 20
    lr: float = 2e-3
    # Per-architecture peak learning rates (from the sweep at the smallest size); else `lr`.
    lr_by_arch: dict = field(default_factory=dict)
    warmup_frac: float = 0.1
    eval_batches: int = 8
    checkpoint_every: int = 50
    tokenizer: str = "bpe"  # "bpe" (trained on the training split, vocab_size) or "byte"
    vocab_size: int = 1024
    data: str | None = None  # text file, .jsonl, directory or glob; None: the stdlib corpus
    # A cell whose first steps project beyond this is recorded "too-slow", not run to the end.
    max_cell_minutes: float = 90.0


@dataclass(frozen=True)
class Recall:
    """The grid's [recall] table: what every MQAR cell (task "mqar") trains on and is measured
    on; its steps, batch and rate replace the budget's."""

    seq_len: int = 64
    pairs: tuple[int, ...] = (2, 4, 8, 16)  # training mixes these; accuracy is given for each
    vocab_size: int = 258  # the byte tokenizer's: keys 1 … 128, values 129 … 257
    batch_size: int = 32
    steps: int = 800
    lr: float = 3e-3
    checkpoint_every: int = 200
    test_rows: int = 256

    @property
    def keys(self) -> int:
        return (self.vocab_size - 1) // 2

    def budget(self, base: Budget) -> Budget:
        """The Budget an MQAR cell trains under (tokens_per_param 0: exactly `steps` steps)."""
        return dataclasses.replace(base, batch_size=self.batch_size, seq_len=self.seq_len,
                                   tokens_per_param=0.0, min_steps=self.steps,
                                   checkpoint_every=self.checkpoint_every)


@dataclass(frozen=True)
class Block:
    """archs × sizes × seeds × variants × lrs; lrs empty: the budget's rate per architecture
    (the recall table's for task "mqar")."""

    archs: tuple[str, ...]
    sizes: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = (BASE,)
    lrs: tuple[float, ...] = ()
    task: str = "lm"


@dataclass(frozen=True)
class Cell:
    """One training run with its evaluation; `id` names its folder and its record."""

    arch: str
    size: Size
    seed: int
    variant: str
    lr: float
    task: str = "lm"

    @property
    def id(self) -> str:
        name = f"{self.arch}-{self.size.name}-{self.variant}-lr{self.lr:g}-s{self.seed}"
        return name if self.task == "lm" else f"{self.task}-{name}"


@dataclass(frozen=True)
class Grid:
    name: str
    budget: Budget
    sizes: dict[str, Size]
    blocks: tuple[Block, ...]
    recall: Recall = Recall()

    def cells(self) -> list[Cell]:
        """Every cell once, in block order (a cell named by two blocks runs once)."""
        out: dict[str, Cell] = {}
        for b in self.blocks:
            lrs = b.lrs or (None,)
            for arch in b.archs:
                for size in b.sizes:
                    for variant in b.variants:
                        for lr in lrs:
                            for seed in b.seeds:
                                if lr is None:
                                    lr = self.recall.lr if b.task == "mqar" else self.lr_of(arch)
                                cell = Cell(arch, self.sizes[size], seed, variant, lr, b.task)
                                out.setdefault(cell.id, cell)
        return list(out.values())

    def lr_of(self, arch: str) -> float:
        return float(self.budget.lr_by_arch.get(arch, self.budget.lr))


def parse(values: dict[str, Any], name: str, variants: tuple[str, ...]) -> Grid:
    """A Grid from the TOML's tables: [budget], [sizes.NAME], [[block]]; `variants`: the
    names a block may use besides "base"."""
    unknown = sorted(set(values) - {"name", "budget", "sizes", "block", "recall"})
    if unknown:
        raise ValueError(f"grid {name}: unknown table(s) {', '.join(unknown)}; use name, "
                         "[budget], [sizes.NAME], [recall] and [[block]]")
    budget = _record(Budget, values.get("budget", {}), f"grid {name}: budget.")
    recall = _record(Recall, values.get("recall", {}), f"grid {name}: recall.")
    sizes = {k: _record(Size, {"name": k, **_table(v, f"sizes.{k}", name)},
                        f"grid {name}: sizes.{k}.") for k, v in
             _table(values.get("sizes"), "sizes", name).items()}
    blocks = values.get("block")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"grid {name}: no [[block]] of cells; add one with archs, sizes, "
                         "seeds (and variants, lrs)")
    parsed = tuple(_block(b, i, name) for i, b in enumerate(blocks))
    grid = Grid(str(values.get("name", name)), budget, sizes, parsed, recall)
    check(grid, variants)
    return grid


def _table(value: Any, key: str, name: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"grid {name}: [{key}] must be a table of named entries; got "
                         f"{short(value)}")
    return value


def _record(cls: type, values: dict[str, Any], prefix: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]} is not a field; use one of "
                         f"{', '.join(sorted(known - {'name'}))}")
    check_types(cls, values, prefix)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except TypeError as err:  # a required field left out
        raise ValueError(f"{prefix.rstrip('.')}: {err}") from None


def _block(values: Any, i: int, name: str) -> Block:
    if not isinstance(values, dict):
        raise ValueError(f"grid {name}: block {i + 1} must be a table; got {short(values)}")
    for key in ("archs", "sizes", "seeds", "variants", "lrs"):
        if key in values and not isinstance(values[key], list):
            raise ValueError(f"grid {name}: block {i + 1}.{key} must be a list; got "
                             f"{short(values[key])}")
    return _record(Block, values, f"grid {name}: block {i + 1}.")


def check(grid: Grid, variants: tuple[str, ...]) -> None:
    """One line for the first thing in the grid that cannot run."""
    b = grid.budget
    for key in ("batch_size", "seq_len", "min_steps", "eval_batches", "checkpoint_every"):
        if getattr(b, key) < 1:
            raise ValueError(f"grid {grid.name}: budget.{key} must be ≥ 1; got {getattr(b, key)}")
    for key in ("tokens_per_param", "lr", "max_cell_minutes", *map(str, b.lr_by_arch)):
        value = b.lr_by_arch[key] if key in b.lr_by_arch else getattr(b, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"grid {grid.name}: budget {key} must be a number > 0; got "
                             f"{short(value)}")
    if not 0 <= b.warmup_frac < 1:
        raise ValueError(f"grid {grid.name}: budget.warmup_frac must be in [0, 1)")
    if b.tokenizer not in ("bpe", "byte"):
        raise ValueError(f"grid {grid.name}: budget.tokenizer must be bpe or byte")
    _check_names(grid.name, "budget.lr_by_arch", b.lr_by_arch, ARCHS)
    for size in grid.sizes.values():
        _check_size(grid.name, size)
    _check_recall(grid.name, grid.recall)
    for i, block in enumerate(grid.blocks):
        _check_block(grid, block, f"grid {grid.name}: block {i + 1}", variants)


def _check_size(name: str, size: Size) -> None:
    from retnet.model import RetNetConfig

    try:
        RetNetConfig(d_model=size.d_model, n_layers=size.n_layers, n_heads=size.n_heads)
    except ValueError as err:
        raise ValueError(f"grid {name}: sizes.{size.name}: {err}") from None


def _check_recall(name: str, r: Recall) -> None:
    for key in ("seq_len", "batch_size", "steps", "checkpoint_every", "test_rows"):
        if getattr(r, key) < 1:
            raise ValueError(f"grid {name}: recall.{key} must be ≥ 1; got {getattr(r, key)}")
    if not (math.isfinite(r.lr) and r.lr > 0):
        raise ValueError(f"grid {name}: recall.lr must be a number > 0; got {r.lr}")
    if r.vocab_size < 5:
        raise ValueError(f"grid {name}: recall.vocab_size must be ≥ 5; got {r.vocab_size}")
    if not r.pairs or min(r.pairs) < 1 or max(r.pairs) > r.keys:
        raise ValueError(f"grid {name}: recall.pairs must be numbers within 1 … {r.keys} "
                         f"(the keys vocab_size {r.vocab_size} holds)")
    if 4 * max(r.pairs) > r.seq_len + 1:  # 2n tokens of pairs, then 2n of queries
        raise ValueError(f"grid {name}: recall.seq_len {r.seq_len} cannot hold "
                         f"{max(r.pairs)} pairs and their queries; use seq_len ≥ "
                         f"{4 * max(r.pairs) - 1}")


def _check_block(grid: Grid, block: Block, where: str, variants: tuple[str, ...]) -> None:
    for key, allowed in (("archs", ARCHS), ("sizes", tuple(grid.sizes)),
                         ("variants", (BASE, *variants))):
        _check_names(where, key, getattr(block, key), allowed)
        if not getattr(block, key):
            raise ValueError(f"{where}: {key} is empty")
    if block.task not in TASKS:
        raise ValueError(f"{where}: task {short(block.task)}; choose from {', '.join(TASKS)}")
    if block.task == "mqar" and set(block.variants) != {BASE}:
        raise ValueError(f"{where}: task mqar trains base models only; drop variants")
    if not block.seeds or any(not isinstance(s, int) or s < 0 for s in block.seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers ≥ 0")
    if any(not (isinstance(x, (int, float)) and x > 0) for x in block.lrs):
        raise ValueError(f"{where}: lrs must be numbers > 0; got {list(block.lrs)}")
    if set(block.variants) - {BASE} and set(block.archs) - set(RETNET_ARCHS):
        raise ValueError(f"{where}: variants {', '.join(sorted(set(block.variants) - {BASE}))} "
                         f"are options of RetNet; put {', '.join(set(block.archs) - {'retnet'})} "
                         "in a block of their own")


def _check_names(where: str, key: str, names, allowed: tuple[str, ...]) -> None:
    for n in names:
        if n not in allowed:
            raise ValueError(f"{where}: {key} has {short(n)}; choose from {', '.join(allowed)}")


def load(source: str, variants: tuple[str, ...]) -> Grid:
    """A grid from a .toml file, or a preset's name (`retnet.study.presets`)."""
    from retnet.study.presets import PRESETS

    if source in PRESETS:
        return parse(PRESETS[source], source, variants)
    path = Path(source)
    if path.suffix != ".toml":
        raise ValueError(f"--grid {short(source)}: name a preset ({', '.join(PRESETS)}) or a "
                         ".toml file")
    import tomllib

    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"grid {path} is not valid TOML ({str(err).splitlines()[0]})") from None
    return parse(values, path.stem, variants)
