"""What a corpus is read from: text files, directories and globs, .jsonl(.gz/.zst), Parquet,
a `datasets` save_to_disk folder. One document = a file, a JSONL record, a row.

The reader yields raw items (bytes of a file or a JSONL line, or a row's text) in a fixed
order; workers turn them into text (`to_text`), so parsing and decoding run in parallel and a
resumed run can skip items without decoding them."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Item:
    """One document before decoding: `raw` is bytes (a file, a JSONL line) or a row's str."""

    name: str  # where it came from, for errors: path, path:line, path#row
    raw: bytes | str
    field: str | None = None  # a JSONL line: the field holding its text


def files_of(sources: list[str]) -> list[Path]:
    """Every input file, in a fixed order: each source a file, a directory (its files, sorted,
    recursively, without hidden ones and __pycache__) or a glob; a `datasets` folder is kept
    whole."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if is_datasets_folder(path) or path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _skipped(p, path))
        else:
            found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"no data at {source!r}: give text files, .jsonl(.gz/.zst), "
                                    ".parquet, a datasets folder, a directory or a glob")
        files += found
    return files


def _skipped(path: Path, root: Path) -> bool:
    """Hidden files and folders (.git) and __pycache__ in a directory are not text to train on."""
    return any(part.startswith(".") or part == "__pycache__"
               for part in path.relative_to(root).parts)


def is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def fingerprint(files: list[Path]) -> list[list]:
    """Paths, sizes and modification times: a changed file changes it, reading nothing."""
    rows = []
    for f in files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_file():
                st = p.stat()
                rows.append([p.as_posix(), st.st_size, st.st_mtime_ns])
    return rows


def items(files: list[Path], text_field: str) -> Iterator[Item]:
    """Every document's raw item, file after file."""
    for f in files:
        if is_datasets_folder(f):
            yield from _datasets_rows(f, text_field)
        elif f.name.endswith(".parquet"):
            yield from _parquet_rows(f, text_field)
        elif f.name.endswith(JSONL):
            yield from _jsonl_lines(f, text_field)
        else:
            yield Item(f.as_posix(), f.read_bytes())


def _open_jsonl(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path} is zstandard-compressed: pip install zstandard "
                             "(the 'data' extra)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _jsonl_lines(path: Path, field: str) -> Iterator[Item]:
    with _open_jsonl(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                yield Item(f"{path}:{i + 1}", line, field)


def _parquet_rows(path: Path, field: str) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path} is Parquet: pip install pyarrow (the 'data' extra)") from None

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise ValueError(f"{path} has no column {field!r} (it has "
                         f"{', '.join(table.schema_arrow.names)}); pass --text-field NAME")
    row = 0
    # a record batch at a time: a Parquet file larger than memory is never loaded whole
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield Item(f"{path}#{row}", text if isinstance(text, str) else "")
            row += 1


def _datasets_rows(path: Path, field: str) -> Iterator[Item]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ValueError(f"{path} is a `datasets` folder: pip install datasets") from None

    data = load_from_disk(str(path))
    if hasattr(data, "keys"):  # a DatasetDict: its train split
        data = data["train"] if "train" in data else data[next(iter(data.keys()))]
    if field not in data.column_names:
        raise ValueError(f"{path} has no column {field!r} (it has "
                         f"{', '.join(data.column_names)}); pass --text-field NAME")
    row = 0
    for batch in data.select_columns([field]).iter(batch_size=1024):
        for text in batch[field]:
            yield Item(f"{path}#{row}", text if isinstance(text, str) else "")
            row += 1


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and how many invalid byte sequences were replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        # U+FFFD already in the input (encoded EF BF BD) is not a replacement
        return text, text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())


def to_text(item: Item) -> tuple[str, int]:
    """(text, replaced bytes sequences) of one item; ValueError names a bad record."""
    if isinstance(item.raw, str):
        return item.raw, 0
    text, replaced = decode(item.raw)
    if item.field is None:
        return text, replaced
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{item.name} is not valid JSON; fix or remove that line") from None
    if not isinstance(record, dict) or not isinstance(record.get(item.field), str):
        raise ValueError(f"{item.name} has no string field {item.field!r}; "
                         "pass --text-field NAME") from None
    return record[item.field], replaced


def key_of(rows: list[list], tokenizer_hash: str, text_field: str) -> str:
    """What a prepared corpus depends on, as one hash."""
    blob = json.dumps([rows, tokenizer_hash, text_field])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
