"""Checkpoints under damage: a sha256 manifest verified on every load (resume, generate, eval,
serve), a non-finite loss or gradient that stops before anything is changed, saved or pruned,
a full disk (or a failed rename) that loses nothing, also under DDP, and the temp folders of
killed saves cleared on start."""

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import retnet.checkpoint as ck
from retnet.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    read_latest,
    remove_orphans,
    save_checkpoint,
)
from retnet.cli import main
from retnet.train import distributed as dist

STEPS = ["--preset", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "16",
         "--warmup", "1", "--eval-every", "6", "--eval-batches", "1", "--save-every", "2"]


def train_args(corpus, run, *extra):
    return ["train", "--data", str(corpus), "--out", str(run), *STEPS, *extra]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of every checkpoint, and `latest`."""
    files = {str(p.relative_to(run)): p.read_bytes()
             for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    return {**files, "latest": (run / "latest").read_bytes()}


def cli(args, capsys):
    """(exit code, stdout, the one error line); training's progress bar shares stderr."""
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return code, out, errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run stopped after step 4 (checkpoints step-2 and step-4), trained once."""
    folder = tmp_path_factory.mktemp("integrity")
    corpus = folder / "corpus.txt"
    corpus.write_text("the state keeps what the gate lets in\n" * 400)
    assert main(train_args(corpus, folder / "run", "--stop-at", "4")) == 0
    assert sorted(p.name for p in (folder / "run" / "checkpoints").iterdir()) == [
        "step-000002", "step-000004"]
    return folder


@pytest.fixture
def corpus(trained):
    return trained / "corpus.txt"


@pytest.fixture
def stopped_run(trained, tmp_path):
    return Path(shutil.copytree(trained / "run", tmp_path / "run"))


def damage(file: Path) -> None:
    """1,000 bytes of 0xFF in the middle (NaN floats in a weights file), size unchanged."""
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 1000] = b"\xff" * 1000
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt"])
def test_damaged_checkpoint_is_refused_and_the_good_ones_survive(name, stopped_run, corpus,
                                                                  capsys):
    """Item 9: resuming damaged weights used to train on NaN, save NaN checkpoints and prune
    the good ones (keep-two rule)."""
    damage(stopped_run / "checkpoints" / "step-000004" / name)
    before = snapshot(stopped_run)
    code, _, err = cli(train_args(corpus, stopped_run, "--resume", "--save-every", "1"), capsys)
    assert code == 2
    assert name in err and "sha256" in err and "step-000004" in err
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_every_loader_verifies_the_manifest(command, stopped_run, corpus, capsys, monkeypatch):
    """Item 9: `retnet generate` on damaged weights printed NUL bytes and exited 0."""
    import retnet.serve
    from retnet.serve.drain import DrainingServer

    def never(self, sockets=None):
        raise AssertionError("the damaged checkpoint was served")  # not serve forever

    monkeypatch.setattr(DrainingServer, "run", never)
    # No port is bound: the refusal comes from loading, not from a port taken meanwhile.
    monkeypatch.setattr(retnet.serve, "_listen", lambda host, port: SimpleNamespace(
        close=lambda: None))
    damage(stopped_run / "checkpoints" / "step-000004" / "model.safetensors")
    extra = {"generate": ["--prompt", "the", "--max-new-tokens", "5"],
             "eval": ["--perplexity", str(corpus)], "serve": []}[command]
    code, out, err = cli([command, "--checkpoint", str(stopped_run), *extra], capsys)
    assert code == 2 and "model.safetensors" in err
    assert "\0" not in out


def test_a_deleted_manifest_is_an_error_not_an_old_checkpoint(stopped_run):
    """Deleting manifest.json used to switch every check off (with only a warning)."""
    (stopped_run / "checkpoints" / "step-000004" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json is missing, though meta.json records"):
        load_checkpoint(stopped_run)


def test_the_chat_template_is_verified_too(stopped_run):
    template = stopped_run / "checkpoints" / "step-000004" / "chat_template.json"
    template.write_text(json.dumps({"message": "{content}", "generation_prompt": ""}))
    with pytest.raises(ValueError, match="chat_template.json"):
        load_checkpoint(stopped_run)


def test_the_weights_loaded_are_the_bytes_that_were_hashed(stopped_run, monkeypatch):
    """The weights file changes on disk right after its hash was taken: what is loaded is
    still what was verified (it used to be read a second time, after the check)."""
    weights = stopped_run / "checkpoints" / "step-000004" / "model.safetensors"
    good, size = load_checkpoint(stopped_run).weights, weights.stat().st_size

    class DamagedAfterHashing:
        def __init__(self, data=b""):
            self.digest, self.read = hashlib.sha256(data), len(data)

        def update(self, data):
            self.digest.update(data)
            self.read += len(data)

        def hexdigest(self):
            if self.read == size:
                damage(weights)
            return self.digest.hexdigest()

    monkeypatch.setattr(ck, "hashlib", SimpleNamespace(sha256=DamagedAfterHashing))
    loaded = load_checkpoint(stopped_run).weights
    assert all(torch.equal(loaded[k], good[k]) for k in good)


def test_old_checkpoints_without_a_manifest_load_with_a_warning(stopped_run, capsys):
    folder = stopped_run / "checkpoints" / "step-000004"
    (folder / "manifest.json").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    del meta["manifest"]  # as an older retnet wrote it
    (folder / "meta.json").write_text(json.dumps(meta))
    ckpt = load_checkpoint(stopped_run)
    assert ckpt.manifest is None and ckpt.train_state()["step"] == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning:") and "manifest.json" in err and "\n" not in err


def test_manifest_lists_every_file(stopped_run):
    folder = stopped_run / "checkpoints" / "step-000004"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}


def test_non_finite_loss_stops_before_saving_or_pruning(stopped_run, corpus, capsys,
                                                        monkeypatch):
    """Item 9: the run stops at the first NaN loss and names the last good checkpoint."""
    import retnet.model.lm as lm

    real = lm.linear_cross_entropy
    monkeypatch.setattr(lm, "linear_cross_entropy",
                        lambda *args, **kwargs: real(*args, **kwargs) * math.nan)
    before = snapshot(stopped_run)
    code, _, err = cli(train_args(corpus, stopped_run, "--resume", "--save-every", "1"), capsys)
    assert code == 2
    assert "loss became nan at step 5" in err and "step-000004" in err
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_an_inf_gradient_with_a_finite_loss_stops_before_the_weights_change(
        clip, stopped_run, corpus, capsys, monkeypatch):
    """The loss was only checked after the optimiser step: a finite loss with an inf gradient
    made every weight NaN, which was saved (and a good checkpoint pruned) before the next
    loss showed it. Clipped or not, the run now stops before the step."""
    import retnet.train.loop as tr

    real = tr._prepare

    def inf_gradient(cfg, ctx):
        run = real(cfg, ctx)
        run.model.embed.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
        return run

    monkeypatch.setattr(tr, "_prepare", inf_gradient)
    before = snapshot(stopped_run)
    code, _, err = cli(train_args(corpus, stopped_run, "--resume", "--save-every", "1",
                                  "--clip", clip), capsys)
    assert code == 2
    assert "gradient norm became inf at step 5" in err and "step-000004" in err
    assert snapshot(stopped_run) == before


def test_non_finite_weights_are_never_saved_and_the_last_good_one_is_named(
        stopped_run, corpus, capsys, monkeypatch):
    """Issue #37 item 7: an optimiser step that makes the weights non-finite (as --lr inf
    does) with a finite loss and gradient: step 5 was saved with NaN weights, step-2 pruned,
    and step 6's stop named the broken step-5 as the last good checkpoint."""
    import retnet.train.loop as tr

    real = tr._prepare

    def nan_after_step(cfg, ctx):
        run = real(cfg, ctx)
        weight = run.model.embed.weight
        run.optimizer.register_step_post_hook(lambda *_: weight.data.fill_(math.nan))
        return run

    monkeypatch.setattr(tr, "_prepare", nan_after_step)
    before = snapshot(stopped_run)
    code, _, err = cli(train_args(corpus, stopped_run, "--resume", "--save-every", "1"), capsys)
    assert code == 2
    assert "non-finite by step 5" in err and "embed.weight" in err
    assert "last good checkpoint is" in err and "step-000004" in err
    assert snapshot(stopped_run) == before


