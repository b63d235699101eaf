"""Training and validation windows read from a prepared corpus at random offsets, nanoGPT's way,
without loading it; each window carries its document starts (from the index) as a flag bit,
so the step's loss needs nothing but the batch."""

from __future__ import annotations

import numpy as np
import torch

from retnet.corpus.shards import Corpus
from retnet.data import PackedWindows

ID_BITS = 0xFFFFFFFF
RESET = 1 << 32  # set on a token where a document opens (`retnet.ops.documents` resets)


class TokenCount:
    """What `PackedWindows.tokens` is to its readers (`.size`) without holding the tokens."""

    def __init__(self, size: int) -> None:
        self.size = size


class CorpusWindows(PackedWindows):
    """Windows of seq_len + 1 tokens from the token range [lo, hi) of `corpus`, drawn as
    `PackedWindows` draws them (a pure function of seed, step, rank): only reading differs."""

    def __init__(self, corpus: Corpus, lo: int, hi: int, seq_len: int, what: str) -> None:
        if hi - lo < seq_len + 1:
            raise ValueError(f"the {what} has {hi - lo} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; add text, lower --seq-len or "
                             "raise --val-fraction")
        # PackedWindows' __init__ wants the tokens in hand: what it sets is set here instead
        self.corpus, self.lo, self.seq_len = corpus, lo, seq_len
        self.n_starts = hi - lo - seq_len
        self.tokens = TokenCount(hi - lo)

    def window(self, start: int) -> np.ndarray:
        """int64 [seq_len + 1]: token ids, RESET set where a document opens."""
        lo = self.lo + start
        hi = lo + self.seq_len + 1
        ids = self.corpus.read(lo, hi).astype(np.int64)
        return ids | np.where(self.corpus.resets(lo, hi), RESET, 0)

    def _gather(self, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.window(int(s)) for s in starts]))


def split_flags(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flagged ids [B, T] → (token ids [B, T], resets [B, T] bool)."""
    return ids & ID_BITS, (ids & RESET) != 0


def validation_start(corpus: Corpus, fraction: float, min_tokens: int) -> int:
    """Where validation starts in the token stream: the corpus's tail, at least `fraction` of
    its tokens and one window (`min_tokens`), from a document start when that leaves the
    training part a window too, else mid-document (a corpus of one file)."""
    want = min(max(int(fraction * corpus.tokens), min_tokens), corpus.tokens)
    cut = corpus.tokens - want
    first = int(np.searchsorted(corpus.starts, cut, side="right")) - 1
    aligned = int(corpus.starts[max(first, 0)])
    return aligned if aligned >= min_tokens else cut
