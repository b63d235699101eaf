"""Checkpoints that survive crashes: a complete directory is written under a temporary name,
renamed into place, and only then named by the `latest` pointer (each step atomic).

    RUN/checkpoints/step-000100/  model.safetensors  config.json  tokenizer.json
                                  chat_template.json  meta.json ("manifest": 1)
                                  train_state.pt (optimiser, step, RNG; tensors only)
                                  manifest.json (size and sha256 of every other file)
    RUN/latest                    "step-000100"

Nothing is ever unpickled: weights are safetensors, the rest loads with weights_only=True.
safetensors stores no checksum, so every file a loader reads is checked against manifest.json:
config, meta, tokenizer and chat template on every load, the training state when resuming; the
weights and training state are hashed from the very bytes that are then loaded. A damaged file
is an error naming it. A missing manifest.json is an error too when meta.json says one was
written; only a checkpoint from before manifests (no "manifest" key) loads, with a warning line.

A failed save (a full disk) removes its partial folder and leaves the previous checkpoints and
`latest` as they were; re-saving a step moves the old folder aside first and puts it back if
the save fails. Temporary folders are named `.tmp-step-N-HOST-BOOT-PID` (`.old-…` for a folder
moved aside); `retnet train` clears, on start, those of saves that were killed: only folders
whose host name and boot id are this machine's and whose PID is gone (a moved-aside folder
whose step is missing is put back). A folder of another host or container sharing the run
directory, or of a live PID, is left alone; so are folders named by an older retnet without
the host (remove those by hand). Two trainers on one run directory are not supported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from retnet.files import WriteError, advice, as_write_failure, follow_umask, reason
from retnet.model import RetNetConfig, RetNetLM
from retnet.tokenizer import (
    CHAT_TEMPLATE_FILE,
    Tokenizer,
    load_chat_template,
    load_tokenizer,
    save_chat_template,
)

KEEP = 2  # complete checkpoints kept per run
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "retnet-manifest-v1"
TMP_PREFIX = ".tmp-"  # a save being written: .tmp-step-N-HOST-BOOT-PID
OLD_PREFIX = ".old-"  # a step folder moved aside while it is re-saved
# .tmp-step-000100-HOST-BOOT-PID -> (".tmp-", "step-000100", "HOST-BOOT", "PID")
_TEMP_NAME = re.compile(rf"({re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)})(step-\d+)-(.+)-(\d+)")


class CheckpointWriteError(WriteError):
    """A save failed (disk full, permissions); the message says what was kept and what to do."""


@dataclass
class Checkpoint:
    path: Path
    config: RetNetConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    meta: dict[str, Any]
    manifest: dict[str, Any] | None = None  # None: an older checkpoint without one
    chat_template: dict[str, str] | None = None  # None: the default template

    def build_model(self, device: torch.device | str | None = None) -> RetNetLM:
        model = RetNetLM(self.config)
        model.load_state_dict(self.weights)
        return model.to(device).eval()

    def train_state(self) -> dict[str, Any]:
        data = read_verified(self.path, self.manifest, "train_state.pt")
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as err:  # any unreadable file is the same user problem
            raise ValueError(_corrupt(self.path, err)) from None


def _corrupt(path: Path, err: Exception) -> str:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"checkpoint {path} is corrupt or truncated ({reason}); use an earlier one under "
            f"{path.parent} or start a new run")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size}
             for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files},
                                              indent=1))


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest; None (with a warning line) only for one saved before them."""
    file = path / MANIFEST
    if not file.is_file():
        if _meta_records_manifest(path):
            raise ValueError(f"checkpoint {path} is incomplete: {MANIFEST} is missing, though "
                             f"meta.json records that one was written; use an earlier "
                             f"checkpoint under {path.parent} or start a new run")
        print(f"warning: checkpoint {path} has no {MANIFEST} (saved by an older retnet), so "
              "its files cannot be verified; it is loaded as it is", file=sys.stderr)
        return None
    try:
        manifest = json.loads(file.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest["files"], dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"checkpoint {path}: {MANIFEST} is unreadable ({err}); use an earlier "
                         f"checkpoint under {path.parent}") from None
    return manifest


def _meta_records_manifest(path: Path) -> bool:
    """Whether meta.json (unverified: there is nothing to verify it against) says a manifest
    was written; an unreadable meta.json counts as yes, since nothing can be trusted then."""
    try:
        return "manifest" in json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return True


