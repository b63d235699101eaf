"""Generation: decode equals the forward, prefill forms agree, padding, state files, sampling."""

import random

import pytest
import torch

from helpers import tiny_model, tokens
from recall import random_word, recall_model
from reference import rel_err
from retnet import generate, generate_stream, load_state, save_state
from retnet.cli import main
from retnet.generation import SamplingParams, filter_logits, sample
from retnet.ops import Form


def test_greedy_equals_argmax_of_the_growing_parallel_forward():
    model = tiny_model(torch.float64)
    prompt = tokens(1, 12)
    out = generate(model, prompt, 64)
    seq = prompt
    for _ in range(64):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_decode_logits_equal_the_parallel_forward_float32():
    model = tiny_model(torch.float32)
    seq = tokens(2, 40)
    full = model(seq).logits
    out = model(seq[:, :8], mode="chunkwise")
    steps = [out.logits]
    state = out.state
    for t in range(8, 40):
        step = model(seq[:, t:t + 1], state=state, mode="recurrent")
        steps.append(step.logits)
        state = step.state
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


@pytest.mark.parametrize("mode,chunk", [("parallel", 64), ("chunkwise", 1), ("chunkwise", 7),
                                        ("chunkwise", 64), ("recurrent", 64)],
                         ids=["parallel", "chunk1", "chunk7", "chunk64", "token-by-token"])
def test_prefill_forms_give_the_same_state_and_continuation(mode, chunk):
    model = tiny_model(torch.float64)
    prompt = tokens(2, 50)
    ref_tokens, ref_state = generate(model, prompt, 20, return_state=True)
    out, state = generate(model, prompt, 20, prefill_form=Form(mode, chunk), return_state=True)
    assert torch.equal(out, ref_tokens)
    for a, b in zip(state.kv, ref_state.kv):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(state.offset, torch.tensor([70, 70]))


def left_pad(seqs, pad=0):
    width = max(s.shape[1] for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[1]:] = s[0]
        mask[i, width - s.shape[1]:] = 1
    return ids, mask


def copy_prompt(n: int, seed: int) -> torch.Tensor:
    """A prompt of the copy model (tests/recall.py) whose continuation needs its history."""
    word = random_word(random.Random(seed), n, n)
    return torch.tensor([[256, *f"{word}|{word[:2]}".encode()]])


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm-state"])
def test_left_padded_batch_equals_each_prompt_alone(warm):
    model = recall_model()
    prompts = [copy_prompt(n, seed=n) for n in (3, 15, 8, 6)]
    ids, mask = left_pad(prompts)
    state = model(tokens(4, 6, seed=99)).state if warm else None
    batch, final = generate(model, ids, 12, attention_mask=mask, state=state, return_state=True)
    for i, p in enumerate(prompts):
        alone, alone_final = generate(model, p, 12, return_state=True,
                                      state=None if state is None else state.select([i]))
        assert torch.equal(batch[i, -12:], alone[0, -12:]), i
        assert max(rel_err(a[i], b[0]) for a, b in zip(final.kv, alone_final.kv)) < 1e-10
        assert final.offset[i] == alone_final.offset[0]


def test_batch_of_one_with_padding():
    model = tiny_model(torch.float64)
    p = tokens(1, 10)
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), p], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], 1).long()
    assert torch.equal(generate(model, ids, 15, attention_mask=mask)[:, -15:],
                       generate(model, p, 15)[:, -15:])


def test_save_load_continue_equals_one_run(tmp_path):
    model = tiny_model(torch.float64)
    prompt, question = tokens(1, 20), tokens(1, 6, seed=7)
    first, state = generate(model, prompt, 10, return_state=True)
    assert torch.equal(state.offset, torch.tensor([30]))  # consumed every returned token
    save_state(tmp_path / "s.safetensors", state, model.config.fingerprint())
    loaded = load_state(tmp_path / "s.safetensors", model.config.fingerprint())
    assert all(torch.equal(a, b) for a, b in zip(state.kv, loaded.kv))
    resumed = generate(model, question, 20, state=loaded)
    straight = generate(model, torch.cat([first, question], 1), 20)
    assert torch.equal(resumed[:, -20:], straight[:, -20:])


