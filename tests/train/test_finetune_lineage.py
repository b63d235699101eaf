"""Fine-tuning's other sources and records: `--init-from` a run converted from torchscale
starts from its exact weights, and the exported model card shows the lineage (`init_from`
chain) and the fine-tuning record of meta.json."""

from __future__ import annotations

from pathlib import Path

import torch

from retnet.checkpoint import load_checkpoint
from retnet.cli import main
from retnet.hf.card import model_card
from retnet.model import RetNetConfig, RetNetLM
from retnet.train import TrainConfig, train
from retnet.train.finetune_run import Tuning

TORCHSCALE = Path(__file__).parents[1] / "data" / "torchscale"


def test_init_from_a_converted_torchscale_run(tmp_path, corpus):
    converted = tmp_path / "converted"
    assert main(["convert", "--from", "torchscale", str(TORCHSCALE / "ts_a.safetensors"),
                 str(converted), "--arch", str(TORCHSCALE / "ts_a.json")]) == 0
    source = load_checkpoint(converted)
    cfg = TrainConfig(init_from=str(converted), data=str(corpus), out=str(tmp_path / "ft"),
                      steps=1, batch_size=2, seq_len=16, eval_every=1, save_every=1)
    tuned = Tuning.of(cfg, source.config, source.tokenizer, None)
    fresh = RetNetLM(tuned.config)
    tuned.load(fresh)
    for k, v in source.weights.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    train(cfg)
    meta = load_checkpoint(tmp_path / "ft").meta
    assert meta["init_from"]["kind"] == "checkpoint" and meta["init_from"]["step"] == 0
    assert meta["init_from"]["config_fingerprint"] == source.config.fingerprint()


def test_model_card_shows_lineage_and_finetuning():
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258))
    meta = {"step": 3, "finetune": {"sft": True, "lora": {"rank": 4, "alpha": 8.0,
                                                          "targets": "q,v"}},
            "init_from": {"source": "runs/sft-base", "kind": "checkpoint", "step": 200,
                          "parent": {"source": "runs/demo", "kind": "hf"}}}
    card = model_card(model, meta)
    lineage = card[card.index("## Lineage"):]
    assert "| 1 | `source=runs/sft-base, kind=checkpoint, step=200` |" in lineage
    assert "| 2 | `source=runs/demo, kind=hf` |" in lineage
    for row in ("| sft (loss on assistant tokens) | True |", "| lora rank | 4 |",
                "| lora targets | `q,v` |"):
        assert row in card[card.index("## Fine-tuning"):]
    assert "## Lineage" not in model_card(model, {"step": 3})