def read_verified(path: Path, manifest: dict[str, Any] | None, name: str) -> bytes:
    """The bytes of one file, which must have the size and sha256 the manifest recorded; the
    caller loads these very bytes, so the file is read once and cannot change in between."""
    entry, file = (manifest or {}).get("files", {}).get(name), path / name
    if manifest is not None and not isinstance(entry, dict):
        _damaged(path, f"is damaged: {name} is not listed in its {MANIFEST}")
    if not file.is_file():
        _damaged(path, f"is incomplete: {name} is missing")
    data = file.read_bytes()
    if manifest is None:
        return data
    if len(data) != entry.get("bytes"):
        _damaged(path, f"is corrupt or truncated: {name} has {len(data)} bytes, {MANIFEST} "
                       f"recorded {entry.get('bytes')}")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        _damaged(path, f"is corrupt or truncated: {name} does not match its sha256 in {MANIFEST}")
    return data


def _damaged(path: Path, problem: str) -> None:
    raise ValueError(f"checkpoint {path} {problem}; use an earlier checkpoint under "
                     f"{path.parent} or start a new run")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_folder(tmp: Path, step: int, model_state: dict[str, torch.Tensor],
                  config: RetNetConfig, tokenizer: Tokenizer, train_state: dict[str, Any],
                  meta: dict[str, Any], chat_template: dict[str, str] | None = None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "retnet-v1"})
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    tokenizer.save(tmp / "tokenizer.json")
    save_chat_template(tmp, chat_template)
    torch.save(train_state, tmp / "train_state.pt")
    # "manifest": a missing manifest.json is then damage, not an older checkpoint.
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "manifest": 1,
                                               "config_fingerprint": config.fingerprint()},
                                              indent=1))
    _write_manifest(tmp)  # last: it covers every other file
    follow_umask(tmp)
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    config: RetNetConfig, tokenizer: Tokenizer, train_state: dict[str, Any],
                    meta: dict[str, Any], chat_template: dict[str, str] | None = None) -> Path:
    """Write RUN/checkpoints/step-N atomically, then point RUN/latest at it (chat_template:
    the one a fine-tuned model was trained with; None: the default).

    On a failure before the new folder is in place, its partial copy is removed (a full disk
    stays no fuller), a step folder being re-saved is put back, and `latest` is untouched; a
    failure to write (an OSError, safetensors' or torch.save's own error types) becomes one
    CheckpointWriteError line that says what was kept."""
    run_dir = Path(run_dir)
    name = f"step-{step:06d}"
    final = run_dir / "checkpoints" / name
    tmp = final.with_name(f"{TMP_PREFIX}{name}-{_owner()}")
    aside = final.with_name(f"{OLD_PREFIX}{name}-{_owner()}")
    pointer = run_dir / "latest"
    placed = False  # the new folder is complete and in place under its final name
    try:
        _write_folder(tmp, step, model_state, config, tokenizer, train_state, meta,
                      chat_template)
        if final.exists():  # re-saving a step: move the old folder aside, never delete first
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        placed = True
        _fsync_dir(final.parent)
        pointer.with_suffix(".tmp").write_text(name)
        os.replace(pointer.with_suffix(".tmp"), pointer)
    except BaseException as err:
        pointer.with_suffix(".tmp").unlink(missing_ok=True)
        restored = placed or _put_back(tmp, aside, final)
        failure = as_write_failure(err)
        if failure is None:
            raise
        message = (_pointer_failed(run_dir, name, failure) if placed else
                   _write_failed(run_dir, name, failure, restored, aside))
        raise CheckpointWriteError(message) from None
    finally:
        if placed:  # the old copy of a re-saved step is superseded either way
            shutil.rmtree(aside, ignore_errors=True)
    _prune(final.parent, keep=KEEP)
    return final


def _put_back(tmp: Path, aside: Path, final: Path) -> bool:
    """After a failed save: remove the partial copy and put a moved-aside folder back; False
    if that folder could not be put back (it stays at `aside`)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if aside.exists() and not final.exists():
        try:
            os.replace(aside, final)
        except OSError:
            return False
    return True


def read_latest(run_dir: str | Path) -> str | None:
    """The checkpoint name RUN/latest holds (such as "step-000100"), or None if there is none."""
    pointer = Path(run_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def _write_failed(run_dir: Path, name: str, err: OSError, restored: bool, aside: Path) -> str:
    previous = read_latest(run_dir) or "none yet"
    kept = f"the previous checkpoint ({previous}) and {run_dir / 'latest'} are intact"
    if not restored:
        kept = f"the old {name} could not be put back: it is at {aside}; rename it to {name}"
    return (f"could not save {name} to {run_dir} ({reason(err)}): the partial copy was "
            f"removed and {kept}; {advice(err)}, then resume with --resume")


def _pointer_failed(run_dir: Path, name: str, err: OSError) -> str:
    previous = read_latest(run_dir)
    named = ("already named it" if previous == name else f"still names {previous}"
             if previous else "was not written")
    return (f"saved {name} to {run_dir / 'checkpoints'} (the folder is complete), but could "
            f"not make it the latest ({reason(err)}): {run_dir / 'latest'} {named}; fix the "
            "cause, then resume with --resume")


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.iterdir() if p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _machine() -> str:
    """This machine as temp-folder names record it: host name and the start of the boot id
    (a PID is only meaningful on one host, container and boot)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:  # not Linux: the host name alone
        boot = "noboot"
    return f"{host}-{boot}"


