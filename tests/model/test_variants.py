"""Variant and ablation options of the one model: each changes the model as described, and the
three forms stay exact under every one of them."""

import math

import pytest
import torch

from helpers import FORM_IDS, FORMS, tiny_model, tokens
from reference import rel_err
from retnet import RetNetConfig
from retnet.ops import log_decays

TORCHSCALE = dict(norm="rms", head_norm="rms", ffn="glu-gelu", scale_embeddings=False,
                  decays="eq8", tie_embeddings=False, value_dim=96, ffn_dim=80, norm_eps=1e-6)
VARIANTS = {
    "torchscale": TORCHSCALE,
    "no-gate": dict(use_gate=False),
    "no-head-norm": dict(head_norm="none"),
    "no-decay": dict(decays="none"),
    "single-decay": dict(decays="single"),
    "more-heads": dict(n_heads=8),
    "glu-swish": dict(ffn="glu-swish"),
}


@pytest.mark.parametrize("form", FORMS[1:], ids=FORM_IDS[1:])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forms_agree_and_continue_for_every_variant(variant, form):
    model = tiny_model(torch.float64, **VARIANTS[variant])
    x = tokens(2, 45)
    ref = model(x)
    out = model(x, mode=form[0], chunk_size=form[1])
    assert rel_err(out.logits, ref.logits) < 1e-10
    a = model(x[:, :20], mode=form[0], chunk_size=form[1])
    b = model(x[:, 20:], state=a.state, mode=form[0], chunk_size=form[1])
    assert rel_err(torch.cat([a.logits, b.logits], 1), ref.logits) < 1e-10


def test_no_decay_is_the_undecayed_recurrence():
    assert torch.equal(log_decays(3, "none"), torch.zeros(3))
    model = tiny_model(torch.float64, decays="none")
    # γ = 1: the state after [t1, t2] equals the sum of the two single-token writes
    h = model.blocks[0].retention
    assert h.log_decay(torch.device("cpu"), torch.float64).abs().max() == 0
    from retnet.ops import retention_recurrent

    k, v = torch.randn(1, 3, 2, 4, dtype=torch.float64), torch.randn(1, 3, 2, 5,
                                                                     dtype=torch.float64)
    _, state = retention_recurrent(k, k, v, log_decays(2, "none", dtype=torch.float64))
    assert torch.allclose(state, torch.einsum("bthk,bthv->bhkv", k, v))


def test_decay_schemes_are_as_documented():
    assert torch.allclose(log_decays(4, "single").exp(), torch.full((4,), 127 / 128))
    eq8 = log_decays(3, "eq8", dtype=torch.float64).exp()
    assert torch.allclose(eq8, torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7], dtype=torch.float64))
    ms = 1 - log_decays(5, "multiscale", dtype=torch.float64).exp()
    assert ms[0] == pytest.approx(1 / 32) and ms[-1] == pytest.approx(1 / 512)
    # in float32 the slowest decay is still below 1 (in bf16 it would round to 1.0)
    assert log_decays(5, "multiscale").max() < 0


def test_no_gate_and_no_head_norm_remove_their_parameters():
    full = tiny_model()
    no_gate = tiny_model(use_gate=False)
    no_norm = tiny_model(head_norm="none")
    assert no_gate.blocks[0].retention.g_proj is None
    d = full.config.d_model
    assert full.num_parameters() - no_gate.num_parameters() == 2 * 2 * d * d  # 2 layers of W_G
    assert no_norm.blocks[0].retention.group_norm is None
    assert full.num_parameters() - no_norm.num_parameters() == 2 * 2 * 2 * d  # weight + bias


def test_smaller_head_dimension_keeps_the_parameter_count():
    a, b = tiny_model(), tiny_model(n_heads=8)
    assert a.num_parameters() == b.num_parameters()
    assert b.config.key_head_dim == 8 and b.config.value_head_dim == 16


def test_torchscale_variant_shapes():
    c = RetNetConfig.from_preset("tiny", **TORCHSCALE)
    model = tiny_model(**TORCHSCALE)
    assert isinstance(model.blocks[0].norm1, torch.nn.RMSNorm)
    assert model.blocks[0].ffn.gate.weight.shape == (80, 64)
    assert model.blocks[0].retention.v_proj.weight.shape == (96, 64)
    assert model.lm_head is not None and c.value_head_dim == 48
    # no embedding scale: the first block sees the raw embedding
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = tokens(1, 3)
    model(x)
    assert torch.equal(seen[0], model.embed(x))
    scaled = tiny_model()
    seen.clear()
    scaled.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    scaled(x)
    assert torch.allclose(seen[0], scaled.embed(x) * math.sqrt(64))


def test_bad_variant_names_are_rejected():
    for field, value in (("norm", "batch"), ("head_norm", "layer"), ("ffn", "relu")):
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            RetNetConfig.from_preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="value_dim .* divisible by n_heads"):
        RetNetConfig.from_preset("tiny", value_dim=65)
