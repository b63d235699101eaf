"""`retnet eval`'s lm-eval users' options: --output_path (--out kept), --log-samples (lm-eval's
sample records beside the results), --gen-kwargs (reaching generate-until tasks) and
--device (a device the machine lacks is one line, before anything loads)."""

import json
import math

import pytest
import torch

from recall import save_recall_run
from retnet.cli import main
from retnet.loading import load


def greedy(model, tok, prompt: str, steps: int) -> str:
    """Reference: `steps` argmax tokens, each from a full forward of the whole prefix."""
    ids = tok.encode(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits  # [1, T, vocab]
        ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


@pytest.mark.slow
def test_eval_logs_samples_and_applies_gen_kwargs(tmp_path, capsys):
    run = save_recall_run(tmp_path / "run")
    out = tmp_path / "res" / "r.json"
    assert main(["eval", "--checkpoint", str(run), "--tasks", "retnet_gen", "--log-samples",
                 "--output_path", str(out), "--gen-kwargs", "max_gen_toks=5",
                 "do_sample=false", "--device", "cpu"]) == 0
    assert "retnet_gen: exact_match" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert "exact_match,none" in results["tasks"]["retnet_gen"]
    rows = [json.loads(line) for line in
            (out.parent / "r_samples_retnet_gen.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    model, tok = load(run)
    for row in rows:
        context, kwargs = row["arguments"][0]
        assert kwargs["max_gen_toks"] == 5  # the task's own value is 8
        assert row["resps"][0][0] == greedy(model, tok, context, 5).split("\n")[0]


def test_eval_refuses_log_samples_without_a_path_and_a_missing_device(tmp_path, capsys):
    assert main(["eval", "--checkpoint", "x", "--tasks", "retnet_mc", "--log-samples"]) == 2
    assert "--log-samples writes its samples beside --output-path" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eval", "--checkpoint", "x", "--tasks", "retnet_mc",
                     "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("retnet eval: error: device cuda is not available here")
        assert "\n" not in err


def test_document_perplexity_is_its_float64_definition():
    """perplexity(): each document whole after BOS, token-weighted over documents, bits per
    byte over UTF-8 bytes; the reference is one plain float64 forward per document."""
    from helpers import tiny_model
    from retnet.eval.scoring import perplexity
    from retnet.tokenizer import ByteTokenizer

    model, tok = tiny_model(torch.float64, vocab_size=258).eval(), ByteTokenizer()
    texts = ["def f(x):\n    return x\n" * 9, "", "é = 1 # ünïcode\n" * 4, "a"]
    logprob, tokens = 0.0, 0
    for text in texts:
        ids = [tok.eos_id, *tok.encode(text)]
        if len(ids) == 1:
            continue
        with torch.no_grad():
            lp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
        logprob += lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        tokens += len(ids) - 1
    nbytes = sum(len(t.encode()) for t in texts)
    got = perplexity(model, tok, texts)
    assert got["tokens"] == tokens and got["bytes"] == nbytes
    assert got["perplexity"] == pytest.approx(math.exp(-logprob / tokens), rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx(-logprob / nbytes / math.log(2), rel=1e-12)


@pytest.mark.slow
def test_perplexity_reads_only_the_documents_limit_keeps(tmp_path, capsys):
    """--limit shortened the lm-eval tasks only: the perplexity pass read every validation
    document whatever the limit (#34)."""
    from retnet.data import load_documents, split_documents
    from retnet.eval.command import limited

    run = save_recall_run(tmp_path / "run")
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: " + "ab " * (i % 7)}) + "\n"
                            for i in range(1000)))
    _, val = split_documents(load_documents(str(data)))
    _, tok = load(run)
    out = tmp_path / "r.json"

    def tokens(*limit: str) -> int:
        assert main(["eval", "--checkpoint", str(run), "--perplexity", str(data),
                     "--out", str(out), *limit]) == 0
        return json.loads(out.read_text())["perplexity"]["tokens"]

    assert len(val) >= 3  # about 20: 2% by a hash of each name
    assert tokens("--limit", "2") == sum(len(tok.encode(d.text)) for d in val[:2])
    assert tokens() == sum(len(tok.encode(d.text)) for d in val)
    assert (limited(10, None), limited(10, 3), limited(10, 0.25), limited(2, 5)) == (10, 3, 3, 2)