def _owner(pid: int | None = None) -> str:
    return f"{_machine()}-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # called before this process saves anything: an older namesake
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphans(run_dir: str | Path) -> list[str]:
    """Clear the temp folders of saves that were killed; returns one line per folder.

    Only folders named by this machine (host name and boot id) whose PID is gone: another
    host's or a live PID's may be a save in progress. A moved-aside step folder whose step is
    missing is put back; otherwise it is removed."""
    folder = Path(run_dir) / "checkpoints"
    done, machine = [], _machine()
    for tmp in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _TEMP_NAME.fullmatch(tmp.name)
        if not (match and tmp.is_dir() and match[3] == machine and not _pid_alive(int(match[4]))):
            continue
        final = folder / match[2]
        if match[1] == OLD_PREFIX and not final.exists():
            os.replace(tmp, final)
            done.append(f"restored {final} from {tmp.name}, left by a save that was killed")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"removed {tmp}, left by a save that was killed")
    return done


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows `latest`) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = read_latest(path)
    if latest is not None:
        target = path / "checkpoints" / latest
        if target.is_dir():
            return target
        raise ValueError(f"{path / 'latest'} names {target.name}, which is missing; "
                         f"pick a checkpoint under {path / 'checkpoints'}")
    raise FileNotFoundError(f"no checkpoint at {path}: expected a run directory with a "
                            "'latest' file or a folder holding model.safetensors")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (weights, config, tokenizer, chat template, meta), each file checked
    against the manifest; the training state stays on disk (and is checked when read)."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    # Read and verified before anything is parsed: a damaged file is named, not misparsed.
    files = {name: read_verified(path, manifest, name)
             for name in ("config.json", "meta.json", "model.safetensors")}
    read_verified(path, manifest, "tokenizer.json")  # small: load_tokenizer reads it again
    has_template = (path / CHAT_TEMPLATE_FILE).exists() or (
        manifest is not None and CHAT_TEMPLATE_FILE in manifest["files"])
    if has_template:
        read_verified(path, manifest, CHAT_TEMPLATE_FILE)  # small: read again below
    try:
        config = RetNetConfig.from_dict(json.loads(files["config.json"]))
        meta = json.loads(files["meta.json"])
        weights = load(files.pop("model.safetensors"))
        tokenizer = load_tokenizer(path / "tokenizer.json")
        template = load_chat_template(path) if has_template else None
    except Exception as err:  # safetensors raises its own error type on truncation
        raise ValueError(_corrupt(path, err)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model only {config.vocab_size}; they do not belong together")
    check_shapes(path, config, weights)
    return Checkpoint(path, config, weights, tokenizer, meta, manifest, template)


def check_shapes(path: Path, config: RetNetConfig, weights: dict[str, torch.Tensor],
                 names: bool = True) -> None:
    """One line where the weights are not the ones `config` gives: names missing (names=True)
    or a shape that differs — a config.json edited or swapped after saving (with a manifest
    that agrees), where load_state_dict's message would list every tensor over dozens of
    lines. Every reader of a checkpoint (generate, eval, serve, resume, export) goes through
    here."""
    with torch.device("meta"):  # the shapes only, no memory
        expected = RetNetLM(config).state_dict()
    if names and set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        raise ValueError(f"checkpoint {path} does not match its config.json "
                         f"(missing e.g. {missing}); it is damaged or was edited")
    wrong = [k for k, t in expected.items() if k in weights and weights[k].shape != t.shape]
    if wrong:
        name = wrong[0]
        raise ValueError(f"{path}: {len(wrong)} weight(s) do not have the shape its config.json "
                         f"gives ({name} is {list(weights[name].shape)}, the config makes "
                         f"{list(expected[name].shape)}); the config or the weights were "
                         "replaced: use the checkpoint they were saved with")
