"""`retnet tokenizer train`: a byte-level BPE trained on the training split of a corpus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retnet.data import load_documents, split_documents
from retnet.options import Range, check_options, opt


@dataclass
class TokenizerOptions:
    """Options of `retnet tokenizer train`."""

    action: str = opt(help="what to do", positional=True, choices=("train",))
    out: str = opt(help="where to write tokenizer.json (its chat template goes beside it)")
    data: str | None = opt(None, "text file, .jsonl, directory or glob (default: the stdlib)")
    text_field: str = opt("text", "JSONL field holding the text")
    vocab_size: int = opt(4096, "BPE vocabulary size (at least the 256 bytes and 2 specials)",
                          bounds=Range(258))

    def __post_init__(self) -> None:
        check_options(self)


def command(opts: TokenizerOptions) -> int:
    """Train a byte-level BPE on the training split of the corpus and save it."""
    from retnet.tokenizer import CHAT_TEMPLATE_FILE, save_chat_template, train_bpe

    out = Path(opts.out)
    # Checked before training: the save would fail on its temporary file only afterwards.
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the file to write, such as "
                         f"{out / 'tokenizer.json'}")
    train_docs, _ = split_documents(load_documents(opts.data, opts.text_field))
    tok = train_bpe((d.text for d in train_docs), opts.vocab_size)
    tok.save(opts.out)
    save_chat_template(out.parent)
    print(f"wrote {opts.out}: {tok.vocab_size} tokens, trained on {len(train_docs)} documents; "
          f"and beside it {out.parent / CHAT_TEMPLATE_FILE} (the default chat template, which "
          "`retnet serve` reads)")
    return 0
