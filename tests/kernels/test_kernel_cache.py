"""Issue #37 item 6: faults of the compiled kernels' cache never stop a run. A library cut
short (a full disk, a killed copy) is found before it is loaded, by the size and sha256
recorded beside it at build time, and rebuilt, or skipped with one notice where it cannot be;
a cache folder that cannot be written falls back to the PyTorch reference with one notice.

Each run that loads kernels does so in a subprocess: a damaged library mapped into pytest
would kill it with SIGBUS, and a process loads one library once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retnet import RetNetConfig, RetNetLM
from retnet.checkpoint import save_checkpoint
from retnet.kernels import build
from retnet.tokenizer import ByteTokenizer

API = ("import torch, retnet; m = retnet.RetNetLM(retnet.RetNetConfig.from_preset('tiny', "
       "vocab_size=300)).eval(); print(retnet.generate(m, torch.tensor([[1, 2, 3]]), 4).shape)")


@pytest.fixture(scope="module")
def good_library() -> Path:
    """This machine's native build of the kernels, with its build record (compiled once into
    the session's cache if it is not there yet)."""
    try:
        return build.build(quiet=True, name="native")
    except build.BuildError as err:
        pytest.skip(f"the kernels cannot be built here: {err}")


def cache_with(tmp_path: Path, library: Path, keep: float | None) -> Path:
    """A cache folder holding a copy of `library` and its record, the library cut to `keep`
    of its bytes (None: no record at all, as an older retnet left it)."""
    folder = tmp_path / "cache" / library.parent.name
    folder.mkdir(parents=True)
    data = library.read_bytes()
    copy = folder / library.name
    copy.write_bytes(data if keep is None else data[:int(len(data) * keep)])
    record = library.with_name(library.name + ".json")
    if keep is not None and record.exists():  # an older retnet wrote none
        shutil.copy(record, folder / record.name)
    return folder.parent


def run(argv: list[str], cache: str | Path, cwd: Path, path: str | None = None
        ) -> subprocess.CompletedProcess:
    """argv under RETNET_CACHE=cache with the kernels on (PATH=path, when given: an empty one
    leaves no compiler to rebuild with)."""
    env = {**os.environ, "RETNET_CACHE": str(cache)}
    for name in ("RETNET_KERNELS", build.VARIANT_ENV):
        env.pop(name, None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def notices(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr and "Bus error" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("retnet")]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.1, 0.5], ids=["cut-to-10%", "cut-to-50%"])
def test_a_truncated_library_that_cannot_be_rebuilt_is_skipped_with_one_notice(
        keep, good_library, tmp_path):
    """It was loaded as it was: every later run died of a Bus error (SIGBUS), no message."""
    cache = cache_with(tmp_path, good_library, keep)
    no_compiler = tmp_path / "bin"
    no_compiler.mkdir()
    done = run([sys.executable, "-c", API], cache, tmp_path, path=str(no_compiler))
    assert done.returncode == 0, done.stderr
    lines = notices(done)
    assert len(lines) == 1 and "failed verification" in lines[0], done.stderr
    assert "PyTorch reference" in lines[0]


@pytest.mark.parametrize("keep", [0.3, None], ids=["truncated", "no-build-record"])
def test_a_library_that_fails_verification_is_rebuilt(keep, good_library, tmp_path,
                                                      monkeypatch, capsys):
    """The rebuild itself (the compiler stands in: it copies the good library) and the one
    line that says why; the rebuilt library verifies."""
    good = good_library.read_bytes()

    def compile_(cmd, **kwargs):
        Path(cmd[cmd.index("-o") + 1]).write_bytes(good)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("RETNET_CACHE", str(cache_with(tmp_path, good_library, keep)))
    monkeypatch.setattr(build.subprocess, "run", compile_)
    path = build.build(name="native")
    assert path.read_bytes() == good
    assert build.build(name="native") == path  # verified now: no second rebuild
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "failed verification" in lines[0] and "rebuilding" in lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to (for root, whom permissions do not stop, made
    immutable with chattr)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    locked = os.geteuid() == 0
    if locked and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here (chattr +i failed)")
    yield folder
    if locked:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.fixture
def checkpoint(tmp_path):
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=300))
    return save_checkpoint(tmp_path / "run", 1, model.state_dict(), model.config,
                           ByteTokenizer(), {}, {})


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["cli", "api"])
@pytest.mark.parametrize("cache", ["a-file", "read-only"])
def test_an_unusable_cache_falls_back_to_the_reference_with_one_notice(
        caller, cache, tmp_path, request, checkpoint):
    """RETNET_CACHE=/etc/hostname or a read-only folder: `retnet generate` exited 2 and
    retnet.generate() raised OSError (NotADirectoryError, PermissionError)."""
    if cache == "a-file":
        folder = tmp_path / "hostname"
        folder.write_text("host\n")
    else:
        folder = request.getfixturevalue("read_only")
    argv = ([sys.executable, "-m", "retnet", "generate", "--checkpoint", str(checkpoint),
             "--prompt", "the", "--max-new-tokens", "3"] if caller == "cli"
            else [sys.executable, "-c", API])
    done = run(argv, folder, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = notices(done)
    assert len(lines) == 1, done.stderr
    assert f"the kernel cache {folder} cannot be written" in lines[0]
    assert "PyTorch reference" in lines[0]
    if caller == "api":
        assert "torch.Size([1, 7])" in done.stdout
