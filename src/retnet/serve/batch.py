"""The rows being decoded and their one batched state: every sequence is a row of one
RetNetState, so a decode step of the whole batch costs the same whatever the lengths of the
contexts. A row decodes until it is finished; finished rows leave the batch, and their rows
of the state, after the step that finished them."""

from __future__ import annotations

import torch

from retnet.generation import StepBuffers
from retnet.model import RetNetLM, RetNetState
from retnet.serve.request import Row, RowStatus


class Batch:
    """`rows[i]` decodes row i of `state` (None while the batch is empty)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.state: RetNetState | None = None  # made by cat and select: the batch owns it
        self._buffers = StepBuffers()  # the decode step's output buffers

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row], states: list[RetNetState]) -> None:
        """Append rows, each with its one-row state, after the rows already decoding."""
        self.state = RetNetState.cat(([self.state] if self.state else []) + states)
        self.rows += rows

    @torch.no_grad()
    def step(self, model: RetNetLM) -> torch.Tensor:
        """Feed every row its newest token; returns the next-token logits [B, V]."""
        tokens = torch.tensor([r.last for r in self.rows], device=self.state.device)
        logits, self.state = self._buffers.step(model, tokens, self.state)
        return logits

    def state_of(self, row: Row) -> RetNetState:
        """The one-row state of `row` (a copy: the next step overwrites the batch's)."""
        return self.state.select([self.rows.index(row)])

    def decoding(self) -> list[Row]:
        """The rows not yet finished."""
        return [r for r in self.rows if r.status is RowStatus.DECODING]

    def remove_finished(self) -> None:
        """Finished rows leave, with their rows of the state."""
        keep = [i for i, r in enumerate(self.rows) if r.status is RowStatus.DECODING]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.state = self.state.select(keep) if keep else None

    def clear(self) -> None:
        self.rows, self.state = [], None
