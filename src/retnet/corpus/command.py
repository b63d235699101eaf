"""`retnet data prepare SRC... --out DIR` (tokenise once, for many runs) and `retnet data info
DIR` (counts, token histogram summary, a decoded window with document boundaries marked)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retnet.options import AT_LEAST_ONE, check_options, opt

BOUNDARY = "\n⟦document⟧\n"  # how `info` marks a document start in its sample window


@dataclass
class DataOptions:
    """Options of `retnet data`."""

    action: str = opt(help="prepare: tokenise SRC into DIR; info: describe DIR",
                      positional=True, choices=("prepare", "info"))
    paths: list[str] = opt(help="prepare: inputs (text files, .jsonl(.gz/.zst), .parquet, a "
                           "datasets folder, directories, globs); info: the prepared DIR",
                           positional=True, metavar="PATH")
    out: str | None = opt(None, "prepare: the folder to write shards, index and manifest to")
    tokenizer: str = opt("byte", '"byte" or a tokenizer.json (`retnet tokenizer train`)')
    text_field: str = opt("text", "the JSONL field (Parquet, datasets column) holding the text")
    workers: int | None = opt(None, "tokenising processes (default: the core count)",
                              bounds=AT_LEAST_ONE)
    shard_bytes: int = opt(32 << 20, "source bytes per shard (what an interruption can lose)",
                           bounds=AT_LEAST_ONE)
    window: int = opt(256, "info: tokens in the sample window", bounds=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_options(self)
        if self.action == "prepare" and not self.out:
            raise ValueError("retnet data prepare needs --out DIR (where the shards go)")
        if self.action == "info" and len(self.paths) != 1:
            raise ValueError("retnet data info takes one prepared corpus folder")


def command(opts: DataOptions) -> int:
    from retnet.corpus import Corpus, prepare
    from retnet.tokenizer import load_tokenizer

    if opts.action == "info":
        corpus, tok = Corpus(opts.paths[0]), load_tokenizer(opts.tokenizer)
        same = tok.fingerprint() == corpus.manifest["tokenizer"]
        print(describe(corpus, opts.window, tok if same else None))
        return 0
    corpus = prepare(opts.paths, opts.out, load_tokenizer(opts.tokenizer),
                     text_field=opts.text_field, workers=opts.workers,
                     shard_bytes=opts.shard_bytes)
    m = corpus.manifest
    print(f"{corpus.directory}: {m['documents']:,} documents, {m['tokens']:,} tokens "
          f"({m['dtype']}) in {len(corpus.shards)} shards from {m['bytes']:,} bytes")
    return 0


def describe(corpus, window: int, tokenizer=None) -> str:
    """Counts, document lengths in tokens, the most frequent tokens, and the first window
    decoded (by `tokenizer`, when given) with each document start marked."""
    m = corpus.manifest
    q = np.percentile(np.diff(corpus.starts), [0, 50, 90, 100]).astype(int)
    sample = corpus.read(0, min(corpus.tokens, 1 << 20))
    counts = np.bincount(sample, minlength=1)
    top = np.argsort(counts)[::-1][:5]
    lines = [f"{corpus.directory}: {m['documents']:,} documents, {m['tokens']:,} tokens "
             f"({m['dtype']}, vocabulary {m['vocab_size']:,}), {len(corpus.shards)} shards, "
             f"{m['bytes']:,} source bytes, {m['replaced']:,} replaced byte sequences",
             f"tokenizer {m['tokenizer']}; inputs: {' '.join(m['inputs'])}",
             f"document length in tokens: min {q[0]:,}, median {q[1]:,}, 90% {q[2]:,}, "
             f"max {q[3]:,}",
             "most frequent token ids (of the first 1M tokens): "
             + ", ".join(f"{int(t)} ({counts[t] / sample.size:.1%})" for t in top)]
    hi = min(corpus.tokens, window)
    ids, resets = corpus.read(0, hi), corpus.resets(0, hi)
    if tokenizer is None:
        return "\n".join([*lines, "(pass the --tokenizer that prepared it to see a window)"])
    parts = np.split(ids, np.flatnonzero(resets))
    texts = [tokenizer.decode([int(t) for t in part if t != m["eos_id"]]) for part in parts]
    return "\n".join([*lines, f"first {hi} tokens ({BOUNDARY.strip()} marks a document start):",
                      BOUNDARY.join(texts)])
