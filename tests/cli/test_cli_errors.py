"""Every bad invocation from issue #16, table-driven: exit status 2 and one line on stderr that
says what is wrong (no traceback), before any slow work starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from retnet import RetNetConfig, RetNetLM
from retnet.checkpoint import save_checkpoint
from retnet.cli import main
from retnet.tokenizer import ByteTokenizer

TORCHSCALE = Path(__file__).parents[1] / "data" / "torchscale"
ARCH = '{"activation_fn": "gelu", "layernorm_eps": 1e-6, "no_scale_embedding": true}'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny run, a corpus, and the odd files the bad invocations point at."""
    root = tmp_path_factory.mktemp("cli")
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258))
    save_checkpoint(root / "run", 1, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    (root / "corpus.txt").write_text("the gate keeps the state\n" * 200)
    (root / "a_file").write_text("not a directory")
    (root / "bad.toml").write_text('steps = "abc"\n')
    (root / "notes.txt").write_text("plain text, not weights")
    (root / "bad.safetensors").write_text("plain text, not safetensors")
    (root / "states").mkdir()
    post_ln = load_file(TORCHSCALE / "ts_a.safetensors")
    del post_ln["layer_norm.weight"]  # what a decoder_normalize_before=False model holds
    save_file(post_ln, root / "post_ln.safetensors")
    return root


def train(f, *extra):
    return ["train", "--preset", "tiny", "--data", str(f / "corpus.txt"), "--out",
            str(f / "out"), "--steps", "1", "--seq-len", "16", *extra]


CASES = {
    # item 11
    "state-out into a missing directory": (
        lambda f: ["generate", "--checkpoint", str(f / "run"), "--max-new-tokens", "2",
                   "--state-out", str(f / "missing" / "s.safetensors")], "does not exist"),
    "state-out onto a directory": (
        lambda f: ["generate", "--checkpoint", str(f / "run"), "--max-new-tokens", "2",
                   "--state-out", str(f / "states")], "is a directory"),
    "negative max-new-tokens": (
        lambda f: ["generate", "--checkpoint", str(f / "run"), "--max-new-tokens", "-1"],
        "--max-new-tokens must be an integer ≥ 0"),
    "model override of the wrong type": (
        lambda f: train(f, "--model", "dropout=abc"), "model.dropout must be a number"),
    "model override null": (
        lambda f: train(f, "--model", "d_model=null"), "model.d_model must be an integer"),
    "unknown device": (lambda f: train(f, "--device", "foo"), "invalid device 'foo'"),
    "run directory under a file": (
        lambda f: ["train", "--data", str(f / "corpus.txt"), "--out",
                   str(f / "a_file" / "run")], "cannot create the run directory"),
    "config value of the wrong type": (
        lambda f: ["train", "--config", str(f / "bad.toml")], "steps must be an integer"),
    "convert a text file": (
        lambda f: ["convert", "--from", "torchscale", str(f / "notes.txt"), str(f / "o")],
        "neither a torch.save file nor safetensors"),
    "convert a broken safetensors file": (
        lambda f: ["convert", "--from", "torchscale", str(f / "bad.safetensors"),
                   str(f / "o")], "not a valid safetensors file"),
    # items 6 and 8
    "port out of range": (
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--port", "99999"],
        "invalid --port 99999"),
    "no batch slots": (
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--max-batch", "0"],
        "invalid --max-batch 0"),
    "no queue": (
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--max-queue", "0"],
        "invalid --max-queue 0"),
    "exposed without a key": (
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--host", "0.0.0.0"],
        "without authentication: pass --api-key"),
    "non-ASCII API key": (  # a header arrives as Latin-1: it could never match
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--api-key", "schlüssel"],
        "invalid --api-key (hidden): use printable ASCII"),
    "argparse type error": (
        lambda f: ["serve", "--checkpoint", str(f / "run"), "--port", "eighty"],
        "invalid int value"),
    # item 12
    "post-LayerNorm torchscale model": (
        lambda f: ["convert", "--from", "torchscale", str(f / "post_ln.safetensors"),
                   str(f / "o"), "--arch", '{"subln": false, "decoder_normalize_before": false}'],
        "decoder_normalize_before=False has no equivalent"),
    "post-LayerNorm weights, pre-norm arch": (
        lambda f: ["convert", "--from", "torchscale", str(f / "post_ln.safetensors"),
                   str(f / "o"), "--arch", ARCH], "post-LayerNorm blocks"),
    "relu GLU": (
        lambda f: ["convert", "--from", "torchscale", str(TORCHSCALE / "ts_a.safetensors"),
                   str(f / "o"), "--arch", ARCH.replace("gelu", "relu")],
        "activation_fn 'relu' has no equivalent here"),
    "swish model without arch": (
        lambda f: ["convert", "--from", "torchscale", str(TORCHSCALE / "ts_b.safetensors"),
                   str(f / "o")],
        "do not record activation_fn, layernorm_eps, no_scale_embedding: pass them with --arch"),
    "arch without eps": (
        lambda f: ["convert", "--from", "torchscale", str(TORCHSCALE / "ts_a.safetensors"),
                   str(f / "o"), "--arch", json.dumps({"activation_fn": "gelu",
                                                       "no_scale_embedding": True})],
        "do not record layernorm_eps"),
}


def _never_serve(cfg):
    raise AssertionError("the server was started instead of refused")  # not serve forever


@pytest.mark.parametrize("case", list(CASES))
def test_bad_invocations_exit_2_with_one_line(case, files, capsys, monkeypatch):
    import retnet.serve

    monkeypatch.delenv("RETNET_API_KEY", raising=False)
    monkeypatch.setattr(retnet.serve, "serve", _never_serve)
    args, message = CASES[case]
    temp_files = set(files.glob("**/*.tmp"))
    try:
        code = main(args(files))
    except SystemExit as exit:  # argparse's own errors exit from inside parse_args
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "\0" not in out
    assert set(files.glob("**/*.tmp")) == temp_files, "a temp file was left behind"
    assert not (files / "o").exists()


def test_generate_with_zero_new_tokens_only_prefills(files, capsys):
    """0 is allowed (--state-out after a prompt); only negative counts are errors."""
    out = files / "states" / "prefill.safetensors"
    assert main(["generate", "--checkpoint", str(files / "run"), "--prompt", "abc",
                 "--max-new-tokens", "0", "--state-out", str(out)]) == 0
    assert out.is_file() and "after 3 tokens" in capsys.readouterr().err


def test_serve_takes_the_api_key_from_the_environment(files, monkeypatch):
    """RETNET_API_KEY counts as --api-key, so binding 0.0.0.0 is allowed (checked, not run)."""
    import retnet.serve as serve_module

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.setenv("RETNET_API_KEY", "sesame")
    assert main(["serve", "--checkpoint", str(files / "run"), "--host", "0.0.0.0",
                 "--allowed-host", "a.example", "--allowed-host", "b.example"]) == 0
    assert seen["cfg"].api_key == "sesame"
    assert seen["cfg"].allowed_host == ["a.example", "b.example"]


def test_the_api_key_is_in_no_repr():
    from retnet.serve import ServeConfig

    cfg = ServeConfig(checkpoint="run", api_key="sesame")
    assert "sesame" not in repr(cfg) and "sesame" not in str(cfg)


def test_a_missing_extra_is_named_before_any_work_but_help_still_works(monkeypatch, tmp_path,
                                                                        capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0 and "--steps" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[train] extra (matplotlib missing)" in err[0]
    assert not out.exists()  # refused before the run directory, the corpus or the model


def test_help_imports_no_torch():
    """`retnet --help` reads only the command table and the package's metadata (3.8 s of
    torch import before)."""
    code = ("import sys, retnet.cli\n"
            "try:\n    retnet.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout
