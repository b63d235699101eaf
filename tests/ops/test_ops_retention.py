"""Every retention form against the float64 per-token reference: outputs, states, gradients."""

import pytest
import torch

from reference import reference_retention, rel_err
from retnet.ops import Form, log_decays, retention_chunkwise

B, T, H, K, V = 2, 29, 3, 4, 6
# chunk sizes: 1, 2, 3, a non-divisor of T, T itself, larger than T
FORMS = ["parallel", "recurrent"] + [f"chunkwise-{L}" for L in (1, 2, 3, 8, T, 64)]


def form_fn(name):
    if name.startswith("chunkwise"):
        return Form.of("chunkwise", int(name.split("-")[1]))
    return Form.of(name)


def make_inputs(dtype, with_state, with_mask, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if with_state else None
    mask = None
    if with_mask:
        mask = torch.ones(B, T)
        mask[0, :7] = 0  # left padding on row 0
        mask[1, 12] = 0  # and a hole in row 1
    tensors = [q, k, v] + ([state] if with_state else [])
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    q, k, v = tensors[:3]
    state = tensors[3] if with_state else None
    return q, k, v, log_decays(H, dtype=torch.float64), state, mask


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_form_matches_reference(form, dtype, tol, state, mask):
    q, k, v, ld, s0, m = make_inputs(dtype, state, mask)
    o, s = form_fn(form)(q, k, v, ld, s0, m)
    o_ref, s_ref = reference_retention(q, k, v, ld, s0, m)
    assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(s, s_ref) < tol
    if m is not None:  # only real positions' outputs matter
        keep = m.bool()
        o, o_ref = o[keep], o_ref[keep]
    assert rel_err(o, o_ref) < tol


@pytest.mark.parametrize("form", FORMS)
def test_gradients_match_reference(form):
    q, k, v, ld, s0, m = make_inputs(torch.float64, True, True, requires_grad=True)
    ld = ld.clone().requires_grad_(True)
    weights = torch.randn(B, T, H, V, dtype=torch.float64) * m[:, :, None, None]
    w_state = torch.randn(B, H, K, V, dtype=torch.float64)

    def grads(fn):
        o, s = fn(q, k, v, ld, s0, m)
        loss = (o * weights).sum() + (s * w_state).sum()
        return torch.autograd.grad(loss, (q, k, v, ld, s0))

    for name, g, g_ref in zip("q k v log_decay state".split(), grads(form_fn(form)),
                              grads(reference_retention)):
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunkwise-2"])
def test_gradcheck(form):
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 5, 2, 2), (1, 5, 2, 2), (1, 5, 2, 3), (1, 2, 2, 3)]
    q, k, v, s0 = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                   for s in shapes)
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    ld = log_decays(2, dtype=torch.float64)
    fn = form_fn(form)
    assert torch.autograd.gradcheck(lambda *a: fn(*a[:3], ld, a[3], mask), (q, k, v, s0))


@pytest.mark.parametrize("form", FORMS)
def test_split_with_state_equals_one_pass(form):
    q, k, v, ld, s0, m = make_inputs(torch.float64, True, True)
    o_full, s_full = reference_retention(q, k, v, ld, s0, m)
    fn = form_fn(form)
    o1, s1 = fn(q[:, :11], k[:, :11], v[:, :11], ld, s0, m[:, :11])
    o2, s2 = fn(q[:, 11:], k[:, 11:], v[:, 11:], ld, s1, m[:, 11:])
    assert rel_err(s2, s_full) < 1e-10
    assert rel_err(torch.cat([o1, o2], 1)[m.bool()], o_full[m.bool()]) < 1e-10


def test_state_stays_float32_under_bf16_autocast():
    q, k, v, ld, s0, m = make_inputs(torch.bfloat16, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = retention_chunkwise(q, k, v, ld.float(), s0, m, chunk_size=8)
    assert s.dtype == torch.float32 and o.dtype == torch.float32


def test_caller_state_not_modified():
    q, k, v, ld, s0, m = make_inputs(torch.float64, True, False)
    before = s0.clone()
    for name in FORMS:
        form_fn(name)(q, k, v, ld, s0, m)
    assert torch.equal(s0, before)


def test_long_decay_stays_finite():
    """exp of a positive distance would overflow; ours masks in log space first."""
    q = torch.randn(1, 4000, 1, 2)
    ld = torch.tensor([-0.5])  # γ ≈ 0.61: γ^(-4000) overflows float32 and float64
    o, s = Form.of("parallel")(q, q, q, ld)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("bad,message", [
    (dict(k=torch.zeros(2, 5, 3, 3)), "q and k must both be"),
    (dict(v=torch.zeros(2, 4, 3, 6)), "v must be"),
    (dict(log_decay=torch.zeros(2)), "log_decay must be"),
    (dict(state=torch.zeros(2, 3, 4, 5)), "state must be"),
    (dict(mask=torch.ones(2, 4)), "mask must be"),
])
def test_bad_shapes_name_the_argument(bad, message):
    args = dict(q=torch.zeros(2, 5, 3, 4), k=torch.zeros(2, 5, 3, 4), v=torch.zeros(2, 5, 3, 6),
                log_decay=torch.zeros(3), state=None, mask=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        Form.of("chunkwise", 2)(**args)


def test_unknown_mode_and_chunk_size():
    with pytest.raises(ValueError, match="unknown mode"):
        Form.of("sideways")
    with pytest.raises(ValueError, match="chunk_size"):
        Form.of("chunkwise", 0)
