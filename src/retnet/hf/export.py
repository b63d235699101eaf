"""Our checkpoints as transformers folders: weights (safetensors), config.json with auto_map,
the self-contained remote code (`retnet.hf.bundle`), a tokenizer with the chat template that
`AutoTokenizer` loads in transformers 4.x and 5.x, and a model card. The folder loads after
`import retnet.hf`, or without retnet with `trust_remote_code=True`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retnet.files import staged_folder
from retnet.options import opt
from retnet.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    PAD,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    byte_tokenizer_json,
    chat_template_jinja,
    load_chat_template,
)

if TYPE_CHECKING:
    from retnet.hf.modeling import RetNetForCausalLM


def hf_tokenizer(tokenizer: Tokenizer):
    """A transformers PreTrainedTokenizerFast with our eos/pad tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        inner = HFTokenizer.from_str(byte_tokenizer_json())
    elif isinstance(tokenizer, BPETokenizer):
        inner = tokenizer.tok
    else:
        raise ValueError(f"cannot convert a {type(tokenizer).__name__} for transformers")
    pad = PAD if inner.token_to_id(PAD) is not None else EOS
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=EOS, pad_token=pad,
                                   bos_token=EOS, padding_side="left")


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path,
                      chat_template: dict[str, str] | None = None) -> None:
    """The tokenizer files, with `chat_template` (retnet's default when None) in
    tokenizer_config.json."""
    tok = hf_tokenizer(tokenizer)
    tok.save_pretrained(str(folder))
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # An explicit class name lets every transformers version pick the fast tokenizer.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Written into the JSON by hand: transformers versions differ in where they save a template.
    config["chat_template"] = chat_template_jinja(chat_template or DEFAULT_CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=1))


def export_model(model: RetNetForCausalLM, tokenizer: Tokenizer, out: str | Path, *,
                 meta: dict[str, Any] | None = None,
                 chat_template: dict[str, str] | None = None) -> Path:
    """Write a RetNetForCausalLM, its tokenizer and a model card to the folder `out`.
    `meta`: the checkpoint's meta.json (training data and metrics for the card)."""
    from retnet.hf.bundle import remote_code, write_remote_code
    from retnet.hf.card import model_card

    code = remote_code()  # first: a source that cannot be bundled fails before any writing
    out = Path(out)
    # Staged beside OUT and moved in at the end: a full disk leaves no partial config.json
    # or weights in OUT, and an earlier export there stays whole.
    with staged_folder(out) as folder:
        model.save_pretrained(str(folder))  # safetensors, config.json, generation_config.json
        _finish_config(folder / "config.json", model)
        write_remote_code(folder, code)
        save_hf_tokenizer(tokenizer, folder, chat_template)
        (folder / "README.md").write_text(model_card(model.model, meta or {}), encoding="utf-8")
    return out


def _finish_config(path: Path, model: RetNetForCausalLM) -> None:
    """config.json as save_pretrained wrote it, plus auto_map and the explicit tie flag."""
    from retnet.hf.bundle import AUTO_MAP

    config = json.loads(path.read_text())
    config["auto_map"] = AUTO_MAP
    # transformers 4.x leaves out values equal to its defaults (tie_word_embeddings=True)
    config["tie_word_embeddings"] = model.config.tie_word_embeddings
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class ExportOptions:
    """Options of `retnet export`."""

    hf: list[str] = opt(help="write a transformers folder with its own code "
                        "(AutoModelForCausalLM with trust_remote_code=True, or after import "
                        "retnet.hf)", nargs=2, metavar=("CHECKPOINT", "OUT"))


def command(opts: ExportOptions) -> int:
    out = export_checkpoint(*opts.hf)
    print(f"wrote {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True), or after `import retnet.hf` without it")
    return 0


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`retnet export --hf CKPT DIR`: a folder that AutoModelForCausalLM and AutoTokenizer load,
    after `import retnet.hf` or with trust_remote_code=True (no retnet needed)."""
    from retnet.checkpoint import load_checkpoint
    from retnet.hf.configuration import RetNetHFConfig
    from retnet.hf.modeling import RetNetForCausalLM

    ckpt = load_checkpoint(checkpoint)
    tok = ckpt.tokenizer
    config = RetNetHFConfig.from_retnet(ckpt.config, eos_token_id=tok.eos_id,
                                        pad_token_id=tok.pad_id, bos_token_id=tok.eos_id)
    model = RetNetForCausalLM(config)
    model.model.load_state_dict(ckpt.weights)
    return export_model(model, tok, out, meta=ckpt.meta,
                        chat_template=load_chat_template(ckpt.path))
