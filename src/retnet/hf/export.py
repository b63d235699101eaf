"""Our checkpoints as transformers folders: weights (safetensors), config, and a tokenizer that
`AutoTokenizer` loads in transformers 4.x and 5.x."""

from __future__ import annotations

import json
from pathlib import Path

from retnet.tokenizer import EOS, PAD, BPETokenizer, ByteTokenizer, Tokenizer


def _byte_tokenizer_json() -> str:
    """The byte tokenizer as a `tokenizers` file: byte-level BPE with no merges whose ids are the
    raw byte values (so encodings are identical), plus <|endoftext|> = 256, <|pad|> = 257."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, used by ByteLevel."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def hf_tokenizer(tokenizer: Tokenizer):
    """A transformers PreTrainedTokenizerFast with our eos/pad tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        inner = HFTokenizer.from_str(_byte_tokenizer_json())
    elif isinstance(tokenizer, BPETokenizer):
        inner = tokenizer.tok
    else:
        raise ValueError(f"cannot convert a {type(tokenizer).__name__} for transformers")
    pad = PAD if inner.token_to_id(PAD) is not None else EOS
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=EOS, pad_token=pad,
                                   bos_token=EOS, padding_side="left")


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> None:
    tok = hf_tokenizer(tokenizer)
    tok.save_pretrained(str(folder))
    # An explicit class name lets every transformers version pick the fast tokenizer.
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1))


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`retnet export --hf CKPT DIR`: a folder that AutoModelForCausalLM and AutoTokenizer load
    (after `import retnet.hf`)."""
    from retnet.checkpoint import load_checkpoint
    from retnet.hf.modeling import RetNetForCausalLM, RetNetHFConfig

    ckpt = load_checkpoint(checkpoint)
    tok = ckpt.tokenizer
    config = RetNetHFConfig.from_retnet(ckpt.config, eos_token_id=tok.eos_id,
                                        pad_token_id=tok.pad_id, bos_token_id=tok.eos_id)
    model = RetNetForCausalLM(config)
    model.model.load_state_dict(ckpt.weights)
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    save_hf_tokenizer(tok, out)
    return out
