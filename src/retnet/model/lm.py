"""RetNetLM: embeddings, a stack of RetNet blocks, a final norm and a (tied) LM head."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retnet.kernels.dispatch import choose
from retnet.model.config import RetNetConfig
from retnet.model.state import RetNetState
from retnet.modules import RetNetBlock
from retnet.modules.block import make_norm
from retnet.modules.linear import Linear
from retnet.ops import RECURRENT, Form
from retnet.ops.documents import document_positions
from retnet.ops.linear import linear
from retnet.ops.loss import linear_cross_entropy
from retnet.ops.retention import Mode

INIT_STD = 0.02


class RetNetOutput(NamedTuple):
    logits: Tensor | None  # [B, T, vocab_size] ([B, 1, V] with last_only; None with targets)
    state: RetNetState  # after the last position
    loss: Tensor | None = None  # with targets: the mean next-token cross-entropy


class RetNetLM(nn.Module):
    """A RetNet language model. One forward for every form:

        model(input_ids)                                   # parallel
        model(input_ids, mode="chunkwise", chunk_size=64)  # or mode=Form("chunkwise", 64)
        model(next_ids, state=out.state, mode="recurrent")
        model(packed_ids, resets=starts)                   # documents packed in a row
    """

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(
            RetNetBlock(c.d_model, c.n_heads, c.key_head_dim, c.value_head_dim, c.ffn_dim,
                        decays=c.decays, norm_eps=c.norm_eps, dropout=c.dropout, norm=c.norm,
                        head_norm=c.head_norm, ffn=c.ffn, use_gate=c.use_gate,
                        rotation=c.rotation)
            for _ in range(c.n_layers)
        )
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps)
        # Tied: the LM head *is* the embedding matrix; no second module, so state dicts and
        # safetensors files hold it once.
        self.lm_head = (None if c.tie_embeddings
                        else Linear(c.d_model, c.vocab_size))
        # Run option, not architecture: recompute each block in the backward pass.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; the two projections that write to the residual stream
        (W_O and the FFN's down projection) are scaled by 1/√(2L) (GPT-2) so the stream's
        RMS stays flat with depth; norms start at identity. The input embedding is
        multiplied by √d in forward, so the stream starts at RMS ≈ 0.02·√d while the tied
        LM head's logits start small (loss ≈ ln V)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = residual_std if name.endswith(("out_proj.weight", "down.weight")) else INIT_STD
            nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @property
    def state_dtype(self) -> torch.dtype:
        """float64 for a float64 model, float32 otherwise (also under bf16 weights or autocast)."""
        dtype = self.embed.weight.dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def init_state(self, batch_size: int,
                   device: torch.device | str | None = None) -> RetNetState:
        """A zero state for `batch_size` sequences at position 0."""
        c = self.config
        device = self.embed.weight.device if device is None else device
        shape = (batch_size, c.n_heads, c.key_head_dim, c.value_head_dim + 1)
        kv = tuple(torch.zeros(shape, dtype=self.state_dtype, device=device)
                   for _ in range(c.n_layers))
        return RetNetState(kv, torch.zeros(batch_size, dtype=torch.long, device=device))

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Parameter count; embeddings=False leaves out the embedding and an untied LM head."""
        skip = set() if embeddings else {id(self.embed.weight), id(self.output_weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @property
    def output_weight(self) -> Tensor:
        """[vocab_size, D]: the LM head's weight (the embedding when tied); dequantised to
        float32 when it is weight-only int8 (`retnet.modules.quant`)."""
        head = self.embed if self.lm_head is None else self.lm_head
        scales = getattr(head, "scales", None)
        return head.weight if scales is None else head.weight.float() * scales[:, None]

    def forward(self, input_ids: Tensor, state: RetNetState | None = None, *,
                mode: Mode | Form = "parallel", chunk_size: int | None = None,
                attention_mask: Tensor | None = None, resets: Tensor | None = None,
                last_only: bool = False, targets: Tensor | None = None) -> RetNetOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token; left padding for batches
        of different lengths). resets [B, T] (bool): True where a document starts; each
        document of a packed row then computes what it would alone (the state entering it
        dropped, positions from 0; `retnet.ops.documents` converts cu_seqlens). mode: a
        retention Form, or a mode name with chunk_size (default `DEFAULT_CHUNK_SIZE`).
        Returns logits and the state after the last position; the caller's state is never
        modified. last_only=True computes logits for the last position only (prefill).
        targets [B, T] (the token each position predicts; -100: none): return the loss
        instead of the logits, through the chunked cross-entropy (`retnet.ops.loss`), which
        never holds the [B·T, vocab] logits or their gradient."""
        return self._forward(input_ids, state, Form.of(mode, chunk_size), attention_mask,
                             resets, last_only, targets)

    def step(self, input_ids: Tensor, state: RetNetState, out: RetNetState, *,
             attention_mask: Tensor | None = None, mode: Mode | Form = RECURRENT
             ) -> RetNetOutput:
        """The recurrent `forward` of input_ids [B, T] (no autograd) whose new state is written
        into the buffers of `out`, a state of the same shape that is not `state` itself: a
        decode loop alternates two states instead of allocating one per token
        (`StepBuffers`)."""
        return self._forward(input_ids, state, Form.of(mode, None), attention_mask, out=out)

    def hidden_states(self, input_ids: Tensor, state: RetNetState | None = None, *,
                      mode: Mode | Form = "parallel", attention_mask: Tensor | None = None,
                      last_only: bool = False) -> tuple[RetNetOutput, list[Tensor]]:
        """`forward`, and the residual stream as transformers' hidden_states: the input of
        each block [B, T, D], then the final norm's output ([B, 1, D] with last_only)."""
        hidden: list[Tensor] = []
        out = self._forward(input_ids, state, Form.of(mode, None), attention_mask,
                            last_only=last_only, hidden=hidden)
        return out, hidden

    def _forward(self, input_ids: Tensor, state: RetNetState | None, form: Form,
                 attention_mask: Tensor | None, resets: Tensor | None = None,
                 last_only: bool = False, targets: Tensor | None = None, *,
                 out: RetNetState | None = None, hidden: list[Tensor] | None = None
                 ) -> RetNetOutput:
        """The one forward: `out` receives the new state (`step`), `hidden` the residual
        stream (`hidden_states`)."""
        B, T = self._check_inputs(input_ids, state, attention_mask, resets)
        if targets is not None and (last_only or targets.shape != input_ids.shape):
            raise ValueError(f"targets must be [B, T] = {list(input_ids.shape)} (one per "
                             "position), without last_only")
        state = self.init_state(B, input_ids.device) if state is None else state
        if resets is not None and T == 1:
            # one token: a reset is an empty incoming state, which every path (the fused
            # decode step included) reads without knowing about documents
            state, resets = _restart(state, resets[:, 0]), None
        self._check_state_out(form, state, out)
        if (form.mode == "recurrent" and input_ids.shape[1] == 1 and hidden is None
                and targets is None):  # a one-token step: the whole step may be one kernel
            active = None if attention_mask is None else attention_mask[:, 0]
            args = (self, input_ids[:, 0], state, active, out)
            fast = choose("decode_step", *args, backend=form.backend)
            step = None if fast is None else fast(*args)  # None: it declined, see the table
            if step is not None:
                return RetNetOutput(step[0].unsqueeze(1), step[1])
        forms = self._forms(form, out)
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(torch.bool))
        seen = mask.long().cumsum(1)  # [B, T] real tokens so far
        # Positions count from each row's (or document's) first real token; padding sits at
        # the last position.
        positions, offset = document_positions(state.offset, seen, mask, resets)
        x = self.embed(input_ids)  # [B, T, D]
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        # Rotation and decay row sums depend only on the positions: once for all layers.
        pos = self.blocks[0].retention.encode_positions(positions, state.kv[0].dtype, resets)
        # None, not a mask of ones, when every token is real: the forms then share one decay
        # matrix among all rows and chunks instead of one per row and chunk
        mask = None if attention_mask is None else mask
        kvs = []
        for block, kv, form in zip(self.blocks, state.kv, forms):
            if hidden is not None:
                hidden.append(x)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, kv, pos, mask, form, use_reentrant=False)
            else:
                x, kv = block(x, kv, pos, mask, form)
            kvs.append(kv)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        if out is not None:
            offset = out.offset.copy_(offset)
        state = RetNetState(tuple(kvs), offset)
        if targets is not None:
            return RetNetOutput(None, state, linear_cross_entropy(x, self.output_weight, targets))
        return RetNetOutput(linear(x, self.output_weight), state)

    @staticmethod
    def _check_state_out(form: Form, state: RetNetState, out: RetNetState | None) -> None:
        if out is None:
            return
        if form.mode != "recurrent" or torch.is_grad_enabled():
            raise ValueError("step() needs mode='recurrent' and torch.no_grad()")
        if not out.fits(state):
            raise ValueError("step()'s out must be a contiguous state of the input state's "
                             "shape and dtype sharing no buffer with it, e.g. "
                             "state.empty_like()")

    def _forms(self, form: Form, out: RetNetState | None) -> list:
        """The retention form for each layer; with `out` (checked by _check_state_out), each
        writes into its buffer."""
        if out is None:
            return [form] * len(self.blocks)
        return [functools.partial(form, out=buf) for buf in out.kv]

    def _check_inputs(self, input_ids: Tensor, state: RetNetState | None,
                      attention_mask: Tensor | None, resets: Tensor | None = None
                      ) -> tuple[int, int]:
        B, T = check_ids(input_ids, attention_mask)
        if resets is not None and (resets.shape != (B, T) or resets.dtype != torch.bool):
            raise ValueError(f"resets must be bool [B, T] = [{B}, {T}] (True where a document "
                             f"starts); got {resets.dtype} {tuple(resets.shape)}")
        if state is not None:
            if len(state.kv) != self.config.n_layers:
                raise ValueError(f"state has {len(state.kv)} layers but the model has "
                                 f"{self.config.n_layers}: it was made by another model")
            if state.batch_size != B:
                raise ValueError(f"state holds {state.batch_size} rows but input_ids has {B}; "
                                 "use state.select(rows) to match the batch")
        return B, T


def check_ids(input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[int, int]:
    """(B, T) of input_ids [B, T] with T ≥ 1 and attention_mask None or [B, T]; a one-line
    ValueError otherwise (the one check of the model's inputs, also the decode loop's)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T ≥ 1; got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if attention_mask is not None and attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}]; "
                         f"got {tuple(attention_mask.shape)}")
    return B, T


def _restart(state: RetNetState, rows: Tensor) -> RetNetState:
    """The state with the rows where `rows` [B] (bool) is True emptied (zero kv, offset 0), as
    a document starting there sees it; a new state, the caller's is unchanged."""
    kv = tuple(torch.where(rows.view(-1, 1, 1, 1), 0.0, t) for t in state.kv)  # [B, H, K, V+1]
    return RetNetState(kv, torch.where(rows, 0, state.offset))


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in float32 (float64 for float64 logits).
    logits [B, T, V]; targets [B, T]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                           ignore_index=ignore_index)
