"""Training text held in memory: the default corpus (the Python standard library) or any
corpus `retnet.corpus` reads, as documents; tokenised once into a memory-mapped cache; served
as packed windows of seq_len + 1 tokens.

Batches are a pure function of (seed, step, rank): resuming at step s sees exactly the data an
uninterrupted run would, and ranks of a distributed run see disjoint rows of one global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from retnet.corpus import sources
from retnet.tokenizer import Tokenizer

VAL_PER_MILLE = 20  # 2% of documents, chosen by a hash of their name
# a corpus of one document (a text file) validates on its tail: a tenth leaves a small file
# a validation window or two
LONE_VAL_SHARE = 0.1


@dataclass(frozen=True)
class Document:
    name: str  # a stable name: relative path, path:line (JSONL), path#row, ...#tail
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Document]:
    """Every .py file of the running interpreter's standard library (pydoc_data/topics.py
    included), sorted by relative path, without site-packages or dist-packages."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        # Some stdlib files are deliberately not valid UTF-8 (test data): replace, don't fail.
        docs.append(Document(rel.as_posix(), path.read_bytes().decode("utf-8", "replace")))
    return docs


def load_documents(source: str | None, text_field: str = "text") -> list[Document]:
    """Every non-empty document of a corpus held in memory, read by `retnet.corpus.sources`
    (the reader `retnet data prepare` streams): one document per file, JSONL record or
    Parquet/`datasets` row; None: the standard library.

    Args:
        source: a text file, .jsonl(.gz/.zst), .parquet, a `datasets` folder, a directory or a
            glob (see `sources.files_of`).
        text_field: the JSONL field (Parquet, `datasets` column) holding the text.
    Returns: the documents in the order read; names inside a directory are relative to it, so
    the hash split does not depend on how the directory is spelled."""
    if source is None:
        return stdlib_documents()
    root = Path(source)
    folder = root.is_dir() and not sources.is_datasets_folder(root)
    inside = f"{root.as_posix()}/" if folder else ""
    docs, replaced = [], 0
    for item in sources.items(sources.files_of([source]), text_field):
        text, bad = sources.to_text(item)
        replaced += bad
        if text.strip():
            docs.append(Document(item.name.removeprefix(inside), text))
    if not docs:
        raise ValueError(f"the data at {source!r} holds no text")
    if replaced:
        print(f"warning: {replaced:,} invalid UTF-8 byte sequences were replaced by U+FFFD",
              file=sys.stderr)
    return docs


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, validation), decided by a hash of each document's name: stable as data grows.
    A corpus of one document (a text file) holds out its tail; one whose names all fall in
    training, its last document."""
    if len(docs) == 1:
        return _split_lone(docs[0])

    def is_val(d: Document) -> bool:
        return int(hashlib.sha256(d.name.encode()).hexdigest()[:8], 16) % 1000 < VAL_PER_MILLE

    train = [d for d in docs if not is_val(d)]
    val = [d for d in docs if is_val(d)]
    if not val:  # tiny corpora: hold out the last document
        train, val = train[:-1] or train, train[-1:]
    return train, val


def _split_lone(doc: Document) -> tuple[list[Document], list[Document]]:
    """A lone document's head for training and its last LONE_VAL_SHARE, from a line start
    when there is one, for validation."""
    at = int(len(doc.text) * (1 - LONE_VAL_SHARE))
    cut = doc.text.rfind("\n", 0, at) + 1 or at
    return [Document(doc.name, doc.text[:cut])], [Document(f"{doc.name}#tail", doc.text[cut:])]


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("RETNET_CACHE", Path.home() / ".cache" / "retnet"))


BAR_ABOVE_CHARS = 1 << 20  # inputs smaller than this finish before a bar would say anything
GROUP_CHARS = 1 << 22  # texts encoded per call: the bar moves, batches stay large


def encode_all(texts: list[str], tokenizer: Tokenizer, desc: str) -> list[list[int]]:
    """Every text's ids, in groups of ~4 M characters (each one `encode_batch` call, which a
    BPE tokenizer runs on every core) under a progress bar with rate and ETA."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    total = sum(map(len, texts))
    ids: list[list[int]] = []
    with tqdm(total=total, desc=desc, unit="char", unit_scale=True, dynamic_ncols=True,
              disable=total < BAR_ABOVE_CHARS) as bar:
        start = 0
        while start < len(texts):
            end, size = start, 0
            while end < len(texts) and (size < GROUP_CHARS or end == start):
                size += len(texts[end])
                end += 1
            group = texts[start:end]
            ids += encode_batch(group) if encode_batch else [tokenizer.encode(t) for t in group]
            bar.update(size)
            start = end
    return ids


def tokenize(docs: list[Document], tokenizer: Tokenizer, name: str) -> tuple[np.ndarray, dict]:
    """All documents as one token array, each followed by <|endoftext|>; cached on disk as a
    memory map keyed by the text and the tokenizer, so a second run starts at once."""
    key = hashlib.sha256(f"{corpus_fingerprint(docs)}|{tokenizer.fingerprint()}".encode())
    stem = cache_dir() / f"{name}-{key.hexdigest()[:16]}"
    meta_path, bin_path = stem.with_suffix(".json"), stem.with_suffix(".bin")
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],)), meta
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    texts = [d.text for d in docs]
    ids = encode_all(texts, tokenizer, f"tokenizing {name}")
    arrays = [np.asarray([*x, tokenizer.eos_id], dtype=dtype) for x in ids]
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    meta = {"tokens": int(tokens.size), "dtype": np.dtype(dtype).name, "documents": len(docs),
            "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_suffix(f".tmp{os.getpid()}")
    tokens.tofile(tmp)
    os.replace(tmp, bin_path)
    meta_path.with_suffix(f".tmp{os.getpid()}").write_text(json.dumps(meta))
    os.replace(meta_path.with_suffix(f".tmp{os.getpid()}"), meta_path)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens.size,)), meta


class PackedWindows:
    """Windows of seq_len + 1 consecutive tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "corpus") -> None:
        if tokens.size < seq_len + 1:
            raise ValueError(f"the {what} has {tokens.size} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; add text or lower --seq-len")
        self.tokens, self.seq_len = tokens, seq_len
        self.n_starts = tokens.size - seq_len

    def _gather(self, starts: np.ndarray) -> torch.Tensor:
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return torch.from_numpy(rows.astype(np.int64))  # [rows, seq_len + 1]

    def batch(self, seed: int, step: int, rows: int, rank: int = 0, world: int = 1
              ) -> torch.Tensor:
        """Global batch of rows·world random windows for (seed, step); this rank's rows."""
        g = np.random.default_rng([seed, step])
        starts = g.integers(0, self.n_starts, size=rows * world)
        return self._gather(starts[rank * rows:(rank + 1) * rows])

    def evaluation_batches(self, rows: int, n_batches: int) -> list[torch.Tensor]:
        """Fixed, evenly spaced windows (the same for every evaluation)."""
        count = min(rows * n_batches, max(1, self.n_starts // self.seq_len))
        starts = np.linspace(0, self.n_starts - 1, count).astype(np.int64)
        return [self._gather(starts[i:i + rows]) for i in range(0, count, rows)]


def describe_default_corpus() -> dict:
    return {"source": "python-stdlib", "python": sys.version.split()[0],
            "root": str(stdlib_root())}
