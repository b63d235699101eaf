"""Issue #37 item 5: every write path (checkpoint weights and optimiser state, metrics, the
tokenizer, `export --hf`, --state-out) turns a failure to write into one line naming the file,
removes its partial output and leaves earlier results intact.

The disk fills for real: each command runs in a subprocess under a file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored so a write past it fails with EFBIG as on a full disk),
which makes safetensors, torch.save and plain writes fail in their own ways."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from retnet.cli import main
from retnet.files import WriteError, atomic_write, atomic_write_text, staged_folder

# The tiny run's files: model.safetensors ≈ 470 kB, train_state.pt ≈ 960 kB.
WEIGHTS_FAIL, OPTIMISER_FAIL = 300_000, 700_000
STEPS = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
         "--eval-every", "4", "--eval-batches", "1", "--save-every", "2", "--steps", "4"]


def limited(args: list[str], limit: int, cwd: Path) -> tuple[int, str]:
    """`retnet ARGS` in a subprocess whose files cannot grow past `limit` bytes; (exit code,
    stderr), after checking that stderr holds one error line and no traceback."""
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "RETNET_KERNELS": "0"}  # no kernel build under the limit
    done = subprocess.run([sys.executable, "-m", "retnet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, preexec_fn=set_limit, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stderr
    return done.returncode, errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of a write (NAME.tmpPID, .tmp-step-…) under `folder`."""
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run stopped after step 2 (checkpoint step-2), trained once."""
    folder = tmp_path_factory.mktemp("writes")
    (folder / "corpus.txt").write_text("the state keeps what the gate lets in\n" * 400)
    args = ["train", "--data", "corpus.txt", "--out", "run", *STEPS, "--stop-at", "2"]
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def work(trained, tmp_path):
    """A copy of the trained folder (corpus and run) to break."""
    return Path(shutil.copytree(trained, tmp_path / "work"))


@pytest.mark.slow
@pytest.mark.parametrize("limit", [WEIGHTS_FAIL, OPTIMISER_FAIL], ids=["weights", "optimiser"])
def test_a_checkpoint_save_past_the_limit_is_one_line_and_keeps_the_last_one(limit, work):
    """safetensors raised SafetensorError and torch.save a RuntimeError ("enforce fail at
    inline_container.cc"): both were tracebacks, only OSError was translated."""
    before = snapshot(work / "run" / "checkpoints")
    code, err = limited(["train", "--data", "corpus.txt", "--out", "run", *STEPS, "--resume"],
                        limit, work)
    assert code == 2
    assert "could not save step-000004" in err and "step-000002" in err and "intact" in err
    assert "--resume" in err
    assert snapshot(work / "run" / "checkpoints") == before
    assert (work / "run" / "latest").read_text() == "step-000002"
    assert not leftovers(work / "run")


@pytest.mark.slow
def test_a_metrics_line_past_the_limit_is_cut_off_and_named(work):
    """A partial metrics.jsonl line stayed behind (and the error named no file)."""
    metrics = work / "run" / "metrics.jsonl"
    with metrics.open("a") as f:  # past every checkpoint file, so the log is what fails
        f.write('{"filler": "' + "x" * 1_000_000 + '"}\n')
    before = metrics.read_bytes()
    code, err = limited(["train", "--data", "corpus.txt", "--out", "run", *STEPS, "--resume"],
                        len(before) + 40, work)
    assert code == 2
    assert "run/metrics.jsonl" in err and "file too large" in err
    assert metrics.read_bytes() == before


@pytest.mark.slow
def test_a_tokenizer_past_the_limit_leaves_no_temporary_file(work):
    """`tokenizer train` left tok.json.tmpPID behind, and an earlier tok.json must survive."""
    (work / "tok.json").write_text("earlier")
    code, err = limited(["tokenizer", "train", "--data", "corpus.txt", "--out", "tok.json",
                         "--vocab-size", "300"], 2_000, work)
    assert code == 2
    assert "tok.json" in err and "file too large" in err
    assert (work / "tok.json").read_text() == "earlier"
    assert not leftovers(work)


@pytest.mark.slow
@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-an-earlier-export"])
def test_an_export_past_the_limit_leaves_nothing_partial(earlier, work):
    """`export --hf` left a partial folder (config.json and a cut-off weights file)."""
    pytest.importorskip("transformers")
    out = work / "hf"
    if earlier:
        assert main(["export", "--hf", str(work / "run"), str(out)]) == 0
    before = snapshot(out) if earlier else None
    code, err = limited(["export", "--hf", "run", "hf"], WEIGHTS_FAIL, work)
    assert code == 2
    assert "hf" in err and "file too large" in err
    assert (snapshot(out) if out.exists() else None) == before
    assert not leftovers(work)


@pytest.mark.slow
def test_a_state_file_past_the_limit_is_one_line_and_keeps_the_earlier_one(work):
    """--state-out: safetensors' error was a traceback, and STATE.tmp stayed behind."""
    args = ["generate", "--checkpoint", "run", "--prompt", "the", "--max-new-tokens", "2",
            "--state-out", "state.safetensors"]
    (work / "state.safetensors").write_bytes(b"earlier")
    code, err = limited(args, 100, work)
    assert code == 2
    assert "state.safetensors" in err and "file too large" in err
    assert (work / "state.safetensors").read_bytes() == b"earlier"
    assert not leftovers(work)


def test_atomic_write_keeps_the_earlier_file_when_the_writer_fails(tmp_path):
    """The helper every writer uses: the temporary file goes, the earlier file stays."""
    path = tmp_path / "f.json"
    atomic_write_text(path, "earlier")

    def full(tmp: Path) -> None:
        tmp.write_text("part")
        raise OSError(28, os.strerror(28))

    with pytest.raises(WriteError, match="no space left.*intact"):
        atomic_write(path, full)
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["f.json"]


def test_a_staged_folder_moves_in_only_when_complete_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    with pytest.raises(WriteError, match="stopped partway"):
        with staged_folder(out) as folder:
            (folder / "config.json").write_text("{}")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    assert os.listdir(out) == ["mine.txt"] and os.listdir(tmp_path) == ["out"]
    with staged_folder(out) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["config.json", "mine.txt"]


def test_a_save_never_replaces_a_device_or_pipe(tmp_path):
    """The atomic rename would put a regular file in place of the special file (as root:
    /dev/null itself); every writer is refused before writing anything."""
    from retnet.files import WriteError, atomic_write_text

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(WriteError, match="is not a regular file"):
        atomic_write_text(pipe, "x")
    assert stat.S_ISFIFO(pipe.stat().st_mode) and sorted(tmp_path.iterdir()) == [pipe]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_follow_the_umask(mask, tmp_path):
    """safetensors creates its files 0600: checkpoint weights, saved states and exported
    weights were unreadable to anyone else whatever the umask (#34)."""
    import torch
    from safetensors.torch import save_file

    from retnet.checkpoint import save_checkpoint
    from retnet.model import RetNetConfig, RetNetLM, save_state
    from retnet.tokenizer import ByteTokenizer

    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=256))
    weights = {"w": torch.zeros(2)}
    old = os.umask(mask)
    try:
        save_checkpoint(tmp_path / "run", 1, model.state_dict(), model.config, ByteTokenizer(),
                        {"step": 1}, {})
        save_state(tmp_path / "doc.state", model(torch.tensor([[1, 2]])).state,
                   model.config.fingerprint())
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file(weights, tmp))
        with staged_folder(tmp_path / "export") as folder:
            save_file(weights, folder / "model.safetensors")
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) >= 10
    assert {f.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(f.stat().st_mode))
            for f in files} == {f.relative_to(tmp_path).as_posix(): oct(0o666 & ~mask)
                                for f in files}
