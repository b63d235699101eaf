"""Corpora at any size: streamed multi-worker tokenisation into memory-mapped shards with a
document index (`prepare`), read back without loading (`Corpus`), as training windows whose
document starts come from the index (`CorpusWindows`); `retnet data prepare|info`."""

from retnet.corpus.shards import Corpus
from retnet.corpus.stream import prepare
from retnet.corpus.windows import CorpusWindows, split_flags, validation_start

__all__ = ["Corpus", "CorpusWindows", "prepare", "split_flags", "validation_start"]
