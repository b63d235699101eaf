"""Long work shows progress and says what it does: training's start-up line, the corpus
tokenisation bar (grouping changes no id) and the perplexity bar."""

import re

import torch

from helpers import tiny_model
from retnet import data
from retnet.checkpoint import load_checkpoint
from retnet.eval.scoring import perplexity
from retnet.tokenizer import ByteTokenizer
from retnet.train import TrainConfig, train


def test_training_prints_a_start_up_summary(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(run), steps=2, batch_size=2,
                      seq_len=16, eval_every=2, grad_accum=2))
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train: ")]
    model = load_checkpoint(run).build_model()
    meta = load_checkpoint(run).meta
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f}M parameters (tiny, parallel form) on cpu, float32" in line
    assert f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens" in line
    epochs = 2 * 64 / meta["train_tokens"]
    assert f"2 steps of 64 tokens ({epochs:.2f} epochs), from step 0; writing {run}" in line


def test_tokenisation_in_groups_under_a_bar_changes_no_id(monkeypatch, capsys):
    monkeypatch.setattr(data, "BAR_ABOVE_CHARS", 0)
    monkeypatch.setattr(data, "GROUP_CHARS", 10)  # many groups, a text longer than one
    texts = ["short", "a much longer text than one group", "", "ß and ü", "x" * 25]
    tok = ByteTokenizer()
    assert data.encode_all(texts, tok, "tokenizing test") == [tok.encode(t) for t in texts]
    err = capsys.readouterr().err
    total = sum(map(len, texts))
    assert re.search(rf"tokenizing test: 100%.*{total}.0/{total}.0", err), err


def test_perplexity_shows_a_bar_over_the_bytes(capsys):
    model = tiny_model(torch.float64, vocab_size=258).eval()
    texts = ["abc " * 20, "ü" * 10]
    perplexity(model, ByteTokenizer(), texts)
    err = capsys.readouterr().err
    assert re.search(r"perplexity: 100%.*100/100 \[.*ppl=", err), err
