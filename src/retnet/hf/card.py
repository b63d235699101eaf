"""The README.md model card of an exported folder: how to load it, the architecture, the
parameter count, and the training data and metrics the checkpoint's meta.json records."""

from __future__ import annotations

from typing import Any

from retnet import __version__
from retnet.model import RetNetLM

# meta.json keys that describe the data; everything train.py and convert.py write.
DATA_KEYS = ("corpus", "python_corpus", "documents", "train_tokens", "val_tokens",
             "converted_from", "source")
# Final metrics, whether under "metrics" or at the top level (train()'s result keys).
METRIC_KEYS = ("loss", "val_loss", "val_ppl", "val_bpb")

USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

PATH = "path/to/this/folder"  # or its Hub repository id
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True).input_ids
out = model.generate(ids, max_new_tokens=40, do_sample=False)
```

`trust_remote_code=True` runs `configuration_retnet.py` and `modeling_retnet.py` from this
folder: they were generated from the source of retnet {version} when it was exported and import
only torch and transformers. With retnet installed, `import retnet.hf` registers the same model
and `from_pretrained(PATH)` needs no remote code. `generate()` carries RetNet's O(1) recurrent
state (`retnet_cache`, not `past_key_values`); greedy, sampling and beam search work, assisted and
prompt-lookup decoding do not (a RetNet state cannot be rolled back past rejected tokens).'''


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = f"`{value}`" if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")  # a bare | would end the table cell


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "|---|---|",
            *(f"| {k} | {_value(v)} |" for k, v in rows)]


def _flat(meta: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(key, value) for each key present; a dict value becomes one row per entry."""
    rows = []
    for key in keys:
        value = meta.get(key)
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in value.items()]
        elif value is not None:
            rows.append((key, value))
    return rows


def _model_section(model: RetNetLM) -> list[str]:
    c = model.config
    rows = [("parameters", model.num_parameters()),
            ("non-embedding parameters", model.num_parameters(embeddings=False)),
            ("state per sequence (float32 bytes)", c.state_bytes_per_sequence),
            ("key head dim K", c.key_head_dim), ("value head dim V", c.value_head_dim),
            *c.to_dict().items(), ("config fingerprint", c.fingerprint())]
    return ["## Model", "", *_table(rows, ("field", "value"))]


def _meta_sections(meta: dict[str, Any]) -> list[str]:
    lines = []
    data = _flat(meta, DATA_KEYS)
    if data:
        lines += ["", "## Training data", "", *_table(data, ("field", "value"))]
    training = _flat(meta, ("step", "train_config"))
    if training:
        lines += ["", "## Training", "", *_table(training, ("field", "value"))]
    metrics = {**{k: meta[k] for k in METRIC_KEYS if k in meta}, **(meta.get("metrics") or {})}
    if metrics:
        lines += ["", "## Metrics", "", *_table(list(metrics.items()), ("metric", "value"))]
    return lines + _lineage_section(meta.get("init_from")) + _finetune_section(meta)


def _lineage_section(origin: dict[str, Any] | None) -> list[str]:
    """`retnet train --init-from`: the chain of sources the weights came from, nearest first,
    so a reader sees what this model was fine-tuned from (and that from what)."""
    if not origin:
        return []
    rows, depth = [], 0
    while origin:
        depth += 1
        fields = ", ".join(f"{k}={v}" for k, v in origin.items() if k != "parent")
        rows.append((depth, fields))
        origin = origin.get("parent")
    return ["", "## Lineage", "", "Initialised from (nearest first):", "",
            *_table(rows, ("generation", "source"))]


def _finetune_section(meta: dict[str, Any]) -> list[str]:
    """The fine-tuning record (SFT on chat data, LoRA rank, alpha and targets)."""
    record = meta.get("finetune")
    if not record:
        return []
    lora = record.get("lora") or {}
    rows = [("sft (loss on assistant tokens)", bool(record.get("sft"))),
            ("lora", bool(lora)), *((f"lora {k}", v) for k, v in lora.items())]
    return ["", "## Fine-tuning", "", *_table(rows, ("field", "value"))]


def model_card(model: RetNetLM, meta: dict[str, Any]) -> str:
    """README.md text for an exported `model` trained as `meta` (a checkpoint's meta.json)."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- retnet", "- custom_code", "---", "",
             "# RetNet language model", "",
             "A Retentive Network (Sun et al. 2023, arXiv:2307.08621) exported by "
             f"`retnet export --hf` (retnet {__version__}).", "",
             "## Use", "", USAGE.format(version=__version__), "", *_model_section(model),
             *_meta_sections(meta)]
    return "\n".join(lines) + "\n"