def resave(run: Path, step: int) -> Path:
    """Save the latest checkpoint's contents again, as step `step`."""
    ckpt = load_checkpoint(run)
    return save_checkpoint(run, step, ckpt.weights, ckpt.config, ckpt.tokenizer,
                           ckpt.train_state(), ckpt.meta)


def temp_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def test_resaving_the_latest_step_keeps_it_when_the_save_fails(stopped_run, monkeypatch):
    """The old folder was deleted before the new one was renamed into place: a failure (or a
    kill) in between lost the checkpoint `latest` names. Now it is moved aside, and put back."""
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-") and Path(dst).name == "step-000004":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    before = snapshot(stopped_run)
    with pytest.raises(CheckpointWriteError, match="partial copy was removed.*intact"):
        resave(stopped_run, 4)
    assert snapshot(stopped_run) == before and temp_folders(stopped_run) == []
    monkeypatch.undo()
    resave(stopped_run, 4)  # and once it works, the re-save replaces it whole
    assert temp_folders(stopped_run) == [] and read_latest(stopped_run) == "step-000004"


def test_a_save_whose_latest_pointer_fails_says_the_folder_is_complete(stopped_run,
                                                                       monkeypatch):
    """The message said "the partial copy was removed" when the new folder was complete and
    stayed; now it says what is there."""
    def fsync_fails(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ck, "_fsync_dir", fsync_fails)
    with pytest.raises(CheckpointWriteError) as failed:
        resave(stopped_run, 5)
    message = str(failed.value)
    assert "removed" not in message, message
    assert "the folder is complete" in message and "still names step-000004" in message
    assert read_latest(stopped_run) == "step-000004"
    assert load_checkpoint(stopped_run / "checkpoints" / "step-000005").meta["step"] == 5


