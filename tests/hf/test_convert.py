"""torchscale checkpoints convert exactly: against logits that torchscale 0.3.0 itself computed
(tests/data/torchscale, made by scripts/torchscale_reference.py in a separate environment)."""

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reference import rel_err
from retnet.checkpoint import load_checkpoint
from retnet.cli import main

DATA = Path(__file__).parents[1] / "data" / "torchscale"


@pytest.mark.parametrize("name", ["ts_a", "ts_b"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_converted_model_matches_torchscale(name, fmt, tmp_path):
    source = DATA / f"{name}.safetensors"
    if fmt == "pt":  # a plain state_dict saved with torch.save
        source = tmp_path / f"{name}.pt"
        torch.save(load_file(DATA / f"{name}.safetensors"), source)
    out = tmp_path / "run"
    assert main(["convert", "--from", "torchscale", str(source), str(out),
                 "--arch", str(DATA / f"{name}.json")]) == 0
    model = load_checkpoint(out).build_model()
    ref = load_file(DATA / f"{name}.reference.safetensors")
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
        assert rel_err(logits, ref["logits"]) <= 1e-4
        assert torch.equal(logits.argmax(-1), ref["logits"].argmax(-1))
        # and our other forms agree with it, which torchscale's own chunkwise form does not
        for mode in ("chunkwise", "recurrent"):
            assert rel_err(model(ref["tokens"], mode=mode, chunk_size=8).logits, logits) < 1e-5


def test_shapes_give_everything_the_weights_record(tmp_path):
    """Heads, widths, layers and tying come from the tensors; only what the weights do not
    record (activation, eps, embedding scale) is passed, as inline JSON."""
    out = tmp_path / "run"
    arch = '{"activation_fn": "gelu", "layernorm_eps": 1e-6, "no_scale_embedding": true}'
    assert main(["convert", "--from", "torchscale", str(DATA / "ts_a.safetensors"),
                 str(out), "--arch", arch]) == 0
    ref = load_file(DATA / "ts_a.reference.safetensors")
    logits = load_checkpoint(out).build_model()(ref["tokens"]).logits
    assert rel_err(logits, ref["logits"]) <= 1e-4


def test_pickled_checkpoints_are_refused_with_a_fix(tmp_path, capsys):
    fairseq_like = tmp_path / "checkpoint_best.pt"
    weights = load_file(DATA / "ts_a.safetensors")
    torch.save({"args": argparse.Namespace(arch="retnet_base"), "model": weights}, fairseq_like)
    assert main(["convert", "--from", "torchscale", str(fairseq_like), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickled Python objects" in err and "torch.save(torch.load(" in err
    assert "\n" not in err


def test_other_state_dicts_and_options_are_refused(tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, other)
    assert main(["convert", "--from", "torchscale", str(other), str(tmp_path / "o")]) == 2
    assert "not a torchscale RetNetDecoder" in capsys.readouterr().err
    arch = tmp_path / "arch.json"
    arch.write_text('{"deepnorm": true}')
    assert main(["convert", "--from", "torchscale", str(DATA / "ts_a.safetensors"),
                 str(tmp_path / "o"), "--arch", str(arch)]) == 2
    assert "deepnorm=True has no equivalent" in capsys.readouterr().err
