"""Fine-tuning (`retnet train --init-from/--sft`): the SFT loss is a masked cross-entropy over
exactly the assistant's tokens, packing changes nothing, long conversations are cut or
refused, special tokens grow the vocabulary without moving existing logits, and --init-from
starts from the source's exact weights with a fresh optimiser at step 0."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from retnet.checkpoint import load_checkpoint, save_checkpoint
from retnet.model import RetNetConfig, RetNetLM
from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer
from retnet.train import TrainConfig, sft, train
from retnet.train.finetune import add_special_tokens, grow_vocab, load_source
from retnet.train.finetune_run import Tuning

T = DEFAULT_CHAT_TEMPLATE
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": ""}]


@pytest.fixture(scope="module")
def tok():
    return add_special_tokens(ByteTokenizer(), sft.special_tokens(T))


def _hand_mask(tok, messages) -> tuple[list[int], list[bool]]:
    """Written out: an assistant message's tokens after <|assistant|>\\n, and its EOS."""
    ids, trained = [], []
    for m in messages:
        if m["role"] == "assistant":
            head = tok.encode("<|assistant|>\n")
            body = tok.encode(m["content"] + "\n") + [tok.eos_id]
            ids += head + body
            trained += [False] * len(head) + [True] * len(body)
        else:
            piece = tok.encode(f"<|{m['role']}|>\n{m['content']}\n")
            ids += piece
            trained += [False] * len(piece)
    return ids, trained


def test_special_tokens_are_one_id_each(tok):
    assert sft.special_tokens(T) == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert tok.vocab_size == 261 and len(tok.encode("<|user|>")) == 1
    assert tok.encode("héllo") == ByteTokenizer().encode("héllo")  # the bytes keep their ids


def test_mask_is_exactly_the_assistant_tokens(tok):
    ids, trained = sft.render(CONVERSATION, tok, T)
    assert (ids, trained) == _hand_mask(tok, CONVERSATION)


def _model(vocab: int) -> RetNetLM:
    torch.manual_seed(0)
    return RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=vocab)).double().eval()


def test_loss_is_masked_cross_entropy_over_assistant_tokens(tok):
    """float64, 1e-12: the step's loss equals a cross-entropy written here over the
    positions whose next token the hand-built mask marks."""
    convs = [CONVERSATION, [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello there"}]]
    rows = sft.pack([sft.encode(*sft.render(c, tok, T)) for c in convs], 48, tok.pad_id, False)
    model = _model(tok.vocab_size)
    loss = sft.loss_fn(model, "parallel")(rows[:, :-1], rows[:, 1:])
    total, count = 0.0, 0
    for c in convs:
        ids, trained = _hand_mask(tok, c)
        x = torch.tensor([ids])
        logp = F.log_softmax(model(x).logits[0, :-1], -1)
        for t in range(len(ids) - 1):
            if trained[t + 1]:
                total -= logp[t, ids[t + 1]]
                count += 1
    torch.testing.assert_close(loss, total / count, rtol=0, atol=1e-12)


def test_packed_equals_one_per_row(tok):
    """Packed rows, each conversation read alone through the resets, give the loss of one
    conversation per padded row (float64, 1e-12)."""
    convs = [sft.encode(*sft.render(CONVERSATION, tok, T)),
             sft.encode(*sft.render([{"role": "user", "content": "x"},
                                     {"role": "assistant", "content": "yz"}], tok, T))] * 2
    packed = sft.pack(convs, 96, tok.pad_id, True)
    padded = sft.pack(convs, 96, tok.pad_id, False)
    assert packed.shape[0] < padded.shape[0]
    loss = sft.loss_fn(_model(tok.vocab_size), "parallel")
    torch.testing.assert_close(loss(packed[:, :-1], packed[:, 1:]),
                               loss(padded[:, :-1], padded[:, 1:]), rtol=0, atol=1e-12)


def test_long_conversations_cut_or_refused(tok):
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}]
    rows = [sft.encode(*sft.render(long, tok, T))]
    (cut,) = sft.fit(rows, 20, "truncate", ["x#1"])
    assert cut.size == 20 and (cut & sft.TARGET).any()
    with pytest.raises(ValueError, match="x#1 has .* tokens"):
        sft.fit(rows, 20, "refuse", ["x#1"])


def test_growth_keeps_existing_logits():
    """Rows added for new tokens leave every existing token's logit on existing inputs as it
    was (float64, 1e-12: a wider head may sum in another order), and a tied head stays the
    embedding."""
    model = _model(258)
    config, weights = grow_vocab(model.config, model.state_dict(), 261)
    grown = RetNetLM(config).double().eval()
    grown.load_state_dict(weights)
    ids = torch.randint(0, 258, (2, 11))
    torch.testing.assert_close(grown(ids).logits[..., :258], model(ids).logits, rtol=0,
                               atol=1e-12)
    assert grown.lm_head is None


def _source(tmp_path) -> tuple:
    """A tiny saved checkpoint (step 5) standing in for a trained run."""
    model = _model(258).float()
    out = tmp_path / "base"
    save_checkpoint(out, 5, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 5, "rng": {"torch": torch.get_rng_state()}},
                    {"init_from": {"source": "grandparent"}})
    return out, model


def test_init_from_keeps_weights_and_starts_afresh(tmp_path, corpus):
    src, model = _source(tmp_path)
    cfg = TrainConfig(init_from=str(src), data=str(corpus), out=str(tmp_path / "ft"),
                      steps=1, batch_size=2, seq_len=16, eval_every=1, save_every=1,
                      model={"dropout": 0.1})
    tuned = Tuning.of(cfg, model.config, ByteTokenizer(), None)
    fresh = RetNetLM(tuned.config)
    tuned.load(fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "ft")
    state = ckpt.train_state()
    assert state["step"] == 1 and ckpt.meta["step"] == 1
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())  # a new AdamW
    assert ckpt.meta["init_from"]["step"] == 5
    assert ckpt.meta["init_from"]["parent"] == {"source": "grandparent"}
    assert ckpt.config.dropout == 0.1


def test_shape_changing_override_is_refused(tmp_path, corpus):
    src, _ = _source(tmp_path)
    cfg = TrainConfig(init_from=str(src), data=str(corpus), out=str(tmp_path / "ft"),
                      steps=1, model={"n_layers": 3})
    with pytest.raises(ValueError, match="n_layers=3 changes the shape"):
        train(cfg)


def test_hf_folder_source(tmp_path):
    pytest.importorskip("transformers")
    from retnet.hf.export import export_checkpoint

    src, model = _source(tmp_path)
    source = load_source(export_checkpoint(src, tmp_path / "hf"))
    assert source.kind == "hf"
    for k, v in model.state_dict().items():
        assert torch.equal(source.weights[k], v), k


def test_sft_run_records_samples(tmp_path):
    src, _ = _source(tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"})
                              for i in range(60)))
    cfg = TrainConfig(init_from=str(src), sft=True, data=str(data), out=str(tmp_path / "s"),
                      steps=2, batch_size=4, seq_len=32, eval_every=2, save_every=2,
                      lora_rank=2, lora_targets="q,v")
    train(cfg)
    record = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["samples"] and "val_loss" in record
    ckpt = load_checkpoint(tmp_path / "s")
    assert ckpt.tokenizer.vocab_size == 261 and ckpt.config.vocab_size == 261
