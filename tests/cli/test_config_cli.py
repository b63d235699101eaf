"""Config validation, preset sizes, and the command line."""

import ctypes
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from retnet import PRESETS, RetNetConfig, RetNetLM, __version__
from retnet.cli import main


@pytest.mark.parametrize("field,value,message", [
    ("d_model", 100, "d_model .100. must be divisible by n_heads"),
    ("n_heads", 0, "n_heads must be a positive integer"),
    ("vocab_size", -1, "vocab_size must be a positive integer"),
    ("n_layers", 2.5, "n_layers must be a positive integer"),
    ("decays", "fast", "decays must be one of multiscale"),
    ("dropout", 1.0, "dropout must be in"),
    ("norm_eps", 0.0, "norm_eps must be positive"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        extra = {"n_heads": 3} if field == "d_model" else {}
        RetNetConfig.from_preset("tiny", **{field: value, **extra})


def test_odd_key_head_dim_is_rejected():
    with pytest.raises(ValueError, match="odd key head dim"):
        RetNetConfig(d_model=63, n_heads=3)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of tiny"):
        RetNetConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown config field.s. widht"):
        RetNetConfig.from_preset("tiny", widht=3)


def meta_model(name, **kw):
    with torch.device("meta"):
        return RetNetLM(RetNetConfig.from_preset(name, **kw))


@pytest.mark.parametrize("name", ["paper-1.3b", "paper-2.7b", "paper-6.7b"])
def test_paper_presets_match_12_d2_L(name):
    model = meta_model(name)
    c = model.config
    assert (c.key_head_dim, c.value_head_dim) == (256, 512)
    assert c.vocab_size == 32000 and c.tie_embeddings
    assert model.embed.weight.is_meta  # nothing allocated
    body = model.num_parameters(embeddings=False)
    assert abs(body / (12 * c.d_model**2 * c.n_layers) - 1) < 0.01
    assert model.num_parameters() == body + 32000 * c.d_model


def test_small_preset_sizes():
    assert meta_model("tiny", vocab_size=256).num_parameters() < 1_000_000
    demo = meta_model("demo").num_parameters(embeddings=False)
    assert 3_000_000 <= demo <= 5_000_000
    small = meta_model("small")
    assert small.num_parameters() == 41_583_616  # 158.6 MiB of float32 weights
    assert set(PRESETS) == {"tiny", "demo", "small", "medium", "paper-1.3b", "paper-2.7b",
                            "paper-6.7b"}


def test_fingerprint_tracks_architecture():
    a = RetNetConfig.from_preset("tiny")
    assert a.fingerprint() == RetNetConfig.from_preset("tiny", dropout=0.1).fingerprint()
    assert a.fingerprint() != RetNetConfig.from_preset("tiny", n_layers=3).fingerprint()


def test_cli_info(capsys):
    assert main(["info", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    assert "41,583,616 total" in out
    assert "recurrent state per sequence (float32): 8.0 MiB" in out
    assert "KV cache of a same-width Transformer at 32k tokens (float32): 1.0 GiB" in out
    assert "retention.q_proj.weight" in out


def test_cli_user_error_is_one_line(capsys):
    assert main(["info", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown preset 'nope'" in err


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "retnet", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"retnet {__version__}"
    out = subprocess.run([sys.executable, "-m", "retnet", "--help"], capture_output=True,
                         text=True, check=True)
    assert "info" in out.stdout and "demo" in out.stdout


@pytest.mark.slow
def test_cli_demo_end_to_end(capsys, corpus, tmp_path):
    """The main job on a small corpus for 2 steps: tokenizer, training, checkpoint, sample."""
    run = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--out", str(run), "--data", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "bits per byte" in out and "sample" in out
    for name in ("tokenizer.json", "metrics.jsonl", "loss.png", "latest"):
        assert (run / name).is_file()


def test_allocator_setting_is_explicit_and_can_be_declined(monkeypatch):
    from retnet.memory import keep_freed_memory

    monkeypatch.setenv("RETNET_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("RETNET_MALLOC")
    assert keep_freed_memory() is True  # glibc accepted both thresholds
    # a block far above glibc's default 32 MiB mmap ceiling now comes from the heap, where a
    # freed block is reused, not from a fresh mapping (mallinfo2's hblkhd: bytes in mmaps)
    assert _mmapped_bytes_while_holding(64 << 20) < (64 << 20)


class _MallInfo2(ctypes.Structure):
    _fields_: ClassVar = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mmapped_bytes_while_holding(size: int) -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = _MallInfo2
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd
    libc.free(block)
    return mapped
