"""The state at work, on a model whose next byte depends on its history (tests/recall.py):
the proof that the model needs its state, then generation from a given state, state files,
and the repetition penalty, each against a computation that does not use the code under test."""

import random

import pytest
import torch

from recall import EOS, copy_accuracy, episode, random_word, recall_model, save_recall_run
from reference import rel_err
from retnet import generate, load_state, save_state
from retnet.cli import main
from retnet.generation import penalise_repetition
from retnet.tokenizer import ByteTokenizer

WORDS = [random_word(random.Random(i)) for i in range(40)]


@pytest.fixture(scope="module")
def model():
    return recall_model()


def ids(text: str, bos: bool = True) -> torch.Tensor:
    return torch.tensor([([EOS] if bos else []) + list(text.encode())])


def test_the_model_copies_from_its_state_and_fails_without_it(model):
    assert copy_accuracy(model, WORDS) >= 0.9
    history = "".join(episode(random_word(random.Random(100 + i))) for i in range(3))
    assert copy_accuracy(model, WORDS, history=history) >= 0.9  # after a warm state too
    # chance is 1/26 ≈ 0.04: with the state zeroed before the copy, or the word replaced
    assert copy_accuracy(model, WORDS, zero_state=True) <= 0.15
    altered = 0
    for word, other in zip(WORDS, WORDS[1:] + WORDS[:1]):
        n = min(len(word), len(other))
        x = ids(f"{other[:n]}|{word[:n]}")
        pred = model(x[:, :-1]).logits[0, n + 1:].argmax(-1)
        altered += int((pred == x[0, n + 2:]).sum()) / n
    assert altered / len(WORDS) <= 0.15


def test_generate_from_a_state_equals_the_run_of_the_whole_sequence(model):
    text = episode(WORDS[0]) + WORDS[1] + "|"
    cut = len(WORDS[0]) + 4  # inside the first copy
    whole = ids(text)
    state = model(whole[:, :cut]).state
    before = state.clone()
    out, final = generate(model, whole[:, cut:], 20, state=state, return_state=True)
    ref, ref_final = generate(model, whole, 20, return_state=True)
    assert torch.equal(out[0, -20:], ref[0, -20:])
    assert ByteTokenizer().decode(out[0, -20:].tolist()).startswith(WORDS[1] + "\n")
    assert torch.equal(final.offset, ref_final.offset)
    assert max(rel_err(a, b) for a, b in zip(final.kv, ref_final.kv)) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(state.kv, before.kv))  # the input state


def test_save_load_continue_equals_the_uninterrupted_run_in_logits(model, tmp_path):
    prompt = ids(WORDS[2] + "|" + WORDS[2][:3])
    first, state = generate(model, prompt, 4, return_state=True)
    save_state(tmp_path / "s.safetensors", state, model.config.fingerprint())
    loaded = load_state(tmp_path / "s.safetensors", model.config.fingerprint())
    rest = ids("\n" + WORDS[3] + "|" + WORDS[3], bos=False)
    resumed = model(rest, state=loaded, mode="recurrent").logits
    straight = model(torch.cat([first, rest], 1)).logits[:, first.shape[1]:]
    assert rel_err(resumed, straight) < 1e-10
    assert torch.equal(loaded.offset, torch.tensor([first.shape[1]]))


def test_cli_state_out_then_state_in_continues_the_document(tmp_path, capsys):
    run = save_recall_run(tmp_path / "run")
    state = tmp_path / "doc.safetensors"
    word = WORDS[4]
    assert main(["generate", "--checkpoint", str(run), "--prompt", word, "--max-new-tokens",
                 "0", "--state-out", str(state)]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "|", "--max-new-tokens",
                 str(len(word)), "--temperature", "0", "--state-in", str(state)]) == 0
    assert capsys.readouterr().out.strip() == "|" + word


def penalised_greedy(model, prompt: torch.Tensor, steps: int, penalty: float) -> list[int]:
    """Greedy decoding by full forwards with CTRL's penalty written out by hand."""
    seq = prompt[0].tolist()
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1].tolist()
        for t in set(seq):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        seq.append(max(range(len(logits)), key=logits.__getitem__))
    return seq


def test_repetition_penalty_changes_exactly_the_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    got = penalise_repetition(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -2.0, 0.5, -3.0, 2.0]]  # seen: toward zero if > 0, else away
    assert torch.equal(penalise_repetition(logits, seen, 1.0), logits)


def test_repetition_penalty_in_generate_equals_the_hand_written_loop(model):
    prompt = ids("abcabcab|abcab")  # copying needs repeated letters: the penalty must bite
    plain = generate(model, prompt, 8)[0].tolist()
    for penalty in (1.5, 4.0):
        got = generate(model, prompt, 8, repetition_penalty=penalty)[0].tolist()
        assert got == penalised_greedy(model, prompt, 8, penalty)
    assert got != plain
