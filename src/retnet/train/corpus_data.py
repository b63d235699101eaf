"""`retnet train --data`: the run's data read through a prepared corpus (`retnet.corpus`):
prepared once (or reused), windows read from the memory-mapped shards, validation from
--val-data or the corpus's tail (--val-fraction), document starts from the index."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from retnet.corpus import Corpus, CorpusWindows, prepare, split_flags, validation_start
from retnet.corpus.shards import MANIFEST
from retnet.tokenizer import Tokenizer
from retnet.train import distributed as dist
from retnet.train.step import Data, Loss


def open_corpus(source: str, tokenizer: Tokenizer, cfg) -> Corpus:
    """A prepared corpus given by path is read as it is; anything else is prepared (or its
    earlier preparation reused) under the cache, keyed by the paths and the tokenizer."""
    if (Path(source) / MANIFEST).is_file():
        return Corpus(source, tokenizer.fingerprint())
    from retnet.data import cache_dir

    name = f"{Path(source).resolve()}|{cfg.text_field}|{tokenizer.fingerprint()}"
    out = cache_dir() / f"corpus-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return prepare([source], out, tokenizer, text_field=cfg.text_field, workers=cfg.workers)


def corpus_data(cfg, tokenizer: Tokenizer, ctx: dist.Context) -> Data:
    """The training and validation windows, the bits-per-byte factor and the run's record."""
    with ctx.rank_zero_first():  # rank 0 prepares; the others then find it complete
        corpus = open_corpus(cfg.data, tokenizer, cfg)
        held = open_corpus(cfg.val_data, tokenizer, cfg) if cfg.val_data else None
    if held is None:
        split = validation_start(corpus, cfg.val_fraction, cfg.seq_len + 1)
        train = CorpusWindows(corpus, 0, split, cfg.seq_len, "training split")
        val = CorpusWindows(corpus, split, corpus.tokens, cfg.seq_len, "validation split")
        val_bytes = corpus.bytes_between(split, corpus.tokens)
    else:
        train = CorpusWindows(corpus, 0, corpus.tokens, cfg.seq_len, "training data")
        val = CorpusWindows(held, 0, held.tokens, cfg.seq_len, "validation data (--val-data)")
        val_bytes = int(held.manifest["bytes"])
    meta = {"python_corpus": False, "documents": corpus.documents,
            "train_tokens": train.tokens.size, "val_tokens": val.tokens.size,
            "corpus": {"source": cfg.data, "prepared": str(corpus.directory),
                       "fingerprint": corpus.manifest["key"]}}
    bits = val.tokens.size / max(val_bytes, 1) / math.log(2)
    boundaries, form = not cfg.no_document_boundaries, cfg.form

    def loss(wrapped: torch.nn.Module) -> Loss:
        def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            ids, resets = split_flags(ids)
            targets, _ = split_flags(targets)
            return wrapped(ids, mode=form, targets=targets,
                           resets=resets if boundaries else None).loss
        return loss_of

    return Data(train, val.evaluation_batches(cfg.batch_size, cfg.eval_batches), bits, meta,
                loss)
