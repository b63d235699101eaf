"""The ecosystem's fine-tuning paths on an exported model (`RetNetForCausalLM`): PEFT's LoRA
on the documented target modules trains, saves and loads back, and gives our native LoRA's
logits for the same A and B; TRL's SFTTrainer runs on a chat dataset and the loss falls."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from retnet.checkpoint import save_checkpoint  # noqa: E402
from retnet.hf import RetNetForCausalLM  # noqa: E402
from retnet.hf.export import export_checkpoint  # noqa: E402
from retnet.model import RetNetConfig, RetNetLM  # noqa: E402
from retnet.modules.lora import add_lora, lora_layers  # noqa: E402
from retnet.tokenizer import ByteTokenizer  # noqa: E402

# PEFT's target_modules for every projection `--lora-targets q,k,v,g,o,ffn` covers.
TARGETS = ["q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "up", "gate", "down"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258, ffn="glu-swish"))
    save_checkpoint(tmp / "run", 1, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    return str(export_checkpoint(tmp / "run", tmp / "hf"))


def _peft(path: str):
    base = RetNetForCausalLM.from_pretrained(path)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=TARGETS))


def test_peft_trains_saves_and_loads_back(exported, tmp_path):
    model = _peft(exported)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    back = peft.PeftModel.from_pretrained(RetNetForCausalLM.from_pretrained(exported),
                                          tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


def test_peft_and_native_lora_agree(exported):
    """The same A and B in PEFT's layers and ours give the same logits (float32, 1e-5)."""
    model = _peft(exported).eval()
    native = RetNetForCausalLM.from_pretrained(exported).model.eval()
    add_lora(native, 4, 8.0, ("q", "k", "v", "g", "o", "ffn"))
    with torch.no_grad():
        for name, layer in lora_layers(native).items():
            theirs = model.get_submodule(f"base_model.model.model.{name}")
            theirs.lora_B["default"].weight.normal_(0, 0.05)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)
        ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(native(ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_trl_sft_trainer_runs(exported, tmp_path):
    """TRL's SFTTrainer (its fused LM head reads `base_model(...).last_hidden_state` and
    `get_output_embeddings()`) trains on six conversations: its loss is our model's loss on the
    same batch, it falls, and the weights move."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"say {w}"},
                          {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "ok", "stop", "go")]
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=6, learning_rate=1e-2,
                         per_device_train_batch_size=6, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, max_length=64, seed=0)
    model = RetNetForCausalLM.from_pretrained(exported)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(exported))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():  # the fused head over the backbone view = the wrapper's own loss
        fused = model(**batch, fused_lm_head=True, use_cache=False).loss
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], use_cache=False).loss
    torch.testing.assert_close(fused, ours, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):  # packed rows: refused, not ignored
        model.base_model(input_ids=batch["input_ids"], position_ids=batch["input_ids"] * 0)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed.weight" in moved and any("blocks" in n for n in moved)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_keeps_logits_and_ties(tied, tmp_path):
    """transformers' resize_token_embeddings through get/set_output_embeddings: the vocabulary
    grows in the embedding and the head (tied: one matrix), old tokens' logits unchanged."""
    torch.manual_seed(0)
    core = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258, tie_embeddings=tied))
    save_checkpoint(tmp_path / "run", 1, core.state_dict(), core.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    model = RetNetForCausalLM.from_pretrained(export_checkpoint(tmp_path / "run",
                                                                tmp_path / "hf"))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(270)
        after = model(ids).logits
    assert after.shape == (2, 9, 270) and model.config.vocab_size == 270
    torch.testing.assert_close(after[..., :258], before, rtol=0, atol=0)
    head = model.get_output_embeddings()
    assert (head.weight is model.model.embed.weight) == tied
    assert head.weight.shape == (270, core.config.d_model)
    assert sum(1 for _ in model.state_dict()) == len(core.state_dict())  # no extra keys
