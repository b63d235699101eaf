"""Tokenizers: a zero-setup byte-level one, and byte-level BPE through Hugging Face `tokenizers`.

Both expose encode / decode / vocab_size / eos_id / pad_id / save, and both are saved as a
`tokenizer.json` that `load_tokenizer` reads back.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from retnet.files import atomic_write_text

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BYTE_MARKER = "retnet-byte-tokenizer"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, path: str | Path) -> None: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <|endoftext|> = 256 and <|pad|> = 257."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257
    concatenates = True  # decode(a + b) == decode(a) + decode(b) when a ends a character

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps({"type": BYTE_MARKER, "version": 1}))

    def fingerprint(self) -> str:
        return "byte-v1"


class BPETokenizer:
    """A `tokenizers.Tokenizer` (any tokenizer.json) with <|endoftext|> and <|pad|> ids."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS} token; train one with "
                             "`retnet tokenizer train` or add it as a special token")
        self.eos_id = eos
        self.pad_id = eos if pad is None else pad
        # A byte-level decoder maps tokens to bytes, then bytes to text: decoding concatenates
        # at character boundaries (others may drop or join spaces between tokens).
        self.concatenates = type(tok.decoder).__name__ == "ByteLevel"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.tok.to_str())

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def byte_tokenizer_json() -> str:
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


def train_bpe(texts: Iterator[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with <|endoftext|> and <|pad|>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 specials); "
                         f"got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """`None` or "byte" gives the byte tokenizer; otherwise a tokenizer.json (or its folder)."""
    if path is None or str(path) == "byte":
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; pass a tokenizer.json, its folder, "
                                "or 'byte'")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(_not_a_tokenizer(path, f"not UTF-8 text: byte {err.start}")) from None
    except json.JSONDecodeError as err:
        raise ValueError(_not_a_tokenizer(path, f"not valid JSON: {err}")) from None
    if not isinstance(data, dict):
        raise ValueError(_not_a_tokenizer(path, f"a JSON {type(data).__name__}, not an object"))
    if data.get("type") == BYTE_MARKER:
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception ("Model missing. at line 1")
        raise ValueError(_not_a_tokenizer(path, str(err).splitlines()[0])) from None
    return BPETokenizer(tok)


def _not_a_tokenizer(path: Path, why: str) -> str:
    return (f"{path} is not a tokenizer file ({why}); pass a tokenizer.json written by "
            "`retnet tokenizer train` (or its folder), or 'byte'")


# A role-tagged chat template, saved beside tokenizer.json as chat_template.json.
DEFAULT_CHAT_TEMPLATE = {"message": "<|{role}|>\n{content}\n",
                         "generation_prompt": "<|assistant|>\n"}
CHAT_TEMPLATE_FILE = "chat_template.json"


def save_chat_template(folder: str | Path, template: dict[str, str] | None = None) -> None:
    atomic_write_text(Path(folder) / CHAT_TEMPLATE_FILE,
                       json.dumps(template or DEFAULT_CHAT_TEMPLATE, indent=1))


def load_chat_template(folder: str | Path) -> dict[str, str]:
    path = Path(folder) / CHAT_TEMPLATE_FILE
    return read_chat_template(path) if path.is_file() else dict(DEFAULT_CHAT_TEMPLATE)


def read_chat_template(path: str | Path) -> dict[str, str]:
    """A chat template file: JSON {"message": "...{role}...{content}...", "generation_prompt":
    "..."}. Each message is rendered on its own, so token counts at message ends are exact
    (the server caches states there); a Jinja template over the whole conversation cannot
    promise that and is refused."""
    try:
        template = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read chat template {path}: {err}; it must be JSON with "
                         "'message' and 'generation_prompt' strings (Jinja is not "
                         "supported)") from None
    if not (isinstance(template, dict) and {"message", "generation_prompt"} <= set(template)
            and all(isinstance(template[k], str) for k in ("message", "generation_prompt"))):
        raise ValueError(f"{path} needs 'message' and 'generation_prompt' strings")
    chat_template_jinja(template)  # the message may use only {role} and {content}
    return template


def render_chat(messages: list[dict], tokenizer: Tokenizer, template: dict[str, str]
                ) -> tuple[list[int], list[int]]:
    """Chat messages → (prompt ids, the token count after each message), with the template's
    generation prompt at the end: what the server reads for /v1/chat/completions and
    `retnet generate --chat` for one user message. Messages are tokenised one by one and
    concatenated, so the count at each message boundary is exact: the server stores prefix
    states there, and the next turn of the same conversation reuses them."""
    ids: list[int] = []
    ends = []
    for m in messages:
        ids += tokenizer.encode(template["message"].format(role=m["role"], content=m["content"]))
        ends.append(len(ids))
    ids += tokenizer.encode(template["generation_prompt"])
    return ids, ends


def chat_template_jinja(template: dict[str, str]) -> str:
    """retnet's chat template (`message` formats each message with str.format fields {role}
    and {content}; `generation_prompt` is literal text) as the Jinja string that transformers'
    apply_chat_template renders to the same text. Literals become quoted Jinja strings, so no
    character in them is read as Jinja and no newline is trimmed."""
    pieces = []
    for literal, field, spec, conversion in string.Formatter().parse(template["message"]):
        if literal:
            pieces.append(json.dumps(literal))
        if field is None:
            continue
        if field not in ("role", "content") or spec or conversion:
            raise ValueError(f"chat template field {{{field}}} cannot be exported: the message "
                             "template may use only {role} and {content}")
        pieces.append(f"message['{field}']")
    message = "{{ " + " + ".join(pieces) + " }}" if pieces else ""
    prompt = template["generation_prompt"]
    prompt = "{{ " + json.dumps(prompt) + " }}" if prompt else ""
    return ("{% for message in messages %}" + message + "{% endfor %}"
            "{% if add_generation_prompt %}" + prompt + "{% endif %}")


