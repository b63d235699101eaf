"""transformers integration: Auto classes, save/load, generate() on the O(1) state, beam search."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import retnet.hf  # noqa: F401  (registers the Auto classes)
from recall import recall_model
from retnet import RetNetConfig, generate
from retnet.hf import RetNetForCausalLM, RetNetHFConfig, modeling, save_hf_tokenizer
from retnet.tokenizer import ByteTokenizer


def hf_model(dtype=torch.float64):
    torch.manual_seed(0)
    config = RetNetHFConfig.from_retnet(RetNetConfig.from_preset("tiny", vocab_size=258),
                                        eos_token_id=256, pad_token_id=257, bos_token_id=256)
    return RetNetForCausalLM(config).to(dtype).eval()


def ids(b, t, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_auto_classes_round_trip_bit_identical(tmp_path):
    model = hf_model(torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RetNetForCausalLM)
    x = ids(2, 33)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_generate_feeds_one_token_per_step_and_matches_no_cache():
    model = hf_model()
    x = ids(2, 20)
    widths = []
    model.model.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    cached = model.generate(x, max_new_tokens=12, do_sample=False)
    assert widths == [20] + [1] * 11
    assert torch.equal(cached, model.generate(x, max_new_tokens=12, do_sample=False,
                                              use_cache=False))
    assert torch.equal(cached, generate(model.model, x, 12))


def test_sampling_works():
    model = hf_model()
    torch.manual_seed(1)
    out = model.generate(ids(1, 5), max_new_tokens=10, do_sample=True, top_p=0.9,
                         temperature=1.0)
    assert out.shape == (1, 15)


def test_left_padded_batch_equals_each_prompt():
    model = hf_model()
    a, b = ids(1, 6, 1), ids(1, 15, 2)
    batch = torch.cat([torch.cat([torch.full((1, 9), 257), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :9] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, p in enumerate((a, b)):
        alone = model.generate(p, max_new_tokens=8, do_sample=False)
        assert torch.equal(out[row, -8:], alone[0, -8:])


def brute_force_beams(model, prompt, beams, steps):
    """Beam search by re-scoring every candidate with a full forward pass (no state):
    the live beams as (sum of log-probabilities, tokens), best first."""
    live = [(0.0, prompt[0].tolist())]
    for _ in range(steps):
        candidates = []
        for score, seq in live:
            lp = model.model(torch.tensor([seq])).logits[0, -1].log_softmax(-1)
            top = lp.topk(2 * beams)
            candidates += [(score + v.item(), seq + [int(i)]) for v, i in zip(*top)]
        live = sorted(candidates, key=lambda c: -c[0])[:beams]
    return live


def recall_hf():
    """The state-sensitive copy model (tests/recall.py) inside the transformers wrapper."""
    model = hf_model()
    model.model.load_state_dict(recall_model().state_dict())
    return model


def test_beam_search_reorders_the_state(monkeypatch):
    model = recall_hf()
    prompt = torch.tensor([[256, *b"hgfedcba|hgf"]])
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)
    one = model.generate(prompt, max_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(one, greedy)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=3,
              eos_token_id=None, length_penalty=0.0, early_stopping=False,
              output_scores=True, return_dict_in_generate=True)
    ref = brute_force_beams(model, prompt, 3, 6)
    ref_scores = [s for s, _ in ref]

    def same_as_ref(out) -> bool:
        # transformers sums the beams' log-probabilities in float32: 1e-5 absolute
        return ([s.tolist() for s in out.sequences] == [seq for _, seq in ref]
                and out.sequences_scores.tolist() == pytest.approx(ref_scores, abs=1e-5))

    assert same_as_ref(model.generate(prompt, **kw))
    # The test can see a state that does not follow its beam: without the reordering, the
    # beams or their scores come out different.
    monkeypatch.setattr(modeling, "_match_rows", lambda cache, input_ids: cache)
    assert not same_as_ref(model.generate(prompt, **kw))


def test_tokenizer_and_pipeline(tmp_path):
    model = hf_model(torch.float32)
    model.save_pretrained(tmp_path)
    save_hf_tokenizer(ByteTokenizer(), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "naïve café"
    assert tok(text).input_ids == ByteTokenizer().encode(text)
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)
    gen = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(tmp_path),
                   tokenizer=tok)
    out = gen("hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("hello")


@pytest.mark.slow
def test_export_cli(corpus, tmp_path):
    from retnet.cli import main
    from retnet.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(run), steps=2, batch_size=2,
                      seq_len=16, eval_every=2))
    assert main(["export", "--hf", str(run), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    from retnet.checkpoint import load_checkpoint

    core = load_checkpoint(run).build_model()
    x = torch.tensor([tok("the lazy dog").input_ids])
    assert torch.equal(model(x).logits, core(x).logits)
