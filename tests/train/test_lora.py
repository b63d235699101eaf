"""Native LoRA (`retnet.modules.lora`, `retnet.adapter`): the forward is W + (α/r)·B·A written
out, merging changes no logit, only the adapters train, adapter files round-trip, and an
unmerged model never reaches the fused decode step (which would leave the adapters out)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model, tokens
from retnet.adapter import apply_adapter, read_adapter, save_adapter
from retnet.kernels import dispatch
from retnet.model import RetNetConfig, RetNetLM
from retnet.modules.layout import use_decode_layout
from retnet.modules.lora import (
    TARGETS,
    add_lora,
    lora_layers,
    merge_lora,
    merged_state_dict,
    parse_targets,
)
from retnet.ops import RECURRENT

ALL = tuple(TARGETS)
RANK, ALPHA = 4, 12.0  # α/r = 3: a scale of α (12) or 1 would be far off


def _with_adapters(dtype=torch.float64, targets=ALL, ffn="glu-swish"):
    """(base copy, model with random non-zero A and B) on a tiny model of `dtype`."""
    base = tiny_model(dtype, ffn=ffn)
    model = tiny_model(dtype, ffn=ffn)
    torch.manual_seed(1)
    add_lora(model, RANK, ALPHA, targets)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)  # B starts at zero: make the update visible
    return base, model


def _by_hand(base: RetNetLM, model: RetNetLM) -> RetNetLM:
    """`base` with each wrapped weight replaced by W + (α/r)·B·A, computed here."""
    state = base.state_dict()
    for name, layer in lora_layers(model).items():
        state[f"{name}.weight"] = (state[f"{name}.weight"]
                                   + ALPHA / RANK * layer.lora_B.detach() @ layer.lora_A.detach())
    base.load_state_dict(state)
    return base


@pytest.mark.parametrize("targets", [ALL, ("q", "v"), ("ffn",)], ids=["all", "qv", "ffn"])
def test_forward_is_w_plus_scaled_ba(targets):
    """float64, 1e-10: the unmerged forward equals a plain model with W + (α/r)·B·A."""
    base, model = _with_adapters(targets=targets)
    ids = tokens(2, 23)
    expected = _by_hand(base, model)(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)


def test_merge_keeps_logits():
    """merged_state_dict and merge_lora give the unmerged logits (float32, 1e-5; float64
    1e-10), and merging leaves plain projections that the layout can fuse again."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        _, model = _with_adapters(dtype)
        ids = tokens(2, 19)
        unmerged = model(ids).logits
        plain = tiny_model(dtype, ffn="glu-swish")
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(ids).logits, unmerged, rtol=0, atol=tol)
        merge_lora(model)
        assert not lora_layers(model) and dispatch.ADAPTERS not in model.__dict__
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=tol)
        assert set(model.state_dict()) == set(plain.state_dict())


def test_only_adapters_get_gradients():
    _, model = _with_adapters(torch.float32)
    model.train()
    ids = tokens(2, 16)
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if is_lora else p.grad is None


def test_adapter_file_round_trips(tmp_path):
    _, model = _with_adapters(torch.float32)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    tensors, meta = read_adapter(path)
    assert (int(meta["rank"]), float(meta["alpha"])) == (RANK, ALPHA)
    loaded = apply_adapter(tiny_model(ffn="glu-swish"), path, merge=False)
    for name, layer in lora_layers(model).items():
        assert torch.equal(lora_layers(loaded)[name].lora_A, layer.lora_A)
        assert torch.equal(tensors[f"{name}.lora_B"], layer.lora_B)
    ids = tokens(1, 12)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    merged = apply_adapter(tiny_model(ffn="glu-swish"), path)
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="another base model"):
        apply_adapter(tiny_model(n_layers=3, ffn="glu-swish"), path)


def test_targets_are_checked():
    assert parse_targets("q, v,q") == ("q", "v")
    with pytest.raises(ValueError, match="unknown target x"):
        parse_targets("q,x")
    with pytest.raises(ValueError, match="none of those"):
        add_lora(tiny_model(use_gate=False), 2, 2.0, ("g",))


@pytest.mark.usefixtures("kernels_on")
def test_unmerged_model_decodes_through_the_reference():
    """A one-token recurrent step of an unmerged model, in the decode layout with the fast
    paths on, equals the parallel form; the table names the reference for it, and the fused
    step (where built) declines even without the flag (as for PEFT's layers)."""
    _, model = _with_adapters(torch.float32, ffn="gelu")
    ids = tokens(1, 9)
    full = model(ids).logits
    use_decode_layout(model)
    state = model(ids[:, :-1]).state
    with torch.no_grad():
        step = model(ids[:, -1:], state=state, mode=RECURRENT).logits
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=0, atol=1e-5)
    with torch.no_grad():
        call = dispatch._decode(model, ids[:, -1])
    assert call.adapters and dispatch.first("decode_step", call) is None
    assert "unmerged LoRA" in dispatch.explain("decode_step", call)
    if dispatch.switch.cpu_kernels():
        from retnet.kernels.decode import plan

        model.__dict__.pop(dispatch.ADAPTERS)
        assert plan(model) is None
    merge_lora(model)
    assert not dispatch._decode(model, ids[:, -1]).adapters


def test_merged_model_is_a_plain_model():
    """After merging, the model is what RetNetLM(config) builds: its state dict loads there."""
    _, model = _with_adapters(torch.float32)
    merge_lora(model)
    fresh = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=256, ffn="glu-swish"))
    fresh.load_state_dict(model.state_dict())


def _saved_activation_bytes(model: RetNetLM, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of a training loss,
    parameters left out: the activation memory of the step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], mode="chunkwise", targets=ids[:, 1:])
    return sum(seen.values())


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of every node of t's autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {n.name() for n in seen}


@pytest.mark.usefixtures("kernels_on")
@pytest.mark.parametrize("ffn", ["gelu", "glu-swish"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_training_takes_the_fused_paths_with_the_same_gradients(ffn, dtype):
    """With adapters on every projection, a training step runs the norm+projections, the
    activation+down projection and (float32, the C++ kernel) the output stage with W_O through
    the recomputing Functions, LoRA inside them, with the loss and every adapter gradient of
    the reference (switch off; float64 1e-10, float32 1e-5 relative), and keeps no more
    activation memory than full fine-tuning of the same model (no LoRA input kept beside
    what the fused paths keep)."""
    from retnet import kernels

    _, model = _with_adapters(dtype, ffn=ffn)
    model.train()
    ids = tokens(2, 24)
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    names = _graph_nodes(loss)
    assert "_LayerNormLinearBackward" in names
    assert ("_ActLinearBackward" in names) == (ffn == "gelu")  # a GLU's down has no fusion
    assert ("HeadNormGateBackward" in names) == (dtype == torch.float32)  # C++: float32 only
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, adapters)
    kernels.set_enabled(False)
    ref_loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    want = torch.autograd.grad(ref_loss, adapters)
    kernels.set_enabled(True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= tol * b.abs().max()
    # Full fine-tuning also keeps the tied head's weight gradient (the chunked loss computes
    # it in the forward); LoRA keeps what it keeps, less that, within 1% (the [N, r] products)
    full = tiny_model(dtype, ffn=ffn).train()
    full_bytes, head = _saved_activation_bytes(full, ids), full.embed.weight
    assert (_saved_activation_bytes(model, ids)
            <= full_bytes - head.numel() * head.element_size() + 0.01 * full_bytes)
