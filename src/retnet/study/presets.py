"""Named grids, in the TOML file's shape (`retnet study --grid NAME`): "quick" for the tests,
"cpu" for the recorded study on two CPU cores (issue #38 items 3, 4 and 6), "gpu" the same
study at sizes a GPU trains in hours. Print one as TOML to edit it: --print-grid."""

from __future__ import annotations

from typing import Any

# Every family's sizes; RetNet non-embedding parameters ≈ 12·d²·L (0.20M … 2.16M here: 11×,
# the issue's ≥ 10× at the least 2-core time: the largest size's cells cost most of it).
CPU_SIZES = {"s1": {"d_model": 64, "n_layers": 4}, "s2": {"d_model": 96, "n_layers": 4},
             "s3": {"d_model": 128, "n_layers": 6}, "s4": {"d_model": 160, "n_layers": 7}}
# MQAR models: two layers (the recall literature's depth) at two widths.
RECALL_SIZES = {"r1": {"d_model": 32, "n_layers": 2}, "r2": {"d_model": 64, "n_layers": 2}}
ABLATIONS = ["base", "no-gate", "no-groupnorm", "single-decay", "no-decay", "small-heads"]
RIVALS = ["mamba", "mamba2", "rwkv", "linear"]

PRESETS: dict[str, dict[str, Any]] = {
    # Two sizes, one seed, three architectures, a few steps each: the test of the whole path.
    "quick": {
        "budget": {"batch_size": 4, "seq_len": 32, "tokens_per_param": 1e-3, "min_steps": 6,
                   "eval_batches": 2, "checkpoint_every": 3, "tokenizer": "byte",
                   "warmup_frac": 0.2},
        "sizes": {"q1": {"d_model": 32, "n_layers": 1}, "q2": {"d_model": 64, "n_layers": 1}},
        "recall": {"seq_len": 16, "pairs": [2, 4], "vocab_size": 34, "batch_size": 4,
                   "steps": 4, "checkpoint_every": 2, "test_rows": 8},
        "block": [{"archs": ["retnet", "llama", "linear"], "sizes": ["q1", "q2"],
                   "seeds": [0]},
                  {"archs": ["retnet", "llama"], "sizes": ["q1"], "seeds": [0],
                   "task": "mqar"}],
    },
    # The recorded CPU study: about 10 hours of 2-core time in all (run it in pieces: it resumes).
    "cpu": {
        "budget": {"batch_size": 8, "seq_len": 128, "tokens_per_param": 2.0, "min_steps": 200,
                   "eval_batches": 8, "checkpoint_every": 100, "vocab_size": 1024,
                   "max_cell_minutes": 60.0,
                   # each family's lowest validation loss in the sweep below (recorded in
                   # docs/study; every one inside the rates tried)
                   "lr_by_arch": {"retnet": 8e-3, "llama": 4e-3, "mamba": 1.6e-2,
                                  "mamba2": 1.6e-2, "rwkv": 8e-3, "linear": 1.6e-2}},
        "sizes": {**CPU_SIZES, **RECALL_SIZES},
        # 32 keys, 33 values: small enough that two-layer attention learns the task in 1,500
        # steps (with 128 keys it had not begun to after 800)
        "recall": {"seq_len": 64, "pairs": [2, 4, 8, 16], "vocab_size": 66, "batch_size": 32,
                   "steps": 1500, "lr": 3e-3, "checkpoint_every": 250, "test_rows": 256},
        "block": [
            # learning-rate sweep per family at the smallest size (issue item 3)
            {"archs": ["retnet", "llama", *RIVALS], "sizes": ["s1"], "seeds": [0],
             "lrs": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]},
            # ... one doubling further where the lowest loss was at 1.6e-2
            {"archs": ["mamba", "mamba2", "linear"], "sizes": ["s1"], "seeds": [0],
             "lrs": [3.2e-2]},
            # scaling: RetNet and the matched Llama, four sizes (11×), three seeds; the largest
            # size last (its six cells are half of the study's time), so that a study cut short
            # has every other reading
            {"archs": ["retnet", "llama"], "sizes": ["s1", "s2", "s3"], "seeds": [0, 1, 2]},
            # does the rate chosen at s1 still suit s3? each at half its rate there, seed 0
            {"archs": ["retnet"], "sizes": ["s3"], "seeds": [0], "lrs": [4e-3]},
            {"archs": ["llama"], "sizes": ["s3"], "seeds": [0], "lrs": [2e-3]},
            # the efficient rivals: two sizes, two seeds
            {"archs": RIVALS, "sizes": ["s1", "s2"], "seeds": [0, 1]},
            # ablations (paper Table 6): one size, three seeds (s2: 15 cells of s3 would take
            # a quarter of the 10-hour budget)
            {"archs": ["retnet"], "sizes": ["s2"], "seeds": [0, 1, 2], "variants": ABLATIONS},
            # recall (MQAR): every architecture at two widths
            {"archs": ["retnet", "llama", *RIVALS], "sizes": list(RECALL_SIZES), "seeds": [0],
             "task": "mqar"},
            {"archs": ["retnet", "llama"], "sizes": ["s4"], "seeds": [0, 1, 2]},
        ],
    },
    # The same study where a GPU makes 10–100× larger models cheap (--device cuda).
    "gpu": {
        "budget": {"batch_size": 32, "seq_len": 512, "tokens_per_param": 20.0,
                   "min_steps": 500, "eval_batches": 16, "checkpoint_every": 500,
                   "vocab_size": 8192, "max_cell_minutes": 240.0},
        "sizes": {"m1": {"d_model": 256, "n_layers": 6, "n_heads": 2},
                  "m2": {"d_model": 384, "n_layers": 8, "n_heads": 3},
                  "m3": {"d_model": 512, "n_layers": 12, "n_heads": 4},
                  "m4": {"d_model": 768, "n_layers": 16, "n_heads": 6},
                  "r1": {"d_model": 64, "n_layers": 2}, "r2": {"d_model": 128, "n_layers": 2},
                  "r3": {"d_model": 256, "n_layers": 2}},
        # Zoology's setting: 8,192 tokens, up to 64 pairs in 256 positions
        "recall": {"seq_len": 256, "pairs": [4, 8, 16, 32, 64], "vocab_size": 8192,
                   "batch_size": 64, "steps": 20000, "lr": 1e-3, "checkpoint_every": 2000,
                   "test_rows": 1000},
        "block": [
            {"archs": ["retnet", "llama", *RIVALS], "sizes": ["m1"], "seeds": [0],
             "lrs": [5e-4, 1e-3, 2e-3]},
            {"archs": ["retnet", "llama"], "sizes": ["m1", "m2", "m3", "m4"], "seeds": [0, 1, 2]},
            {"archs": RIVALS, "sizes": ["m1", "m2"], "seeds": [0, 1]},
            {"archs": ["retnet"], "sizes": ["m2"], "seeds": [0, 1, 2], "variants": ABLATIONS},
            {"archs": ["retnet", "llama", *RIVALS], "sizes": ["r1", "r2", "r3"], "seeds": [0],
             "task": "mqar"},
        ],
    },
}


def to_toml(values: dict[str, Any]) -> str:
    """A preset as TOML text, to copy and edit (tables of scalars and lists only)."""
    lines = []
    if values.get("budget"):
        lines += ["[budget]", *(f"{k} = {_value(v)}" for k, v in values["budget"].items()), ""]
    for name, size in values["sizes"].items():
        lines += [f"[sizes.{name}]", *(f"{k} = {_value(v)}" for k, v in size.items()), ""]
    if values.get("recall"):
        lines += ["[recall]", *(f"{k} = {_value(v)}" for k, v in values["recall"].items()), ""]
    for block in values["block"]:
        lines += ["[[block]]", *(f"{k} = {_value(v)}" for k, v in block.items()), ""]
    return "\n".join(lines)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    return repr(v)
