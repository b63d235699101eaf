"""RetNetState: the whole recurrent state of a RetNet, an immutable value passed in and returned."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RetNetState(NamedTuple):
    """Everything a RetNet needs to continue a batch of sequences, at a size fixed in T.

    kv: one tensor per layer, [B, H, K, V+1], float32 (float64 for a float64 model).
        Columns :V hold Σ_m γ^(p_n − p_m) k_mᵀ v_m; column V holds z_n = Σ_m γ^(p_n − p_m) k_m,
        the key sum whose product with q_n is the row sum of the retention scores (the
        paper's score normalisation), carried so that every form can normalise exactly.
    offset: [B] int64, the number of real tokens each row has consumed; the next real token
        of row b sits at absolute position offset[b] (rotation angle and decay row sum).

    A NamedTuple is a PyTorch pytree, so the state crosses torch.compile, DDP and
    torch.utils._pytree without adapters. Nothing here is ever modified in place.
    """

    kv: tuple[Tensor, ...]
    offset: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.offset.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by this state (all rows)."""
        return sum(t.numel() * t.element_size() for t in (*self.kv, self.offset))

    @property
    def nbytes_per_sequence(self) -> int:
        return self.nbytes // max(self.batch_size, 1)

    @property
    def device(self) -> torch.device:
        return self.offset.device

    def clone(self) -> RetNetState:
        return RetNetState(tuple(t.clone() for t in self.kv), self.offset.clone())

    def empty_like(self) -> RetNetState:
        """Uninitialised contiguous buffers of the same shapes: a `state_out` for decoding."""
        return RetNetState(tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                                 for t in self.kv), torch.empty_like(self.offset))

    def fits(self, other: RetNetState) -> bool:
        """Whether this state's buffers can receive the state after `other` (a `state_out`):
        same shapes, dtypes and device, contiguous, and no buffer shared with `other`."""
        return len(other.kv) == len(self.kv) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.is_contiguous() and a.data_ptr() != b.data_ptr()
            for a, b in zip((*self.kv, self.offset), (*other.kv, other.offset)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> RetNetState:
        """Move to a device; `dtype` applies to kv only (the offset stays int64)."""
        return RetNetState(tuple(t.to(device=device, dtype=dtype) for t in self.kv),
                           self.offset.to(device=device))

    def select(self, rows: Tensor | list[int]) -> RetNetState:
        """The state of the given batch rows, in that order (drop finished rows, reorder beams)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return RetNetState(tuple(t.index_select(0, index) for t in self.kv),
                           self.offset.index_select(0, index))

    @staticmethod
    def cat(states: list[RetNetState]) -> RetNetState:
        """Join states of the same model along the batch dimension."""
        if not states:
            raise ValueError("cat needs at least one state")
        n_layers = len(states[0].kv)
        if any(len(s.kv) != n_layers for s in states):
            raise ValueError("cannot join states of models with different numbers of layers")
        kv = tuple(torch.cat([s.kv[i] for s in states]) for i in range(n_layers))
        return RetNetState(kv, torch.cat([s.offset for s in states]))
