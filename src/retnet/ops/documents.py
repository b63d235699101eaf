"""Document boundaries in a packed row: `resets` [B, T] (True = a document starts at this token,
so the state entering it is discarded), its conversion to and from cumulative sequence lengths
(`cu_seqlens`, flash-linear-attention's varlen convention), and what restarts per document."""

from __future__ import annotations

import torch
from torch import Tensor


def resets_from_cu_seqlens(cu_seqlens: Tensor, length: int | None = None) -> Tensor:
    """cu_seqlens [N + 1] (0, the ends of N documents packed into one row) → resets [1, T].

    T is cu_seqlens[-1] unless `length` says more (the tail past the last end then continues
    the last document). Document 0 starts at token 0 without a reset: it reads the incoming
    state, as a row does without boundaries."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).flatten()
    if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease; got {cu.tolist()}")
    T = int(cu[-1]) if length is None else length
    if T < int(cu[-1]):
        raise ValueError(f"length {T} is shorter than the documents "
                         f"(cu_seqlens[-1] = {int(cu[-1])})")
    resets = torch.zeros(1, T, dtype=torch.bool)
    starts = cu[1:-1]
    resets[0, starts[starts < T]] = True
    return resets


def cu_seqlens_from_resets(resets: Tensor) -> Tensor:
    """resets [1, T] (or [T]) → cu_seqlens [N + 1]: 0, each document's end, T."""
    r = resets.reshape(-1).to(torch.bool)
    starts = torch.nonzero(r[1:]).flatten() + 1  # a reset at token 0 starts no new document
    T = torch.tensor([r.numel()], device=starts.device)
    return torch.cat([starts.new_zeros(1), starts, T])


def document_ids(resets: Tensor) -> Tensor:
    """[B, T] → [B, T] int: resets up to and including each token (0 = the row's first
    document, the one that reads the incoming state). Tokens of one document share an id."""
    return resets.to(torch.int32).cumsum(-1)


def document_positions(offset: Tensor, seen: Tensor, mask: Tensor, resets: Tensor | None
                       ) -> tuple[Tensor, Tensor]:
    """The absolute position of each token (rotation angle, decay row sum) and the offset after
    the row, when positions restart at 0 at every document start.

    offset [B] (the incoming state's position); seen [B, T] real tokens so far (mask.cumsum);
    mask [B, T] bool; resets [B, T] bool or None. A row's first document continues from
    `offset`; a later one counts from its own first real token. Padding sits at the last
    position. Returns positions [B, T] and the new offset [B] (both int64).
    """
    base = offset[:, None].expand_as(seen)  # [B, T] what position 0 of each token's document is
    if resets is not None:
        # real tokens before each reset, carried forward (seen never decreases, so cummax
        # carries the latest): the tokens a later document does not count
        before = torch.where(resets, seen - mask.long(), 0).cummax(-1).values  # [B, T]
        base = torch.where(document_ids(resets) > 0, -before, base)
    return (base + seen - 1).clamp(min=0), base[:, -1] + seen[:, -1]


def block_causal_mask(resets: Tensor) -> Tensor:
    """[B, T] resets → [B, 1, T, T] bool attention mask (True: token n may attend to token m):
    causal and block-diagonal, each token seeing only its own document's earlier tokens. What
    a Transformer needs to treat a packed row as its documents alone."""
    T = resets.shape[-1]
    docs = document_ids(resets)
    causal = torch.ones(T, T, dtype=torch.bool, device=resets.device).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)


def document_starts(ids: Tensor, separator: int) -> Tensor:
    """Resets [B, T] for a token stream whose documents are each followed by `separator`
    (`<|endoftext|>`): a document starts at each separator, which then opens the next document
    as its first token, as whole-document evaluation reads it (the previous document still
    learns to predict the separator)."""
    return ids == separator
