"""A prepared corpus on disk and read back without loading it.

DIR/shard-NNNNN.bin   the tokens of consecutive documents, each followed by <|endoftext|>
                      (uint16 when the vocabulary fits, else uint32), read by offset (os.pread)
DIR/shard-NNNNN.idx.npy  int64 [documents, 2]: each document's tokens and source bytes
DIR/shard-NNNNN.json  written last: the shard is complete (a resumed run keeps it)
DIR/manifest.json     written last of all: source fingerprint, tokenizer hash, counts
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from retnet.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = 1


def shard_stem(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(directory: Path, index: int, tokens: np.ndarray, docs: np.ndarray,
                record: dict) -> None:
    """tokens [n], docs int64 [documents, 2]; each file atomic, the record last, so a shard
    whose record exists is whole (a crash or a full disk leaves at most temporary files)."""
    stem = shard_stem(directory, index)
    atomic_write(stem.with_suffix(".bin"), lambda tmp: _write_all(tmp, tokens))
    atomic_write(stem.with_suffix(".idx.npy"),
                 lambda tmp: np.save(tmp.open("wb"), docs, allow_pickle=False))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record))


def _write_all(path: Path, array: np.ndarray) -> None:
    """Write the array's bytes or raise OSError: ndarray.tofile stops silently at a file-size
    limit (RLIMIT_FSIZE), leaving a short file behind a clean return."""
    with path.open("wb") as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    if path.stat().st_size != array.nbytes:
        raise OSError(errno.EFBIG, "the write stopped short of the shard's size")


def complete_shards(directory: Path, key: str) -> list[dict]:
    """The records of the shards 0, 1, ... already written for this `key`, in order; a gap or a
    record of another key ends the list (what follows is prepared again)."""
    records = []
    while (path := shard_stem(directory, len(records)).with_suffix(".json")).is_file():
        record = json.loads(path.read_text())
        if record.get("key") != key:
            break
        records.append(record)
    return records


def remove_stale(directory: Path, keep: int) -> None:
    """Delete shards from `keep` on, the manifest and temporary files left by a crash."""
    for path in directory.glob("shard-*"):
        number = path.name.split(".")[0].removeprefix("shard-")
        if ".tmp" in path.name or (number.isdigit() and int(number) >= keep):
            path.unlink()
    (directory / MANIFEST).unlink(missing_ok=True)


class Shard:
    """One shard's tokens, read by offset (os.pread), not memory-mapped: windows are read at
    random offsets, and a mapping would leave every page it touched (the kernel maps 64 KiB
    around each fault) resident in this process, so RSS would grow with the corpus and the
    steps. Read this way, only the page cache holds them (the kernel's, reclaimable)."""

    def __init__(self, path: Path, dtype: np.dtype, tokens: int) -> None:
        if not path.is_file() or path.stat().st_size != tokens * dtype.itemsize:
            raise ValueError(f"{path} is missing or not the size its manifest says; prepare "
                             "the corpus again (retnet data prepare)")
        self.path, self.dtype, self.tokens = path, dtype, tokens
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.tokens

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of this shard."""
        if not hasattr(os, "pread"):  # no pread (Windows): a mapping, opened per read
            return np.array(np.memmap(self.path, dtype=self.dtype, mode="r",
                                      shape=(self.tokens,))[lo:hi])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._fd, (hi - lo) * size, lo * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class Corpus:
    """A prepared corpus: its shards read by offset, its documents' offsets in memory (16 bytes
    per document). `starts` [documents + 1]: where each document's tokens begin in the
    corpus-wide stream (cumulative lengths, cu_seqlens style); tokens are read on demand."""

    def __init__(self, directory: str | Path, tokenizer_hash: str | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a prepared corpus (no {MANIFEST}); "
                                    f"run retnet data prepare SRC... --out {self.directory}")
        self.manifest = json.loads(path.read_text())
        if tokenizer_hash is not None and self.manifest["tokenizer"] != tokenizer_hash:
            raise ValueError(f"{self.directory} was tokenised with another tokenizer (hash "
                             f"{self.manifest['tokenizer']}, this one {tokenizer_hash}); "
                             "prepare it again with this tokenizer, or train with its own")
        dtype = np.dtype(self.manifest["dtype"])
        self.shards, sizes, docs = [], [], []
        for i, record in enumerate(self.manifest["shards"]):
            stem = shard_stem(self.directory, i)
            self.shards.append(Shard(stem.with_suffix(".bin"), dtype, record["tokens"]))
            sizes.append(record["tokens"])
            docs.append(np.load(stem.with_suffix(".idx.npy")))
        table = np.concatenate(docs) if docs else np.zeros((0, 2), np.int64)
        self.starts = np.concatenate([[0], np.cumsum(table[:, 0])]).astype(np.int64)
        self.doc_bytes = table[:, 1]
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def documents(self) -> int:
        return self.starts.size - 1

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [hi - lo] of the corpus-wide stream, across shard edges."""
        parts, at = [], lo
        while at < hi:
            s = int(np.searchsorted(self.shard_starts, at, side="right")) - 1
            end = min(hi, int(self.shard_starts[s + 1]))
            base = int(self.shard_starts[s])
            parts.append(self.shards[s].read(at - base, end - base))
            at = end
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def resets(self, lo: int, hi: int) -> np.ndarray:
        """bool [hi - lo]: True where a document opens. A document opens with the
        <|endoftext|> before it (`retnet.ops.documents.document_starts`' rule: the previous
        document still learns to predict it), i.e. one token before its index start."""
        opens = self.starts[1:-1] - 1  # the separators before documents 1..N-1
        a, b = np.searchsorted(opens, [lo, hi], side="left")
        out = np.zeros(hi - lo, dtype=bool)
        out[opens[a:b] - lo] = True
        return out

    def bytes_between(self, lo: int, hi: int) -> float:
        """Source bytes of the tokens [lo, hi): whole documents, and a straddled one pro rata."""
        lengths = np.diff(self.starts)
        overlap = np.clip(np.minimum(self.starts[1:], hi) - np.maximum(self.starts[:-1], lo),
                          0, None)
        return float((self.doc_bytes * overlap / np.maximum(lengths, 1)).sum())
