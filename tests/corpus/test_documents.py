"""The in-memory document reader (`retnet.data.load_documents`, used by compare, eval, the
tokenizer trainer, the study, bench quality and the demo) reads what `retnet.corpus` reads,
document for document: a file, a JSONL record, a row; never a line count."""

from __future__ import annotations

import gzip
import json

from retnet.corpus import sources
from retnet.data import load_documents, split_documents


def test_a_text_file_of_1000_lines_is_one_document(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "big.txt").write_text(text)
    docs = load_documents(str(tmp_path / "big.txt"))
    assert [d.text for d in docs] == [text]


def test_documents_are_the_corpus_readers_items(tmp_path):
    """A directory of a text file and a .jsonl.gz (which the old reader took for text): one
    document per file and per record, as `sources.items` yields them, named inside it."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha\n" * 300)
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in ["one", "two", " "]))
    docs = load_documents(str(tmp_path / "d"))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "alpha\n" * 300), ("b.jsonl.gz:1", "one"), ("b.jsonl.gz:2", "two")]
    streamed = [sources.to_text(i)[0] for i in sources.items(
        sources.files_of([str(tmp_path / "d")]), "text")]
    assert [d.text for d in docs] == [t for t in streamed if t.strip()]
    # the hash split sees the same names however the directory is spelled
    assert [d.name for d in load_documents(f"{tmp_path / 'd'}/")] == [d.name for d in docs]


def test_a_lone_document_validates_on_its_tail(tmp_path):
    """One text file: training on its head, validation on its tail from a line start, no
    overlap (not the whole file in both)."""
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "big.txt").write_text(text)
    (train,), (val,) = split_documents(load_documents(str(tmp_path / "big.txt")))
    assert train.text + val.text == text
    assert val.text.startswith("line ") and 0.1 <= len(val.text) / len(text) < 0.11
    assert train.name != val.name
