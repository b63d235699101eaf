"""Sampling at the edges of its numbers (issue #37, item 4): a temperature that is not finite is
refused by `generate()`, the CLI and the server; a positive one so small that the logits
divided by it overflow (1e-40, 5e-324) samples greedily in all three (it gave the pad token at
every step)."""

import random

import httpx
import pytest
import torch

from helpers import tiny_model, tokens
from recall import episode, random_word, save_recall_run
from retnet import generate
from retnet.cli import main
from retnet.generation import SamplingParams, sample
from servers import start_server, stop_server

TINY = [1e-40, 5e-324, 1e-38]  # 1e-38: below float32's smallest normal number
WORD = random_word(random.Random(7), 9, 9)
PROMPT = episode(random_word(random.Random(70))) + WORD + "|"  # the copy model copies WORD


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_recall_run(tmp_path_factory.mktemp("sampling") / "run")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number ≥ 0"):
        SamplingParams(temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number ≥ 0"):
        generate(tiny_model(), tokens(1, 4), 2, temperature=temperature)


@pytest.mark.parametrize("name,value", [("top_p", float("nan")),
                                        ("repetition_penalty", float("inf")),
                                        ("presence_penalty", float("nan"))])
def test_the_other_sampling_numbers_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(temperature=1.0, **{name: value})


@pytest.mark.parametrize("temperature", TINY)
def test_a_temperature_that_overflows_the_logits_is_greedy(temperature):
    """Each row on its own: the first row's logits overflow at 1e-30 (logit 1e9 / 1e-30 is
    beyond float32), the second's do not and are sampled as before, from the same draw."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 5
    params = SamplingParams(temperature=temperature, top_k=10, top_p=0.9)
    assert torch.equal(sample(logits, params, None), logits.argmax(-1))
    mixed = torch.stack([logits[0] * 1e9, logits[1]])
    at = SamplingParams(temperature=1e-30)
    drawn = sample(mixed, at, [torch.Generator().manual_seed(1) for _ in range(2)])
    alone = sample(mixed[1:], at, [torch.Generator().manual_seed(1)])
    assert drawn[0] == mixed[0].argmax() and drawn[1] == alone[0]


@pytest.mark.parametrize("temperature", TINY[:2])  # the tiny model's logits are small
def test_generate_at_a_tiny_temperature_gives_the_greedy_tokens(temperature):
    model, prompt = tiny_model(), tokens(2, 9)
    greedy = generate(model, prompt, 12)
    assert torch.equal(generate(model, prompt, 12, temperature=temperature, seed=3), greedy)


@pytest.mark.parametrize("temperature", ["1e-40", "5e-324"])
def test_the_cli_at_a_tiny_temperature_prints_the_greedy_text(run, capsys, temperature):
    args = ["generate", "--checkpoint", str(run), "--prompt", PROMPT, "--max-new-tokens",
            str(len(WORD) + 1), "--stop", "\n"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy == PROMPT + WORD + "\n"  # the copy: the greedy text is not empty
    assert main([*args, "--temperature", temperature]) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_the_cli_refuses_a_temperature_that_is_not_finite(run, capsys, value):
    assert main(["generate", "--checkpoint", str(run), f"--temperature={value}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"retnet generate: error: --temperature must be a finite number ≥ 0; got {value}"]


def test_the_server_samples_greedily_at_a_tiny_temperature(run):
    """JSON has no NaN or Infinity, and 1e999 is a 400 already (test_serve_hardening); a
    tiny positive temperature passes the range check and must give the greedy text."""
    s = start_server(run)
    try:
        def text(temperature):
            r = httpx.post(s.url + "/v1/completions", timeout=30, json={
                "model": s.name, "prompt": PROMPT, "max_tokens": len(WORD) + 1, "stop": "\n",
                "temperature": temperature, "seed": 1})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert text(0) == WORD
        assert text(1e-40) == WORD and text(5e-324) == WORD
    finally:
        stop_server(s)


def test_a_draw_of_exactly_zero_never_picks_a_token_of_probability_zero(monkeypatch):
    """Inverse-CDF sampling with half-open intervals: u = 0 lands on the first token with
    mass, not on a leading token that top-k filtered out (cdf 0 there)."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    # top-k 2 leaves tokens 1 and 2: token 0 has probability 0 and must not be drawn
    assert sample(logits, SamplingParams(temperature=1.0, top_k=2), None).item() == 1
    assert sample(logits, SamplingParams(temperature=1.0), None).item() == 0  # it has mass
