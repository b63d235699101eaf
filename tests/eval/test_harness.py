"""lm-evaluation-harness integration, offline, on the task files shipped in the package."""

import random

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance

from helpers import tiny_model
from recall import random_word, recall_model
from retnet.cli import main
from retnet.eval import continuation_logprobs, document_logprob
from retnet.eval.harness import RetNetHarnessLM
from retnet.eval.tasks import task_manager
from retnet.ops import PARALLEL, Form
from retnet.tokenizer import ByteTokenizer


def lm(batch_size=8, dtype=torch.float32):
    return RetNetHarnessLM(model=tiny_model(dtype, vocab_size=258), tokenizer=ByteTokenizer(),
                           batch_size=batch_size)


def request(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihoods_do_not_depend_on_batch_size_or_order():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    pairs = [(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))),
              " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))))
             for _ in range(40)]
    reference = [x for x, _ in lm(1).loglikelihood([request("loglikelihood", p) for p in pairs],
                                                   disable_tqdm=True)]
    for batch in (8, 32):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        got = lm(batch).loglikelihood([request("loglikelihood", pairs[i]) for i in order],
                                      disable_tqdm=True)
        for j, i in enumerate(order):
            assert got[j][0] == pytest.approx(reference[i], abs=1e-4, rel=1e-5)


def test_loglikelihood_is_the_sum_of_log_softmax_of_a_plain_forward():
    """The reference: each (context, continuation) alone, unpadded, through the plain
    parallel forward; log-softmax summed over the positions that predict the continuation."""
    tok = ByteTokenizer()
    words = [random_word(random.Random(i)) for i in range(7)]
    pairs = [(f"{w}|", w) for w in words[:4]]  # copies: greedy at every position
    pairs += [(f"{w}|{w[:2]}", w[2:][::-1]) for w in words[4:]]  # wrong copies
    pairs += [("q", "r")]
    model = recall_model()
    got = RetNetHarnessLM(model=model, tokenizer=tok, batch_size=3).loglikelihood(
        [request("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx, cont = tok.encode(context), tok.encode(continuation)
        full = torch.tensor(ctx + cont)
        lp = model(full[None, :-1]).logits[0].log_softmax(-1)[len(ctx) - 1:]
        assert logprob == pytest.approx(lp.gather(-1, full[len(ctx):, None]).sum().item(),
                                        rel=1e-10)
        assert greedy == bool((lp.argmax(-1) == full[len(ctx):]).all())
    # both flags occur: the copies are the greedy choice, the reversed copies are not
    assert sum(g for _, g in got[:4]) >= 3 and not any(g for _, g in got[4:])


def test_rolling_equals_one_pass_over_the_document():
    model = lm(dtype=torch.float64)
    text = "the quick brown fox " * 30
    [got] = model.loglikelihood_rolling([request("loglikelihood_rolling", (text,))],
                                        disable_tqdm=True)
    ids = [256, *ByteTokenizer().encode(text)]
    logits = model.model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(expected, rel=1e-10)
    # reading in short segments with the state carried is the same computation
    seg = document_logprob(model.model, ids[1:], 256, segment=37)
    assert seg == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("form", [PARALLEL, Form("chunkwise", 5)], ids=["parallel", "chunk5"])
def test_scores_are_the_same_in_every_form(form):
    """The form the scorers read in is a parameter; the plain parallel forward is the
    reference for the document, the default form for the continuations."""
    model = recall_model()
    ids = ByteTokenizer().encode("the gate keeps the state " * 4)
    logits = model(torch.tensor([[256, *ids[:-1]]])).logits[0].log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(ids)[:, None]).sum().item()
    assert document_logprob(model, ids, 256, segment=29, form=form) == pytest.approx(
        expected, rel=1e-10)
    pairs = [(ids[:n], ids[n:n + 7]) for n in (3, 11, 40)]
    got = continuation_logprobs(model, pairs, batch_size=2, form=form)
    for (a, flag_a), (b, flag_b) in zip(got, continuation_logprobs(model, pairs, batch_size=2)):
        assert a == pytest.approx(b, rel=1e-10) and flag_a == flag_b


def test_generate_until_stops_at_the_stop_string():
    model = lm(dtype=torch.float64)
    [free] = model.generate_until([request("generate_until", ("abc", {"max_gen_toks": 12}))],
                                  disable_tqdm=True)
    stop = free[3:5]
    [cut] = model.generate_until([request("generate_until", ("abc", {"until": [stop],
                                                                     "max_gen_toks": 12}))],
                                 disable_tqdm=True)
    assert cut == free[:free.find(stop)]


def test_simple_evaluate_on_the_shipped_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths do not depend on the working directory
    out = simple_evaluate(model=lm(), tasks=["retnet_mc", "retnet_rolling", "retnet_gen"],
                          task_manager=task_manager(["retnet_mc"]))
    results = out["results"]
    assert 0.0 <= results["retnet_mc"]["acc,none"] <= 1.0
    assert results["retnet_rolling"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in results["retnet_gen"]


@pytest.mark.slow
def test_eval_cli_runs_tasks_and_perplexity(corpus, tmp_path, monkeypatch, capsys):
    from retnet.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(run), steps=2, batch_size=2,
                      seq_len=16, eval_every=2))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--tasks", "retnet_mc",
                 "--perplexity", str(corpus),
                 "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "retnet_mc: acc" in out
    assert (tmp_path / "r.json").is_file()
