"""The decode loop: a prefill in one retention form (chunkwise by default) makes a state, then
O(1) recurrent steps each take only the newest token, their states written into two buffers
that take turns (`StepBuffers`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from retnet.generation.sampling import SamplingParams, make_generators, sample
from retnet.generation.text import TextStream
from retnet.kernels.dispatch import choose
from retnet.model import RetNetLM, RetNetOutput, RetNetState
from retnet.model.lm import check_ids
from retnet.ops import CHUNKWISE, RECURRENT, Form
from retnet.tokenizer import Tokenizer

# Tokens (all rows together) one prefill forward reads at most: a longer prompt is read in
# segments, each continuing the state of the one before (the forms' split-and-continue
# equivalence), so the time stays linear in the length and the activations bounded: one
# forward of 8 x 16k tokens holds 0.5-1 GiB tensors per layer; `python benchmarks/decode.py`
# gave batch-8 16k / 4k = 7.2 in one forward, 4.04 in segments of this size (2-core CPU).
PREFILL_SEGMENT_TOKENS = 8192


def _segment_length(form: Form, batch: int, length: int) -> int:
    """Tokens per row and segment: a multiple of the chunk (chunk boundaries stay where one
    pass puts them), at least one chunk."""
    if form.mode != "chunkwise":
        return length
    per_row = max(form.chunk_size, PREFILL_SEGMENT_TOKENS // max(batch, 1))
    return per_row // form.chunk_size * form.chunk_size


@torch.no_grad()
def read_segments(model: RetNetLM, input_ids: Tensor, attention_mask: Tensor | None = None,
                  state: RetNetState | None = None, *, form: Form = CHUNKWISE,
                  segment: int | None = None, last_only: bool = True
                  ) -> Iterator[tuple[int, RetNetOutput]]:
    """Read input_ids [B, T] in segments of `segment` tokens per row (default: chunkwise
    prompts longer than `PREFILL_SEGMENT_TOKENS` over the batch), each continuing the state
    of the one before; yield (start, the segment's output) per segment. The one segmented
    reading of a prompt: prefill, document scoring and the server's prompts use it."""
    B, T = check_prompt(input_ids, attention_mask)
    step = segment or _segment_length(form, B, T)
    for start in range(0, T, step):
        mask = None if attention_mask is None else attention_mask[:, start:start + step]
        out = model(input_ids[:, start:start + step], state=state, mode=form,
                    attention_mask=mask, last_only=last_only)
        state = out.state
        yield start, out


def prefill(model: RetNetLM, input_ids: Tensor, attention_mask: Tensor | None = None,
            state: RetNetState | None = None, *, form: Form = CHUNKWISE
            ) -> tuple[Tensor, RetNetState]:
    """Read a prompt input_ids [B, T] in `form` (in segments: `read_segments`); return the
    last position's logits [B, V] and the state after it."""
    # only the last segment's output is kept: its logits and the state after every segment
    _, out = deque(read_segments(model, input_ids, attention_mask, state, form=form), 1)[0]
    return out.logits[:, -1], out.state


@torch.no_grad()
def decode_one(model: RetNetLM, token: Tensor, state: RetNetState,
               active: Tensor | None = None, *, out: RetNetState | None = None
               ) -> tuple[Tensor, RetNetState]:
    """One recurrent step on token [B]; rows with active=False are left untouched.

    out: optional buffers (e.g. `state.empty_like()`, or the state before last) that receive
    the new state; `StepBuffers` alternates two, so a loop allocates nothing per token.
    Straight to the fused step where the table chooses it (fewer Python calls per token than
    through `model(...)`, same result), else through `model.forward`."""
    args = (model, token, state, active, out)
    fast = choose("decode_step", *args)
    step = None if fast is None else fast(*args)  # None: it declined, see the table
    if step is not None:
        return step
    mask = None if active is None else active[:, None]
    if out is None:
        result = model(token[:, None], state=state, mode=RECURRENT, attention_mask=mask)
    else:
        result = model.step(token[:, None], state, out, attention_mask=mask)
    return result.logits[:, -1], result.state


class StepBuffers:
    """The state double-buffer of a decode loop: each step writes the new state into the
    buffers of the state the previous step read, so a loop of steps allocates nothing per
    token after the first.

        buffers = StepBuffers()
        logits, new = buffers.step(model, token, state)  # `state` is the next step's output

    The caller must own the states it steps (made by prefill, `cat` or `select`, never a
    state someone else keeps): the state passed to one step is overwritten by the next.
    When the batch shape changes (rows join or leave), a fresh pair is made."""

    def __init__(self) -> None:
        self._spare: RetNetState | None = None  # receives the next step's state

    @torch.no_grad()
    def step(self, model: RetNetLM, token: Tensor, state: RetNetState,
             active: Tensor | None = None) -> tuple[Tensor, RetNetState]:
        """`decode_one` of token [B] on state; returns logits [B, V] and the new state."""
        spare = self._spare
        if spare is None or not spare.fits(state):
            spare = state.empty_like()
        logits, new = decode_one(model, token, state, active, out=spare)
        self._spare = state
        return logits, new


def generate_stream(model: RetNetLM, input_ids: Tensor, max_new_tokens: int, *,
                    attention_mask: Tensor | None = None, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, eos_token_id: int | None = None,
                    pad_token_id: int | None = None, stop: Sequence[str] | None = None,
                    tokenizer: Tokenizer | None = None, seed: int | Sequence[int] | None = None,
                    state: RetNetState | None = None, prefill_form: Form = CHUNKWISE
                    ) -> Iterator[tuple[Tensor, RetNetState | None]]:
    """Yield one ([B] new tokens, state) per generated token: state is None but on the last
    item, where it is the state after every token (the last one included).

    input_ids [B, T], left-padded under attention_mask [B, T]. A row stops at eos_token_id or
    once its text (decoded by tokenizer) holds one of the stop strings; finished rows yield
    pad_token_id, and once every row has stopped the stream ends. max_new_tokens 0 yields
    nothing (the prompt is not read): the state after the prompt alone is `prefill`'s. The
    caller's state is never modified. temperature 0 is greedy, and so is one small enough to
    overflow the logits (1e-40); one that is not finite is a ValueError (`SamplingParams`)."""
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    B, _ = check_prompt(input_ids, attention_mask)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: pass tokenizer=...")
    if max_new_tokens == 0:
        return
    pad = pad_id(pad_token_id, eos_token_id)
    generators = make_generators(seed, B)
    seen = _seen_tokens(input_ids, attention_mask, model.config.vocab_size, params)
    logits, state = prefill(model, input_ids, attention_mask, state, form=prefill_form)
    active = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    texts = [TextStream(tokenizer, stop) for _ in range(B)] if stop else None
    buffers = StepBuffers()  # prefill made a fresh state: this loop owns every state it steps
    for n in range(1, max_new_tokens + 1):
        token = sample(logits, params, generators, seen).masked_fill(~active, pad)
        if seen is not None:
            seen[torch.arange(B), token] |= active
        # the rows that read this token (its eos included) before the ones that go on
        reading, active = active, _still_active(token, active, eos_token_id, texts)
        if n == max_new_tokens or not active.any():
            _, state = buffers.step(model, token, state, reading)
            yield token, state
            return
        # yielded before the step, so the text streams while the state consumes the token
        yield token, None
        logits, state = buffers.step(model, token, state, reading)


def generate(model: RetNetLM, input_ids: Tensor, max_new_tokens: int, **kwargs
             ) -> Tensor | tuple[Tensor, RetNetState]:
    """Prompt plus up to max_new_tokens new tokens, [B, T_prompt + N] (rows that stop early are
    filled with the pad id), or (tokens, state) with return_state=True; the state has consumed
    every returned token. Arguments as `generate_stream`, plus return_state."""
    return_state = kwargs.pop("return_state", False)
    pad = pad_id(kwargs.get("pad_token_id"), kwargs.get("eos_token_id"))
    items = list(generate_stream(model, input_ids, max_new_tokens, **kwargs))
    steps = [token for token, _ in items]
    final = items[-1][1] if items else None  # the last item's: the state after every token
    if final is None and return_state:  # nothing generated: the state after the prompt
        _, final = prefill(model, input_ids, kwargs.get("attention_mask"), kwargs.get("state"),
                           form=kwargs.get("prefill_form", CHUNKWISE))
    new = (torch.stack(steps, 1) if steps
           else input_ids.new_empty(input_ids.shape[0], 0))
    if new.shape[1] < max_new_tokens:  # everyone stopped early
        fill = new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad)
        new = torch.cat([new, fill], 1)
    tokens = torch.cat([input_ids, new], 1)
    return (tokens, final) if return_state else tokens


