"""Corpora at any size: streamed multi-worker tokenisation into token shards (read by offset) with a
document index (`prepare`), read back without loading (`Corpus`), as training windows whose
document starts come from the index (`CorpusWindows`); `retnet data prepare|info`.

Names are imported on first use (PEP 562): a tokenising worker imports `stream` alone, never
torch (which `windows` needs), saving each worker's start-up time and a few hundred MB."""

from __future__ import annotations

import importlib

_WHERE = {"prepare": "stream", "Corpus": "shards", "CorpusWindows": "windows",
          "split_flags": "windows", "validation_start": "windows"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'retnet.corpus' has no attribute {name!r}")
    return getattr(importlib.import_module(f"retnet.corpus.{_WHERE[name]}"), name)
