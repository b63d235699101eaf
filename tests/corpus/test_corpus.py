"""retnet.corpus: streamed multi-worker tokenisation into shards equals one-shot tokenisation;
resumes after a kill; reads every input form; bad input gets one line and nothing half-written;
training windows carry the index's document starts."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retnet.checkpoint import load_checkpoint
from retnet.cli import main
from retnet.corpus import Corpus, CorpusWindows, prepare, split_flags
from retnet.corpus import stream as prepare_module
from retnet.corpus.shards import MANIFEST
from retnet.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SRC = Path(__file__).resolve().parents[2] / "src"


def texts(n=60):
    return [f"document {i}: " + "lorem ipsum " * (i % 7 + 1) + "\n" for i in range(n)]


def one_shot(docs):
    """The reference: every document's ids, each followed by <|endoftext|>, concatenated."""
    return np.concatenate([np.asarray([*TOK.encode(t), TOK.eos_id]) for t in docs])


def write_files(folder: Path, docs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(docs):
        (folder / f"d{i:03d}.txt").write_text(t)
    return folder


def stream(corpus: Corpus) -> np.ndarray:
    return corpus.read(0, corpus.tokens).astype(np.int64)


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def test_streamed_equals_one_shot(tmp_path, monkeypatch):
    docs = texts()
    # small batches and shards: several of each, across two worker processes
    monkeypatch.setattr(prepare_module, "BATCH_BYTES", 300)
    corpus = prepare([str(write_files(tmp_path / "src", docs))], tmp_path / "out", TOK,
                     workers=2, shard_bytes=700, progress=False)
    assert len(corpus.shards) > 3
    np.testing.assert_array_equal(stream(corpus), one_shot(docs))
    lengths = [len(TOK.encode(t)) + 1 for t in docs]
    np.testing.assert_array_equal(corpus.starts, np.concatenate([[0], np.cumsum(lengths)]))
    assert corpus.manifest["documents"] == len(docs) and corpus.shards[0].dtype == np.uint16


def test_streamed_bpe_equals_the_one_shot_cache(tmp_path, monkeypatch):
    """A BPE (pickled into the workers, encode_batch) against `retnet.data.tokenize`, the
    one-shot path that loads every document."""
    from retnet.data import Document, tokenize
    from retnet.tokenizer import train_bpe

    docs = texts(40)
    bpe = train_bpe(docs, 300)
    monkeypatch.setattr(prepare_module, "BATCH_BYTES", 300)
    corpus = prepare([str(write_files(tmp_path / "src", docs))], tmp_path / "out", bpe,
                     workers=2, shard_bytes=500, progress=False)
    reference, _ = tokenize([Document(str(i), t) for i, t in enumerate(docs)], bpe, "ref")
    np.testing.assert_array_equal(stream(corpus), np.asarray(reference))


def test_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = texts(8)
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs))
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    write_files(tmp_path / "txt", docs)
    cases = {"jsonl": ([str(tmp_path / "a.jsonl")], "text"),
             "gz": ([str(tmp_path / "b.jsonl.gz")], "text"),
             "zst": ([str(tmp_path / "c.jsonl.zst")], "text"),
             "parquet": ([str(tmp_path / "d.parquet")], "body"),
             "datasets": ([str(tmp_path / "hf")], "body"),
             "dir": ([str(tmp_path / "txt")], "text"),
             "glob": ([str(tmp_path / "txt" / "*.txt")], "text")}
    for name, (inputs, field) in cases.items():
        corpus = prepare(inputs, tmp_path / name, TOK, text_field=field, progress=False)
        np.testing.assert_array_equal(stream(corpus), one_shot(docs), err_msg=name)


def test_unchanged_reused_changed_prepared_again(tmp_path):
    src = write_files(tmp_path / "src", texts(5))
    prepare([str(src)], tmp_path / "out", TOK, progress=False)
    stamp = (tmp_path / "out" / MANIFEST).stat().st_mtime_ns
    prepare([str(src)], tmp_path / "out", TOK, progress=False)
    assert (tmp_path / "out" / MANIFEST).stat().st_mtime_ns == stamp  # not tokenised again
    (src / "d000.txt").write_text("a changed first document\n")
    corpus = prepare([str(src)], tmp_path / "out", TOK, progress=False)
    assert bytes(stream(corpus)[:9].astype(np.uint8)) == b"a changed"


KILLABLE = """
import sys, time
from retnet.corpus import prepare, stream
from retnet.tokenizer import ByteTokenizer

stream.BATCH_BYTES = 100  # a few documents per batch: shards are written as it goes

class Slow(ByteTokenizer):  # the same tokens and hash, slowly: the kill lands mid-way
    def encode(self, text):
        time.sleep(float(sys.argv[3]))
        return super().encode(text)

prepare([sys.argv[1]], sys.argv[2], Slow(), workers=1, shard_bytes=400, progress=False)
"""


