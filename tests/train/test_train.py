"""Training: learning, exact resume, crash-safe checkpoints, tokenizers, DDP/FSDP2, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from retnet.checkpoint import load_checkpoint
from retnet.cli import main
from retnet.data import stdlib_documents
from retnet.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from retnet.train import TrainConfig, train


def cfg(corpus, out, **kw):
    base = dict(preset="tiny", data=str(corpus), out=str(out), steps=6, batch_size=4,
                seq_len=32, warmup=2, eval_every=3, eval_batches=2, save_every=3, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def weights(run):
    return load_file(Path(load_checkpoint(run).path) / "model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_tiny_model_overfits_fixed_text(corpus, tmp_path):
    result = train(cfg(corpus, tmp_path / "run", steps=60, lr=1e-2, warmup=5, eval_every=60,
                       save_every=60))
    # Uniform over 258 byte tokens is ln 258 = 5.55 nats; the text is 15 words of 3-7 letters.
    assert result["val_loss"] < 1.6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60 and '"tokens_per_s"' in lines[0]


def test_resume_is_exact(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "straight", steps=8, save_every=8, eval_every=4))
    # the same run, stopped after step 5 (as by a crash), then resumed
    train(cfg(corpus, tmp_path / "split", steps=8, stop_at=5, save_every=8, eval_every=4))
    train(cfg(corpus, tmp_path / "split", steps=8, save_every=8, eval_every=4, resume=True))
    assert max_diff(weights(tmp_path / "straight"), weights(tmp_path / "split")) <= 1e-6
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    loss = [json.loads(x)["loss"] for x in straight]
    assert loss == [json.loads(x)["loss"] for x in split]


@pytest.mark.slow
def test_dropout_rng_is_restored_on_resume(corpus, tmp_path):
    kw = dict(model={"dropout": 0.2}, eval_every=4)
    train(cfg(corpus, tmp_path / "a", steps=6, save_every=6, **kw))
    train(cfg(corpus, tmp_path / "b", steps=6, stop_at=3, save_every=6, **kw))
    train(cfg(corpus, tmp_path / "b", steps=6, save_every=6, resume=True, **kw))
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) <= 1e-6


def test_resume_with_only_out_uses_the_stored_options(corpus, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--preset", "tiny", "--data", str(corpus), "--steps", "6", "--batch-size", "4",
             "--seq-len", "32", "--warmup", "2", "--eval-every", "3", "--save-every", "6",
             "--lr", "3e-3"]
    assert main(["train", *flags, "--out", str(straight)]) == 0
    assert main(["train", *flags, "--out", str(split), "--stop-at", "3"]) == 0
    assert main(["train", "--out", str(split), "--resume"]) == 0  # nothing else repeated
    assert max_diff(weights(straight), weights(split)) <= 1e-6
    assert load_checkpoint(split).meta["step"] == 6


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_extend_it(corpus, tmp_path,
                                                                           capsys):
    """It printed `{}` on stdout and nothing else."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(corpus), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{run} is complete" in err and "--resume --steps 4" in err
    # on a line of its own, not after the progress bar's (which has no newline of its own)
    assert any(line.startswith(f"{run} is complete") for line in err.splitlines()), err


def test_a_new_run_into_an_old_one_needs_overwrite(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg(corpus, run, steps=3, save_every=1))
    code, err = run_cli(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(run),
                         "--steps", "2", "--seq-len", "32"], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # nothing mixed in
    train(cfg(corpus, run, steps=2, save_every=1, overwrite=True))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001",
                                                                      "step-000002"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_two_newest_checkpoints_are_kept(corpus, tmp_path):
    run = tmp_path / "run"
    train(cfg(corpus, run, steps=4, save_every=1, eval_every=4))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"]
    assert (run / "latest").read_text().strip() == "step-000004"
    assert load_checkpoint(run).meta["step"] == 4


def test_crash_during_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg(corpus, run, steps=6, stop_at=3))
    before = weights(run)
    import retnet.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        train(cfg(corpus, run, steps=6, resume=True))
    monkeypatch.undo()
    assert (run / "latest").read_text() == "step-000003"
    assert max_diff(before, weights(run)) == 0
    train(cfg(corpus, run, steps=6, resume=True))  # and the run can go on from it
    assert (run / "latest").read_text() == "step-000006"


def test_ctrl_c_saves_a_checkpoint(corpus, tmp_path, monkeypatch):
    import retnet.train.loop as loop

    real, calls = loop.train_step, []

    def interrupt_at_4(*args, **kwargs):  # the fifth optimiser step is step 4 (0-based)
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupt_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(corpus, tmp_path / "run", steps=6, save_every=100))
    assert (tmp_path / "run" / "latest").read_text() == "step-000004"