def test_prefill_only_returns_the_prompt_state():
    model = tiny_model(torch.float64)
    prompt = tokens(2, 9)
    out, state = generate(model, prompt, 0, return_state=True)
    assert torch.equal(out, prompt)
    ref = model(prompt).state
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(state.kv, ref.kv))


def test_state_file_from_another_config_is_refused(tmp_path):
    model = tiny_model()
    state = model.init_state(1)
    save_state(tmp_path / "s.safetensors", state, model.config.fingerprint())
    other = tiny_model(n_layers=3)
    with pytest.raises(ValueError, match="another config"):
        load_state(tmp_path / "s.safetensors", other.config.fingerprint())
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="cannot read state file"):
        load_state(tmp_path / "junk.safetensors", model.config.fingerprint())


def test_calls_are_pure_and_a_cached_prefix_is_reusable():
    model = tiny_model(torch.float64)
    prefix = model(tokens(1, 30)).state
    before = prefix.clone()
    a = generate(model, tokens(1, 4, seed=1), 10, state=prefix)
    b = generate(model, tokens(1, 4, seed=2), 10, state=prefix)
    a2 = generate(model, tokens(1, 4, seed=1), 10, state=prefix)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(prefix.kv, before.kv))
    assert torch.equal(prefix.offset, before.offset)


def test_seeded_rows_do_not_depend_on_their_batch():
    model = tiny_model()
    p = tokens(1, 8)
    kw = dict(temperature=1.0, top_p=0.9, seed=1234)
    alone = generate(model, p, 20, **kw)
    batch = generate(model, torch.cat([tokens(1, 8, seed=5), p, p]), 20, **kw)
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[2], alone[0])
    assert torch.equal(generate(model, p, 20, **kw), alone)
    assert not torch.equal(generate(model, p, 20, temperature=1.0, seed=99), alone)


def test_each_row_draws_from_its_own_seed():
    model = tiny_model()
    p = tokens(3, 8)
    kw = dict(temperature=1.0, top_k=50)
    batch = generate(model, p, 20, seed=[11, 22, 33], **kw)
    for row, seed in enumerate((11, 22, 33)):
        assert torch.equal(batch[row], generate(model, p[row:row + 1], 20, seed=seed, **kw)[0])


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.tolist() == [[False, True, False, True, False]]
    # sorted: .4 (1), .3 (3), .15 (4), .1, .05: .4 + .3 < .8 so token 4 is needed; .85 ≥ .8
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.8))
    assert kept.tolist() == [[False, True, False, True, True]]
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.1))
    assert kept.tolist() == [[False, True, False, False, False]]
    draws = {int(sample(logits, SamplingParams(1.0, top_k=2), [torch.Generator().manual_seed(s)]))
             for s in range(200)}
    assert draws == {1, 3}


def test_eos_stops_a_row_and_pads_it():
    model = tiny_model(torch.float64)
    p = tokens(2, 6)
    free = generate(model, p, 12)
    eos = int(free[0, 6 + 3])  # the 4th new token of row 0
    out = generate(model, p, 12, eos_token_id=eos, pad_token_id=255)
    row = out[0, 6:].tolist()
    first = row.index(eos)
    assert all(t == 255 for t in row[first + 1:])
    assert row[:first + 1] == free[0, 6:6 + first + 1].tolist()


def test_stop_strings_need_a_tokenizer_and_stop():
    from retnet.tokenizer import ByteTokenizer

    model = tiny_model(torch.float64)
    p = tokens(1, 5)
    free = generate(model, p, 15)
    tok = ByteTokenizer()
    target = tok.decode(free[0, 5 + 4:5 + 6].tolist())
    with pytest.raises(ValueError, match="need the tokenizer"):
        generate(model, p, 15, stop=[target])
    if target and "\ufffd" not in target:
        out = generate(model, p, 15, stop=[target], tokenizer=tok, pad_token_id=0)
        assert target in tok.decode(out[0, 5:].tolist())
        assert (out[0, 5 + 6:] == 0).all()


