"""Writing files so that a crash or a full disk never leaves a half-written one behind, and a
failed write is one line that names the file and says what to do.

Every writer of retnet goes through here: a file is written under a temporary name beside it
and renamed into place (`atomic_write`), a folder is staged beside its destination
(`staged_folder`), a log line is appended or not at all (`append_text`). A failure to write,
whatever raised it (an OSError, safetensors' SafetensorError, torch.save's RuntimeError from
its zip writer), removes the partial output and becomes one `WriteError`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# What the user can do about it, by errno: make room, or pick a place they may write to.
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
# safetensors reports the OS error only inside its message: "... I/O error: ... (os error 28)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteError(OSError):
    """A file could not be written; the message (one line) names it, says what was kept and
    what to do. The partial output is already removed."""


def as_write_failure(err: BaseException) -> OSError | None:
    """`err` as an OSError (with its errno where known) if it is a failure to write a file,
    else None. safetensors and torch.save raise their own types for a full disk or a file-size
    limit; torch's zip writer says only "[enforce fail at inline_container.cc] ..."."""
    if isinstance(err, OSError):
        return err
    name, text = type(err).__name__, str(err)
    # By name: safetensors is not imported for this (its error type lives in a Rust module).
    if name == "SafetensorError":
        code = _OS_ERROR.search(text)
        number = int(code[1]) if code else errno.EIO
        return OSError(number, os.strerror(number) if code else text.splitlines()[0])
    if isinstance(err, RuntimeError) and ("inline_container" in text
                                          or "PytorchStreamWriter" in text):
        return OSError(errno.EIO, "the write stopped partway, as on a full disk or past a "
                                  "file-size limit")
    return None


def reason(err: OSError) -> str:
    """Why a write failed, in words."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if err.errno == errno.EFBIG:
        return "file too large: past the file system's or the process's file-size limit"
    return err.strerror or str(err) or type(err).__name__


def advice(err: OSError) -> str:
    """What to do about a failed write, before trying again."""
    if err.errno in _SPACE:
        return "free some space (or raise the file-size limit)"
    if err.errno in _ACCESS:
        return "make the folder writable or choose another"
    if err.errno == errno.EISDIR:
        return "name a file, not a folder"
    return "check that the disk has room and is writable"


def write_failed(path: str | Path, err: OSError, kept: str = "") -> str:
    """The one line of a failed write of `path`; `kept`: what is intact (say it if so)."""
    kept = f"; {kept}" if kept else ""
    return f"could not write {path} ({reason(err)}): the partial file was removed{kept}; " \
           f"{advice(err)}, then try again"


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename: beside it, so the rename stays on one file
    system; the PID keeps two writers apart."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def follow_umask(path: Path) -> None:
    """Give `path`, or every file under it where it is a folder, the mode a plain open()
    gives under this process's umask (0644 under 022): safetensors creates its files 0600,
    which left weights and states unreadable to the group, and kept them from being shared."""
    mask = os.umask(0)  # the only way to read it (besides Linux's /proc): set, then restore
    os.umask(mask)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write the file, then rename tmp to `path`: readers see the old
    file or the new one, never a mixture. Parent folders are created. A failure to write
    removes tmp and raises WriteError (an earlier `path` is left as it was); any other error
    removes tmp and propagates."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        # the rename would put a regular file in place of a device, pipe or socket (as root,
        # /dev/null itself): refuse before writing anything (a folder fails below: EISDIR)
        raise WriteError(f"{path} is not a regular file (a device, pipe or socket), which "
                         "saving would replace; name a regular file")
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        failure = as_write_failure(err)
        if failure is None:
            raise
        kept = f"the earlier {path.name} is intact" if path.exists() else ""
        raise WriteError(write_failed(path, failure, kept)) from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` as `atomic_write` does."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_text(path: str | Path, text: str) -> None:
    """Append `text` (UTF-8) to `path` whole or not at all: a failed append is cut off
    again, so the earlier lines stay as they were, and raises WriteError."""
    path = Path(path)
    existed = path.exists()
    size = path.stat().st_size if existed else 0
    try:
        # Unbuffered: a partial write shows as a short count, then the error on the rest.
        with path.open("ab", buffering=0) as f:
            rest = memoryview(text.encode("utf-8"))
            while rest:
                rest = rest[f.write(rest):]
    except OSError as err:
        if existed:
            _truncate(path, size)
        else:
            _remove(path)
        raise WriteError(f"could not add to {path} ({reason(err)}): the earlier lines are "
                         f"intact; {advice(err)}, then try again") from None


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write a folder's files into. When the block ends,
    they are moved into `out` (each by a rename; other files in `out` stay); on an error the
    temporary folder is removed and `out` is as it was. A failure to write is a WriteError."""
    out = Path(out)
    tmp = temporary_name(out)
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        follow_umask(tmp)
        _move_into(tmp, out)
    except BaseException as err:
        failure = as_write_failure(err)
        if failure is None:
            raise
        kept = "its earlier files are intact" if out.exists() else "nothing was created"
        raise WriteError(f"could not write {out} ({reason(failure)}): the partial copy was "
                         f"removed and {kept}; {advice(failure)}, then try again") from None
    finally:
        _remove(tmp)


def _move_into(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, or, where `dst` is a folder already, each of src's files into
    it (renames on one file system: no data is copied, so no space is needed)."""
    if not dst.is_dir():
        os.replace(src, dst)
        return
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _move_into(item, target)
        else:
            os.replace(item, target)


def _truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes; on a broken disk this can fail too, and then the
    original error is still the one to report."""
    try:
        if path.exists():
            os.truncate(path, size)
    except OSError:
        pass


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
