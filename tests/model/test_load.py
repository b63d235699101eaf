"""retnet.load: the model and tokenizer of a run, a checkpoint folder or an exported folder."""

import pytest
import torch

import retnet
from recall import recall_model, save_recall_run
from retnet.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_recall_run(tmp_path_factory.mktemp("load") / "run")


def logits(model, text="abcdef|abc"):
    with torch.no_grad():
        return model(torch.tensor([list(text.encode())])).logits


def test_a_run_and_its_checkpoint_folder_load_the_trained_weights(run):
    reference = recall_model(torch.float32)
    for path in (run, run / "checkpoints" / "step-000001"):
        model, tok = retnet.load(path)
        assert not model.training
        assert torch.equal(logits(model), logits(reference))
        assert tok.encode("naïve|") == ByteTokenizer().encode("naïve|")
    model, _ = retnet.load(run, dtype=torch.float64)
    assert model.embed.weight.dtype == torch.float64


def test_an_exported_folder_loads_too(run, tmp_path):
    from retnet.hf import export_checkpoint

    out = export_checkpoint(run, tmp_path / "hf")
    model, tok = retnet.load(out)
    assert torch.equal(logits(model), logits(recall_model(torch.float32)))
    assert tok.encode("naïve|") == ByteTokenizer().encode("naïve|")
    assert tok.eos_id == 256


def test_a_missing_path_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        retnet.load(tmp_path / "nothing")
