"""Weight-only int8 (`retnet.quantize`): per-row scales within half a step of every weight, every
projection and the embedding replaced, and a quantised model that still runs every form."""

from __future__ import annotations

import pytest
import torch

import retnet
from retnet.model import RetNetConfig, RetNetLM
from retnet.modules.linear import Linear
from retnet.modules.quant import Int8Embedding, Int8Linear, quantize_rows


def test_rows_round_to_within_half_a_step():
    w = torch.randn(37, 29) * torch.logspace(-3, 1, 37)[:, None]  # rows of every magnitude
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (37,)
    err = (q.double() * s.double()[:, None] - w.double()).abs()
    assert (err <= s.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(1) == 127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_replaces_every_matrix(tied):
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=61, tie_embeddings=tied))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    retnet.quantize(model, "int8")
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert isinstance(model.embed, Int8Embedding)
    assert tied == (model.lm_head is None) and (tied or isinstance(model.lm_head, Int8Linear))
    assert all(p.dim() == 1 for p in model.parameters())  # only norm vectors stay float
    head = ref["embed.weight"] if tied else ref["lm_head.weight"]
    assert torch.allclose(model.output_weight, head, atol=head.abs().max().item() / 127)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        a = model(ids, mode="parallel").logits
        b = model(ids, mode="chunkwise", chunk_size=4).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int4'; use one of int8"):
        retnet.quantize(RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=61)), "int4")


@pytest.mark.slow
def test_eval_perplexity_in_each_weight_format(corpus, tmp_path, monkeypatch, capsys):
    """`retnet eval --dtype/--quantization` loads the weights as generate does: each format's
    perplexity is near float32's but not equal to it (the weights really changed); a
    quantization over bf16 weights is one line and exit 2."""
    import json

    from retnet.cli import main
    from retnet.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(run), steps=2, batch_size=2,
                      seq_len=16, eval_every=2))
    ppl = {}
    for name, flags in {"float32": [], "bfloat16": ["--dtype", "bfloat16"],
                        "int8": ["--quantization", "int8"]}.items():
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(run), "--perplexity", str(corpus),
                     "--out", str(out), *flags]) == 0
        ppl[name] = json.loads(out.read_text())["perplexity"]["perplexity"]
    for name in ("bfloat16", "int8"):
        assert ppl[name] != ppl["float32"]
        assert abs(ppl[name] / ppl["float32"] - 1) < 0.05
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--perplexity", "--dtype", "bfloat16",
                 "--quantization", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantization int8 quantises float32 weights" in err[0]


def test_int8_decodes_without_the_kernels_in_the_decode_layout():
    """In the transposed decode layout (which `use_inference_layout` chooses where the split
    GEMV runs and the fused step does not), int8 rows must keep multiplying through their
    scales (they once met the fused float projection and raised), and the steps equal the
    parallel form's logits."""
    from retnet import kernels
    from retnet.generation import decode_one
    from retnet.modules.layout import use_decode_layout

    torch.manual_seed(0)
    model = retnet.quantize(RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=61)).eval(),
                            "int8")
    ids = torch.randint(0, 61, (1, 7))  # one row: the matrix-vector path of `ops.linear`
    kernels.set_enabled(False)
    try:
        with torch.no_grad():
            want = model(ids, mode="parallel").logits  # [1, 7, 61]
            use_decode_layout(model)
            state, steps = model.init_state(1), []
            for t in range(ids.shape[1]):
                logits, state = decode_one(model, ids[:, t], state)
                steps.append(logits)
    finally:
        kernels.set_enabled(None)
    got = torch.stack(steps, 1)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