def test_streaming_yields_the_greedy_tokens_of_the_growing_forward():
    model = recall_model()
    p = torch.cat([copy_prompt(9, seed=1), copy_prompt(9, seed=2)])
    streamed = torch.stack([t for t, _ in generate_stream(model, p, 9)], 1)
    seq = p
    for _ in range(9):  # the reference: argmax of a full forward, no state carried
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(streamed, seq[:, p.shape[1]:])


def test_right_padding_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, tokens(1, 4), 2, attention_mask=torch.tensor([[1, 1, 1, 0]]))


@pytest.mark.parametrize("stops", [False, True], ids=["to-the-limit", "eos-stops-early"])
def test_stream_yields_one_item_per_token_the_last_with_the_state(stops):
    """N tokens, N items, the state on the last only; it equals the state of one plain forward
    of each row's prompt and tokens (through its eos), in float64. 0 tokens: no item."""
    model = tiny_model(torch.float64)
    prompt, n, kw = tokens(2, 7), 12, dict(temperature=1.0, seed=[3, 4], pad_token_id=0)
    free = generate(model, prompt, n, **kw)[:, 7:]
    # eos: a token both rows make, so the stream ends early, each row at its own step
    both = set(free[0].tolist()) & set(free[1].tolist())
    eos = min(both, key=lambda t: max(row.index(t) for row in free.tolist())) if stops else None
    items = list(generate_stream(model, prompt, n, eos_token_id=eos, **kw))
    ends = [n if eos not in row else row.index(eos) + 1 for row in free.tolist()]
    assert len(items) == max(ends) and (max(ends) < n) == stops
    assert all(state is None for _, state in items[:-1])
    new, final = torch.stack([t for t, _ in items], 1), items[-1][1]
    for row, end in enumerate(ends):
        assert torch.equal(new[row, :end], free[row, :end])
        want = model(torch.cat([prompt[row], new[row, :end]])[None]).state
        got = final.select([row])
        assert all(rel_err(a, b) < 1e-12 for a, b in zip(got.kv, want.kv))
        assert torch.equal(got.offset, want.offset)
    assert list(generate_stream(model, prompt, 0)) == []


def test_state_select_clone_to_and_cat():
    model = tiny_model()
    state = model(tokens(3, 5)).state
    picked = state.select([2, 0])
    assert torch.equal(picked.kv[0][0], state.kv[0][2]) and picked.batch_size == 2
    joined = type(state).cat([picked, state.select([1])])
    assert joined.batch_size == 3 and torch.equal(joined.kv[1][2], state.kv[1][1])
    moved = state.to("cpu")
    assert moved.kv[0].dtype == torch.float32 and moved.offset.dtype == torch.long
    assert state.nbytes == 3 * state.nbytes_per_sequence


def test_cli_generate_streams_and_continues_a_state(corpus, tmp_path, capsys):
    from retnet.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(run), steps=2, batch_size=2,
                      seq_len=16, eval_every=2))
    capsys.readouterr()
    state = tmp_path / "doc.safetensors"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the quick",
                 "--max-new-tokens", "5", "--temperature", "0", "--state-out", str(state)]) == 0
    first = capsys.readouterr()
    assert first.out.startswith("the quick") and "saved to" in first.err
    assert main(["generate", "--checkpoint", str(run), "--prompt", " fox", "--max-new-tokens",
                 "3", "--state-in", str(state)]) == 0
    assert capsys.readouterr().out.startswith(" fox")


def test_a_long_prefill_is_read_in_segments_that_equal_one_pass(monkeypatch):
    """Above PREFILL_SEGMENT_TOKENS a chunkwise prefill runs as several forwards carrying the
    state; logits and state equal one forward's (float64, left padding in one row)."""
    from retnet.generation import loop

    model = tiny_model(torch.float64)
    ids = tokens(2, 50)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :9] = 0
    form = Form("chunkwise", 7)
    want = model(ids, attention_mask=mask, mode=form)
    monkeypatch.setattr(loop, "PREFILL_SEGMENT_TOKENS", 28)  # 14 per row: two chunks
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    logits, state = loop.prefill(model, ids, mask, form=form)
    assert len(calls) == 4  # 14 + 14 + 14 + 8 tokens per row
    assert rel_err(logits, want.logits[:, -1]) < 1e-10
    for a, b in zip(state.kv, want.state.kv):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(state.offset, want.state.offset)