def run_prepare(src, out, delay, **kw):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", KILLABLE, str(src), str(out), str(delay)],
                            env=env, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_preparation_resumes_to_the_same_shards(tmp_path):
    src = write_files(tmp_path / "src", texts(80))
    proc = run_prepare(src, tmp_path / "out", 0.05)
    deadline = time.time() + 30
    while not (tmp_path / "out" / "shard-00002.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / MANIFEST).exists()
    kept = len(list((tmp_path / "out").glob("shard-*.json")))
    assert kept >= 3
    prepare([str(src)], tmp_path / "out", TOK, workers=1, shard_bytes=400, progress=False)
    prepare([str(src)], tmp_path / "clean", TOK, workers=1, shard_bytes=400, progress=False)
    assert shard_files(tmp_path / "out") == shard_files(tmp_path / "clean")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["documents"] == 80 and len(manifest["shards"]) > kept


def cli_error(capsys, *argv) -> str:
    assert main(["data", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_one_line_nothing_half_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    assert "holds no text" in cli_error(capsys, "prepare", tmp_path / "empty", "--out",
                                        tmp_path / "o1")
    assert not list((tmp_path / "o1").glob("*"))
    (tmp_path / "r.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert "r.jsonl:2 has no string field 'text'" in cli_error(
        capsys, "prepare", tmp_path / "r.jsonl", "--out", tmp_path / "o2")
    assert not (tmp_path / "o2" / MANIFEST).exists()
    assert "no data at" in cli_error(capsys, "prepare", tmp_path / "nothing*", "--out",
                                     tmp_path / "o3")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / MANIFEST).write_text('{"files": {}}')  # a checkpoint's, say
    src = write_files(tmp_path / "src", texts(3))
    assert "not a prepared corpus's" in cli_error(capsys, "prepare", src, "--out",
                                                 tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / MANIFEST).read_text() == '{"files": {}}'
    prepare([str(src)], tmp_path / "o4", TOK, progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        Corpus(tmp_path / "o4", "bpe-0123")


def test_undecodable_bytes_are_counted(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.txt").write_bytes(b"ok \xff\xfe then \xc3 end")
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    assert "3 invalid UTF-8 byte sequences were replaced" in capsys.readouterr().err
    assert Corpus(tmp_path / "o").manifest["replaced"] == 3


FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
from retnet.checkpoint import load_checkpoint
from retnet.cli import main
sys.exit(main(["data", "prepare", sys.argv[1], "--out", sys.argv[2], "--shard-bytes", "400",
               "--workers", "1"]))
"""


@pytest.mark.slow
def test_full_disk_keeps_whole_shards_then_resumes(tmp_path):
    # documents grow: the first shards (~1 KB of uint16) fit under the limit, later ones not
    src = write_files(tmp_path / "src", [f"{i} " + "x" * (20 * i) for i in range(40)])
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(src), str(tmp_path / "o"),
                           "1200"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "could not write" in proc.stderr
    assert not list((tmp_path / "o").glob("*.tmp*")) and not (tmp_path / "o" / MANIFEST).exists()
    whole = sorted((tmp_path / "o").glob("shard-*.json"))
    assert whole and all(p.with_name(p.name.replace(".json", ".bin")).stat().st_size < 1200
                         for p in whole)
    clean = prepare([str(src)], tmp_path / "clean", TOK, shard_bytes=400, progress=False)
    resumed = prepare([str(src)], tmp_path / "o", TOK, shard_bytes=400, progress=False)
    np.testing.assert_array_equal(stream(resumed), stream(clean))


def test_windows_reset_at_every_document_start(tmp_path):
    docs = texts(40)
    corpus = prepare([str(write_files(tmp_path / "src", docs))], tmp_path / "out", TOK,
                     shard_bytes=300, progress=False)
    windows = CorpusWindows(corpus, 0, corpus.tokens, 48, "corpus")
    full = one_shot(docs)
    opens = set((corpus.starts[1:-1] - 1).tolist())
    for start in range(0, windows.n_starts, 7):  # across shard edges and documents
        ids, resets = split_flags(__import__("torch").from_numpy(windows.window(start)))
        np.testing.assert_array_equal(ids.numpy(), full[start:start + 49])
        expected = [start + i in opens for i in range(49)]
        assert resets.tolist() == expected, start
        # with the byte tokenizer a document opens exactly at each separator
        assert resets.tolist() == (ids == TOK.eos_id).tolist()[:48] + [start + 48 in opens]


def test_info_and_reuse_by_path(tmp_path, capsys):
    src = write_files(tmp_path / "src", texts(4))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "o"), "--window", "80"]) == 0
    out = capsys.readouterr().out
    assert "4 documents" in out and "⟦document⟧\ndocument 1:" in out
    from retnet.train.corpus_data import open_corpus

    class Cfg:
        text_field, workers = "text", 1

    assert open_corpus(str(tmp_path / "o"), TOK, Cfg).directory == tmp_path / "o"


def test_train_reads_windows_through_the_shards(tmp_path, capsys):
    """200 JSONL documents: --val-fraction holds out whole documents worth a window at least
    (the hash split gave 45 tokens); --val-data is read as a corpus of its own."""
    records = "".join(json.dumps({"text": t}) + "\n" for t in texts(200))
    (tmp_path / "train.jsonl").write_text(records)
    (tmp_path / "val.jsonl").write_text("".join(records.splitlines(keepends=True)[:50]))
    common = ["train", "--data", str(tmp_path / "train.jsonl"), "--preset", "tiny", "--steps",
              "1", "--batch-size", "2", "--seq-len", "64", "--eval-every", "1",
              "--eval-batches", "1", "--save-every", "1", "--workers", "1"]
    for extra, name in (([], "a"), (["--val-data", str(tmp_path / "val.jsonl")], "b")):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
    meta = [load_checkpoint(tmp_path / name).meta for name in "ab"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    assert {"loss", "val_loss", "lr"} <= set(events.Tags()["scalars"])  # beside metrics.jsonl
    corpus = Corpus(meta[0]["corpus"]["prepared"])
    assert meta[0]["val_tokens"] >= max(65, 0.02 * corpus.tokens)
    assert meta[0]["train_tokens"] + meta[0]["val_tokens"] == corpus.tokens
    assert meta[1]["val_tokens"] == one_shot(texts(200)[:50]).size
