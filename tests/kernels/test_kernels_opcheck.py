"""`torch.library.opcheck` on every compiled op with tensors (schema, fake implementation against
the real kernel, autograd registration, AOT dispatch), as pytorch/extension-cpp tests its ops;
and the architecture passed to the decode step by name (`decode_fields`)."""

from __future__ import annotations

import pytest
import torch

from retnet import kernels
from retnet.kernels.decode import _architecture, _build
from retnet.model import RetNetConfig, RetNetLM


@pytest.fixture(autouse=True)
def loaded(kernels_on):
    assert kernels.cpu_kernels()  # this machine has g++: the build must work


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_linear(dtype):
    x = torch.randn(3, 40)
    w = torch.randint(-127, 128, (7, 40), dtype=torch.int8) if dtype == torch.int8 \
        else torch.randn(7, 40).to(dtype)
    scale = torch.rand(7) if dtype == torch.int8 else torch.empty(0)
    torch.library.opcheck(torch.ops.retnet.linear.default, (x, w, scale))


def test_head_norm_gate_and_its_backward():
    of, floor = torch.randn(2, 5, 4, 9), torch.rand(2, 5, 4) + 0.5
    g, w, b = torch.randn(2, 5, 32), torch.randn(32), torch.randn(32)
    torch.library.opcheck(torch.ops.retnet.head_norm_gate.default, (of, floor, g, w, b, 1e-5))
    torch.library.opcheck(torch.ops.retnet.head_norm_gate_backward.default,
                          (torch.randn(2, 5, 32), of, floor, g, w, b, 1e-5))


def _decode_args(model: RetNetLM, B: int) -> tuple:
    """decode_step's arguments for B rows, with no stamp to check (opcheck copies the
    arguments, and the copies' addresses are not those the stamp records)."""
    plan = _build(model)[2]
    state = model.init_state(B)
    kv_in = [torch.randn_like(t) for t in state.kv]
    kv_out = [torch.empty_like(t) for t in state.kv]
    return (torch.tensor([3, 7, 1][:B]), torch.empty(0, dtype=torch.bool),
            torch.tensor([0, 5, 9][:B]), torch.empty(B, dtype=torch.long), plan["embed"],
            plan["embed_scale"], plan["weights"], plan["scales"], plan["vectors"], kv_in,
            kv_out, plan["log_decay"], plan["inv_freq"], plan["ints"], plan["floats"],
            [], torch.empty(0, dtype=torch.long))


def test_decode_step():
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=61)).eval()
    torch.library.opcheck(torch.ops.retnet.decode_step.default, _decode_args(model, 3))


def test_architecture_goes_by_name():
    """Every field the kernel lists is filled from the config by name, choices by their
    position in the kernel's list; a config the kernel cannot code fails, not guesses."""
    c = RetNetConfig.from_preset("tiny", norm="rms", head_norm="none", ffn="glu-swish",
                                 use_gate=False, scale_embeddings=False)
    ints, floats = _architecture(c)
    fields = [f.split(":")[1].split("=")[0] for f in torch.ops.retnet.decode_fields()]
    named = dict(zip(fields, ints + floats))
    assert named["n_layers"] == c.n_layers and named["d_model"] == c.d_model
    assert named["value_head_dim"] == c.value_head_dim and named["ffn_dim"] == c.ffn_dim
    assert (named["norm"], named["head_norm"], named["ffn"]) == (1, 2, 2)
    assert (named["use_gate"], named["glu"], named["embed_scale"]) == (0, 1, 1.0)
    assert named["norm_eps"] == c.norm_eps
    args = list(_decode_args(RetNetLM(RetNetConfig.from_preset("tiny")).eval(), 1))
    args[13] = args[13][:-1]  # one field short: the kernel refuses in one line
    with pytest.raises(RuntimeError, match="decode_fields"):
        torch.ops.retnet.decode_step(*args)