def test_learning_rate_schedule():
    c = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1).lr_schedule
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(60) == pytest.approx(0.55)  # cosine midpoint
    assert c.lr_at(110) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.0,
                      schedule="linear").lr_schedule
    assert lin.lr_at(60) == pytest.approx(0.5)


def test_bpe_tokenizer_train_save_load_round_trip(corpus, tmp_path):
    tok = train_bpe(iter([corpus.read_text()]), 300)
    assert tok.vocab_size == 300
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    text = "the lazy wizards jump — ünïcode ok\n"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(again.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    assert again.eos_id == tok.eos_id != again.pad_id


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "naïve café ☕"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)


@pytest.mark.slow
def test_default_corpus_is_the_stdlib():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert names == sorted(names) and "pydoc_data/topics.py" in names
    assert not any("site-packages" in n for n in names)
    assert sum(len(d.text) for d in docs) > 10_000_000


def test_train_with_bpe_tokenizer_from_cli(corpus, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300",
                 "--out", str(tok)]) == 0
    # the chat template written beside the tokenizer is announced, on the same one line
    [line] = capsys.readouterr().out.splitlines()
    template = tmp_path / "chat_template.json"
    assert str(template) in line and template.exists()
    assert main(["train", "--preset", "tiny", "--data", str(corpus), "--tokenizer", str(tok),
                 "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--eval-every", "2", "--model", "n_layers=1"]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.config.vocab_size == 300 and ckpt.config.n_layers == 1


def test_config_file_toml_and_yaml(corpus, tmp_path):
    (tmp_path / "a.toml").write_text(f'preset = "tiny"\ndata = "{corpus}"\nsteps = 7\n')
    (tmp_path / "a.yaml").write_text(f"preset: tiny\ndata: {corpus}\nsteps: 9\n")
    assert TrainConfig.from_file(tmp_path / "a.toml").steps == 7
    assert TrainConfig.from_file(tmp_path / "a.yaml", steps=3).steps == 3
    (tmp_path / "b.toml").write_text("stpes = 7\n")
    with pytest.raises(ValueError, match=r"unknown key.s. stpes"):
        TrainConfig.from_file(tmp_path / "b.toml")


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("case,message", [
    ("missing", "no data at"),
    ("empty", "holds no text"),
    ("too-small", "fewer than one window"),
    ("preset", "unknown preset 'giant'"),
    ("field", "unknown config field.s. widht"),
    ("vocab", "tokenizer has 258 tokens but the model's vocab_size is 100"),
])
def test_bad_training_input_is_one_line(case, message, corpus, tmp_path, capsys):
    data = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt",
            "too-small": tmp_path / "small.txt"}.get(case, corpus)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "small.txt").write_text("tiny\n" * 3)
    args = ["train", "--preset", "giant" if case == "preset" else "tiny", "--data", str(data),
            "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len", "64"]
    if case == "field":
        args += ["--model", "widht=3"]
    if case == "vocab":
        args += ["--model", "vocab_size=100"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "\n" not in err
    assert re.search(message, err), err


def test_bad_checkpoints_are_one_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg(corpus, run, steps=3))
    ckpt = Path(load_checkpoint(run).path)
    base = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(run), "--steps", "6",
            "--seq-len", "32", "--resume"]
    code, err = run_cli([*base, "--model", "n_layers=3"], capsys)
    assert code == 2 and "trained with another model config" in err
    weights_file = ckpt / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # truncate
    code, err = run_cli(base, capsys)
    assert code == 2 and "corrupt or truncated" in err and "\n" not in err
    code, err = run_cli(["generate", "--checkpoint", str(tmp_path / "none")], capsys)
    assert code == 2 and "no checkpoint at" in err


def launch(tmp_path, corpus, out, nproc, batch, parallel="ddp"):
    args = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--steps", "3",
            "--batch-size", str(batch), "--seq-len", "32", "--warmup", "1", "--eval-every", "3",
            "--eval-batches", "1", "--parallel", parallel, "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "retnet", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "retnet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch(parallel, corpus, tmp_path):
    """Gradients agree to float rounding (the global mean is summed in another order); Adam's
    normalised step turns that into parameter differences proportional to lr (measured
    1.7e-5 at lr 3e-3 and 5.5e-6 at lr 1e-3, the same for DDP and FSDP2)."""
    launch(tmp_path, corpus, tmp_path / "one", 1, batch=4)
    two = launch(tmp_path, corpus, tmp_path / "two", 2, batch=2, parallel=parallel)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    # rank 0 alone prints the validation line and the final JSON (each rank printed them)
    lines = two.stdout.splitlines()
    assert sum("val loss" in line for line in lines) == 1, two.stdout
    assert sum(line.startswith("{") for line in lines) == 1, two.stdout
