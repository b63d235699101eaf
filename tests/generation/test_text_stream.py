"""TextStream (the one text-streaming helper) and StepBuffers (the one state double-buffer),
each against a plain reference: the whole decoded text cut at the earliest stop string, and
decode_one with a fresh state per step."""

import random

import pytest
import torch

from helpers import tiny_model, tokens
from reference import rel_err
from retnet.generation import StepBuffers, TextStream, decode_one, prefill
from retnet.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def stream_all(ids, stop=(), tokenizer=TOK):
    """Every push's text, then finish()'s."""
    text = TextStream(tokenizer, stop)
    parts = [text.push(t) for t in ids]
    return parts, text.finish(), text


def expected(text: str, stop) -> str:
    """The reference: the whole text, cut before the earliest occurrence of any stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def test_unfinished_utf8_characters_are_held_back_and_whole_ones_released_at_once():
    text = "hé€😀 ok"
    parts, rest, _ = stream_all(TOK.encode(text))
    assert "".join(parts) + rest == text and rest == ""
    assert not any("\ufffd" in p for p in parts)
    released, shown = "", []
    for p in parts:
        released += p
        shown.append(released)
    # after the last byte of each character, everything so far is out
    ends = [len(text[:i + 1].encode()) for i in range(len(text))]
    assert [shown[e - 1] for e in ends] == [text[:i + 1] for i in range(len(text))]


def test_finish_releases_an_unfinished_character_and_a_partial_stop():
    parts, rest, text = stream_all(TOK.encode("ab") + [0xE2, 0x82])
    assert "".join(parts) == "ab" and rest == "\ufffd" and not text.stopped
    parts, rest, text = stream_all(TOK.encode("abEN"), stop=["END"])
    assert "".join(parts) == "ab" and rest == "EN" and not text.stopped


def test_a_stop_string_is_cut_and_never_released():
    parts, rest, text = stream_all(TOK.encode("abENxEND tail"), stop=["END"])
    assert parts[:4] == ["a", "b", "", ""]  # "E", "EN" could grow into "END"
    assert parts[4] == "ENx"  # "ENx" cannot: released whole
    assert "".join(parts) + rest == "abENx" and rest == ""
    assert text.stopped
    assert len(text.ids) == len("abENxEND")  # later tokens are ignored
    assert text.push(ord("z")) == "" and text.finish() == ""


def test_the_earliest_of_several_stop_strings_wins():
    # "c" is listed first but "abc" starts earlier: the text is cut before "abc"
    parts, rest, text = stream_all(TOK.encode("xabcd"), stop=["c", "abc"])
    assert "".join(parts) + rest == "x" and text.stopped


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(TOK, ["", "x"])


@pytest.mark.parametrize("seed", range(30))
def test_random_texts_and_stops_equal_the_whole_text_cut(seed):
    """Random UTF-8 with multi-byte characters and random stops: the pieces add up to the
    reference; no piece is ever taken back; nothing is held back without a reason."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "c", "é", "€", "😀", "\n"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(0, 3))]
    ids = TOK.encode(text)
    parts, rest, stream = stream_all(ids, stop)
    final = expected(text, stop)
    assert "".join(parts) + rest == final
    assert stream.stopped == (final != text)
    released = ""
    for i, part in enumerate(parts):
        released += part
        assert final.startswith(released)
        so_far = TOK.decode(ids[:i + 1])
        if stream.stopped and len(released) == len(final):
            continue
        could_grow = any(so_far.endswith(s[:k]) for s in stop for k in range(1, len(s)))
        if not so_far.endswith("\ufffd") and not could_grow:
            assert released == so_far  # nothing held back needlessly


class WordTokenizer:
    """A decoder that is not a concatenation of its tokens: words joined by spaces."""

    words = ("alpha", "beta", "gamma", "STOP")

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_the_text_is_the_whole_decode_whatever_the_tokenizer():
    ids = [0, 1, 2, 1, 0]
    parts, rest, _ = stream_all(ids, tokenizer=WordTokenizer())
    assert "".join(parts) + rest == "alpha beta gamma beta alpha"
    parts, rest, _ = stream_all([0, 2, 3, 1], stop=[" STOP"], tokenizer=WordTokenizer())
    assert "".join(parts) + rest == "alpha gamma"


def test_step_buffers_equal_fresh_states_and_take_turns():
    model = tiny_model(torch.float64)
    _, state = prefill(model, tokens(3, 7))
    ref = state.clone()
    buffers = StepBuffers()
    pointers = []
    for t in range(6):
        token = tokens(3, 1, seed=t)[:, 0]
        logits, state = buffers.step(model, token, state)
        ref_logits, ref = decode_one(model, token, ref)
        assert rel_err(logits, ref_logits) < 1e-12
        assert all(rel_err(a, b) < 1e-12 for a, b in zip(state.kv, ref.kv))
        assert torch.equal(state.offset, ref.offset)
        pointers.append(state.kv[0].data_ptr())
    # two buffers alternate from the second step on (the first writes into a fresh one)
    assert pointers[1::2] == [pointers[1]] * 3 and pointers[2::2] == [pointers[2]] * 2
    assert pointers[1] != pointers[2]


def test_step_buffers_make_a_fresh_pair_when_rows_leave_and_respect_inactive_rows():
    model = tiny_model(torch.float64)
    _, state = prefill(model, tokens(3, 5))
    buffers = StepBuffers()
    token = tokens(3, 1, seed=1)[:, 0]
    _, state = buffers.step(model, token, state)
    _, state = buffers.step(model, token, state)
    fewer = state.select([0, 2])  # a row left: the batch shape changed
    ref = fewer.clone()
    active = torch.tensor([True, False])
    logits, out = buffers.step(model, token[:2], fewer, active)
    ref_logits, ref_out = decode_one(model, token[:2], ref, active)
    assert rel_err(logits, ref_logits) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(out.kv, ref_out.kv))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(out.kv, ref.kv))  # inactive: unchanged
    assert torch.equal(out.offset, ref.offset + torch.tensor([1, 0]))


class WholeDecodeBytes(ByteTokenizer):
    """The byte tokenizer without `concatenates`: TextStream decodes everything each push."""

    concatenates = False


class CountingBytes(ByteTokenizer):
    decoded = 0

    def decode(self, ids):
        ids = list(ids)
        CountingBytes.decoded += len(ids)
        return super().decode(ids)


@pytest.mark.parametrize("seed", range(10))
def test_decoding_only_after_the_settled_prefix_changes_no_push(seed):
    """Long random UTF-8 (multi-byte characters, stop strings, invalid bytes): every push and
    the finish are the same as with whole-sequence decoding."""
    rng = random.Random(100 + seed)
    alphabet = ["a", "b", " ", "é", "€", "😀", "\n"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(100, 300)))
    ids = TOK.encode(text)
    if seed % 3 == 0:  # a stray continuation byte: an invalid character in the middle
        ids.insert(len(ids) // 2, 0x80)
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4)))] if seed % 2 else []
    folded, rest, stream = stream_all(ids, stop)
    whole, whole_rest, _ = stream_all(ids, stop, tokenizer=WholeDecodeBytes())
    assert folded == whole and rest == whole_rest
    if not stream.stopped and len(ids) > 2 * TextStream.FOLD:
        assert stream._settled > 0


def test_a_long_stream_decodes_each_token_a_bounded_number_of_times():
    CountingBytes.decoded = 0
    ids = TOK.encode("ab€" * 2000)
    stream_all(ids, tokenizer=CountingBytes())
    assert CountingBytes.decoded <= (TextStream.FOLD + 1) * len(ids)