def check_prompt(input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[int, int]:
    """(B, T) of prompt ids [B, T] (the model's `check_ids`), left-padded under
    attention_mask [B, T]: its last position must be real in every row."""
    B, T = check_ids(input_ids, attention_mask)
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("the last position of every row must be a real token: pad prompts "
                         "on the left")
    return B, T


def pad_id(pad_token_id: int | None, eos_token_id: int | None) -> int:
    """The id finished rows are filled with: pad_token_id, else eos_token_id, else 0."""
    return pad_token_id if pad_token_id is not None else (eos_token_id or 0)


def _seen_tokens(input_ids: Tensor, mask: Tensor | None, vocab: int,
                 params: SamplingParams) -> Tensor | None:
    if params.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    seen.scatter_(1, input_ids.clamp(max=vocab - 1), real)
    return seen


def _still_active(token: Tensor, active: Tensor, eos_token_id: int | None,
                  texts: list[TextStream] | None) -> Tensor:
    """[B] bool, a new tensor: the rows of `active` that go on after token [B], neither at
    eos_token_id nor with a stop string in their text (which reads the token)."""
    if eos_token_id is not None:
        active = active & (token != eos_token_id)
    if texts is not None:
        active = active & ~_hit_stop(token, active, texts)
    return active


def _hit_stop(token: Tensor, active: Tensor, texts: list[TextStream]) -> Tensor:
    """[B] bool: the rows still active whose text now holds a stop string."""
    hit = [False] * len(texts)
    for row, (tok, live) in enumerate(zip(token.tolist(), active.tolist())):
        if live:
            texts[row].push(tok)
            hit[row] = texts[row].stopped
    return torch.tensor(hit, device=active.device)
