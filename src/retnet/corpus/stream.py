"""Streamed tokenisation: one pass over the inputs with N worker processes, in order, a few
batches in flight at a time (memory stays bounded whatever the corpus size), into shards of
about `shard_bytes` of source text each. Completed shards survive an interruption and are
kept by the next run; an unchanged corpus is not tokenised again."""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retnet.corpus import sources
from retnet.corpus.shards import (
    FORMAT,
    MANIFEST,
    Corpus,
    complete_shards,
    remove_stale,
    token_dtype,
    write_shard,
)
from retnet.files import atomic_write_text

SHARD_BYTES = 32 << 20  # source bytes per shard: what an interruption can cost
BATCH_BYTES = 1 << 20  # source bytes per worker task: large enough to amortise the pickling
BAR_BYTES = 1 << 20  # smaller inputs finish before a progress bar would say anything
_tokenizer = None  # a worker's tokenizer, set once by `_init`


def _init(tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    # one thread per worker: the processes are the parallelism (a BPE's encode_batch would
    # otherwise start a thread per core in every worker and oversubscribe the machine)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def encode_batch(batch: list[sources.Item], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """A batch of items → (its documents' tokens, each followed by <|endoftext|>, concatenated;
    int64 [items, 3]: tokens, source bytes, replaced byte sequences). An empty document has 0
    tokens (it is skipped, but still counted as an item so a resumed run can skip it)."""
    tok = tokenizer or _tokenizer
    texts, stats = [], np.zeros((len(batch), 3), np.int64)
    for i, item in enumerate(batch):
        text, replaced = sources.to_text(item)
        stats[i, 1:] = len(item.raw) if isinstance(item.raw, bytes) else len(text.encode()), \
            replaced
        texts.append(text if text.strip() else None)
    present = [t for t in texts if t is not None]
    batch_fn = getattr(tok, "encode_batch", None)
    ids = batch_fn(present) if batch_fn else [tok.encode(t) for t in present]
    dtype = token_dtype(tok.vocab_size)
    arrays, it = [], iter(ids)
    for i, text in enumerate(texts):
        if text is not None:
            arrays.append(np.asarray([*next(it), tok.eos_id], dtype=dtype))
            stats[i, 0] = arrays[-1].size
    return (np.concatenate(arrays) if arrays else np.zeros(0, dtype)), stats


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One worker is one core: the BPE's encode_batch in this process would otherwise start a
    thread per core (so `--workers 1` would use them all and `--workers N` would not be N× it)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _batches(stream: Iterator[sources.Item]) -> Iterator[list[sources.Item]]:
    batch, size = [], 0
    for item in stream:
        batch.append(item)
        size += len(item.raw)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(batches: Iterator[list], tokenizer, workers: int) -> Iterator[tuple]:
    """Encoded batches in input order; at most 2 per worker in flight (bounded memory)."""
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    if workers <= 1 or len(head) < 2:  # one batch: starting processes would cost more
        with _one_thread() if workers <= 1 else contextlib.nullcontext():
            yield from (encode_batch(b, tokenizer) for b in batches)
        return
    # spawn: a forked child would inherit the tokenizers library's thread pool (it deadlocks)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _ShardBuilder:
    """Collects encoded documents and writes a shard each time `shard_bytes` is reached."""

    def __init__(self, out: Path, key: str, shard_bytes: int, done: list[dict]) -> None:
        self.out, self.key, self.shard_bytes, self.records = out, key, shard_bytes, done
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.items = self.bytes = self.replaced = 0

    def add(self, tokens: np.ndarray, stats: np.ndarray) -> None:
        at = 0
        for row in stats:  # per item, so shard edges do not depend on the batching
            n = int(row[0])
            if n:
                self.tokens.append(tokens[at:at + n])
                self.docs.append(row[:2])
            at += n
            self.items += 1
            self.bytes += int(row[1])
            self.replaced += int(row[2])
            if self.bytes >= self.shard_bytes:
                self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.uint16)
        docs = np.stack(self.docs) if self.docs else np.zeros((0, 2), np.int64)
        record = {"key": self.key, "items": self.items, "documents": len(docs),
                  "tokens": int(tokens.size), "bytes": self.bytes, "replaced": self.replaced}
        write_shard(self.out, len(self.records), tokens, docs, record)
        self.records.append(record)
        self._reset()


def prepare(inputs: list[str], out: str | Path, tokenizer, *, text_field: str = "text",
            workers: int | None = None, shard_bytes: int = SHARD_BYTES,
            progress: bool = True) -> Corpus:
    """Tokenise `inputs` into `out` (or reuse what is there) and open it.

    Args:
        inputs: files, directories, globs, a `datasets` folder (see `sources.files_of`).
        tokenizer: anything with encode (encode_batch), vocab_size, eos_id, fingerprint().
        workers: processes tokenising in parallel (default: the core count).
    Returns: the prepared `Corpus`."""
    out = Path(out)
    files = sources.files_of(inputs)
    rows = sources.fingerprint(files)
    key = sources.key_of(rows, tokenizer.fingerprint(), f"{text_field}|{shard_bytes}")
    if (out / MANIFEST).is_file():
        found = _read_manifest(out)
        if found.get("key") == key:
            return Corpus(out, tokenizer.fingerprint())
    out.mkdir(parents=True, exist_ok=True)
    done = complete_shards(out, key)
    remove_stale(out, len(done))
    builder = _ShardBuilder(out, key, shard_bytes, done)
    skip = sum(r["items"] for r in done)
    stream = itertools.islice(sources.items(files, text_field), skip, None)
    total = None if any(_compressed(f) for f in files) else sum(r[1] for r in rows)
    with tqdm(total=total, initial=sum(r["bytes"] for r in done), unit="B", unit_scale=True,
              desc=f"preparing {out.name}", dynamic_ncols=True,
              disable=not progress or (total or BAR_BYTES) < BAR_BYTES) as bar:
        for tokens, stats in _encoded(_batches(stream), tokenizer, workers or os.cpu_count()):
            builder.add(tokens, stats)
            bar.update(int(stats[:, 1].sum()))
            documents = sum(r["documents"] for r in done) + len(builder.docs)
            bar.set_postfix(documents=f"{documents:,}", refresh=False)
        builder.flush()
    _finish(out, key, inputs, rows, tokenizer, text_field, done)
    return Corpus(out, tokenizer.fingerprint())


def _read_manifest(out: Path) -> dict:
    """The manifest of an earlier preparation; any other manifest.json (a checkpoint's) is
    refused, since preparing again would delete it."""
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError):
        found = None
    if not isinstance(found, dict) or "shards" not in found:
        raise ValueError(f"{out} holds a {MANIFEST} that is not a prepared corpus's; "
                         "choose another --out")
    return found


def _compressed(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".gz", ".zst", ".parquet"))


def _finish(out: Path, key: str, inputs: list[str], rows: list, tokenizer, text_field: str,
            records: list[dict]) -> None:
    """Write the manifest (the corpus is then complete), or refuse an empty corpus."""
    documents = sum(r["documents"] for r in records)
    if not documents:
        remove_stale(out, 0)
        raise ValueError(f"the data at {' '.join(inputs)} holds no text (no non-empty "
                         "document); check the paths and --text-field")
    replaced = sum(r["replaced"] for r in records)
    if replaced:
        print(f"warning: {replaced:,} invalid UTF-8 byte sequences were replaced by U+FFFD",
              file=sys.stderr)
    manifest = {"format": FORMAT, "key": key, "inputs": inputs, "files": rows,
                "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "dtype": token_dtype(tokenizer.vocab_size).name,
                "text_field": text_field, "documents": documents,
                "tokens": sum(r["tokens"] for r in records),
                "bytes": sum(r["bytes"] for r in records), "replaced": replaced,
                "shards": records}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