def test_a_failed_save_under_ddp_stops_every_rank_with_its_message(monkeypatch):
    """Rank 0 raised before the barrier, so the other ranks waited there for ever. Now rank 0
    sends its outcome (a broadcast, faked here for two ranks) and every rank raises it."""
    import retnet.train.loop as tr

    sent = []

    def broadcast(box, src):  # rank 0's call sends, a later rank's call receives
        if not sent:
            sent.append(box[0])
        box[0] = sent[0]

    def full_disk(*args, **kwargs):
        raise CheckpointWriteError("no space left on the device while saving step-000006")

    monkeypatch.setattr(dist.tdist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(tr.dist, "full_state", lambda model, optimizer: {"model": {},
                                                                         "optimizer": {}})
    monkeypatch.setattr(tr, "save_checkpoint", full_disk)
    run = SimpleNamespace(wrapped=None, optimizer=None, model=SimpleNamespace(config=None),
                          tokenizer=None, meta={}, template=None)
    cfg = SimpleNamespace(out="unused", lora_rank=0)  # the fields _save reads
    for rank in (0, 1):
        with pytest.raises(CheckpointWriteError, match="no space left .* step-000006"):
            tr._save(run, cfg, dist.Context(rank, 2, torch.device("cpu")), 6)


def test_full_disk_loses_nothing_and_the_run_goes_on(stopped_run, corpus, capsys, monkeypatch):
    """Item 10: ENOSPC while writing the weights: one line, temp folder gone, step-4 and
    `latest` intact; once there is room, resume works."""
    import retnet.checkpoint as ck

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", full)
    before = snapshot(stopped_run)
    code, _, err = cli(train_args(corpus, stopped_run, "--resume"), capsys)
    assert code == 2
    assert "no space left" in err and "step-000004" in err and "intact" in err
    assert not list((stopped_run / "checkpoints").glob(".tmp-*"))
    assert snapshot(stopped_run) == before
    monkeypatch.undo()
    assert main(train_args(corpus, stopped_run, "--resume")) == 0
    assert (stopped_run / "latest").read_text() == "step-000006"


def test_temp_folders_of_killed_saves_are_cleared_on_start(stopped_run, corpus, capsys):
    """Item 10: this machine's temp folders (host name and boot id in the name) of dead PIDs
    go; a live PID's stays, and so does another host's, whose PIDs mean nothing here (it was
    judged by the PID alone). A step folder moved aside by a killed re-save is put back."""
    folder = stopped_run / "checkpoints"
    dead = folder / f".tmp-step-000005-{ck._owner(999999999)}"  # above any pid_max
    alive = folder / f".tmp-step-000005-{ck._owner(os.getppid())}"
    elsewhere = folder / ".tmp-step-000005-another-host-0123abcd-999999999"
    for tmp in (dead, alive, elsewhere):
        shutil.copytree(folder / "step-000004", tmp)
    os.replace(folder / "step-000004", folder / f".old-step-000004-{ck._owner(999999999)}")
    assert main(train_args(corpus, stopped_run, "--resume")) == 0  # from the restored step-4
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    out = capsys.readouterr().out
    assert "removed" in out and "restored" in out
    assert remove_orphans(stopped_run) == []
