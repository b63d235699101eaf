"""`retnet generate/serve --adapter FILE`: the one loader merges a LoRA adapter file into its
base model, so the logits equal those of the adapted model (and differ from the base), through
the fused inference layout the commands run."""

from __future__ import annotations

import pytest
import torch

from retnet.adapter import save_adapter
from retnet.checkpoint import save_checkpoint
from retnet.cli import main
from retnet.loading import load
from retnet.model import RetNetConfig, RetNetLM, load_state
from retnet.modules.lora import add_lora, lora_layers
from retnet.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A saved base run, an adapter file trained on it (B random, so it changes the
    logits) and the adapted model computing base + LoRA unmerged."""
    tmp = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258)).eval()
    save_checkpoint(tmp / "base", 1, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    add_lora(model, 4, 8.0, ("q", "v", "o", "ffn"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2)
    return tmp / "base", save_adapter(model, tmp / "adapter.safetensors"), model


IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", [None, "inference"])
def test_loaded_adapter_gives_the_adapted_logits(base_and_adapter, layout):
    base, adapter, adapted = base_and_adapter
    model, _ = load(base, adapter=adapter, layout=layout)
    plain, _ = load(base, layout=layout)
    with torch.no_grad():
        want = adapted(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=1e-5)
        assert (plain(IDS).logits - want).abs().max() > 1e-2
        # the decode step (the fused CPU kernel under the inference layout) too
        state = model.init_state(2)
        step = model(IDS[:, :1], state, mode="recurrent").logits
        torch.testing.assert_close(step, want[:, :1], rtol=0, atol=1e-5)
    assert not lora_layers(model)  # merged: plain projections, full-speed paths


def test_serve_applies_the_adapter(base_and_adapter):
    pytest.importorskip("fastapi")
    from retnet.serve import ServeConfig, build_app

    base, adapter, adapted = base_and_adapter
    _, engine, _ = build_app(ServeConfig(checkpoint=str(base), adapter=str(adapter)))
    try:
        with torch.no_grad():
            torch.testing.assert_close(engine.model(IDS).logits, adapted(IDS).logits,
                                       rtol=0, atol=1e-5)
    finally:
        engine.shutdown(0)


def test_generate_applies_the_adapter(base_and_adapter, tmp_path):
    """The state `retnet generate --adapter` saves after its prompt is the adapted model's
    (a random model's greedy tokens hardly depend on its weights: the state does)."""
    base, adapter, adapted = base_and_adapter
    out = tmp_path / "state.safetensors"
    assert main(["generate", "--checkpoint", str(base), "--prompt", "abcdef",
                 "--max-new-tokens", "0", "--state-out", str(out),
                 "--adapter", str(adapter)]) == 0
    saved = load_state(out, adapted.config.fingerprint())
    with torch.no_grad():
        want = adapted(torch.tensor([ByteTokenizer().encode("abcdef")])).state
    for got, ref in zip(saved.kv, want.kv):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_adapter_of_another_base_is_refused(base_and_adapter, tmp_path, capsys):
    _, adapter, _ = base_and_adapter
    other = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=300))
    save_checkpoint(tmp_path / "other", 1, other.state_dict(), other.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    args = ["generate", "--checkpoint", str(tmp_path / "other"), "--adapter", str(adapter)]
    assert main(args) == 2
    assert "trained on another base model" in capsys.readouterr().err
