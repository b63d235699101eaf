"""Compile the C++ kernels once per machine and torch build, into a cache folder, and load them.

The library is built with this machine's compiler and `-march=native` (it runs where it is
built: the cache key includes the CPU's feature flags and torch's version), then loaded with
`torch.ops.load_library`, which registers `torch.ops.retnet.*`. Nothing is downloaded; without a
C++ compiler the build fails with a one-line reason and callers use the PyTorch reference.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import torch

SOURCES = ("cpu/decode.cpp", "cpu/products.h", "cpu/activations.h", "cpu/head_norm.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno",
         "-w")
CACHE_ENV = "RETNET_CACHE"


class BuildError(RuntimeError):
    """The kernels cannot be built here; the message says why in one line."""


def cache_dir() -> Path:
    """$RETNET_CACHE, else $XDG_CACHE_HOME/retnet, else ~/.cache/retnet."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retnet"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _key(compiler: str) -> str:
    h = hashlib.sha256()
    root = files("retnet.kernels")
    for name in SOURCES:
        h.update(root.joinpath(*name.split("/")).read_bytes())
    for part in (torch.__version__, compiler, " ".join(FLAGS), _cpu_flags(), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def command(compiler: str, source: Path, target: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    return [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in include_paths()), str(source), "-o", str(target),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
            "-lc10", "-ltorch_cpu", "-ltorch"]


def library_path() -> Path:
    """Where this machine's build of the kernels lives (built or not)."""
    compiler = os.environ.get("CXX", "g++")
    return cache_dir() / f"kernels-{_key(compiler)}" / "retnet_kernels.so"


def build(quiet: bool = False) -> Path:
    """The path of the compiled library, compiling it first if this machine has none yet.
    Raises BuildError (one line) when there is no compiler or the compile fails."""
    target = library_path()
    if target.exists():
        return target
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler} not found; set CXX or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per folder; whoever waited finds the library made.
    with open(target.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        if not quiet:
            print(f"retnet: building the CPU kernels once (about a minute) into {target.parent}",
                  file=sys.stderr)
        source = Path(str(files("retnet.kernels").joinpath("cpu", "decode.cpp")))
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        done = subprocess.run(command(compiler, source, tmp), capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = next((line for line in done.stderr.splitlines() if "error" in line),
                         done.stderr.strip()[:200])
            raise BuildError(f"the C++ compile failed: {first}")
        os.replace(tmp, target)  # atomic: a half-written library is never loaded
    return target


_loaded: set[Path] = set()


def load(quiet: bool = False) -> None:
    """Build if needed and register torch.ops.retnet.* in this process (once)."""
    path = build(quiet)
    if path not in _loaded:
        try:
            torch.ops.load_library(str(path))
        except OSError as err:
            raise BuildError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
        _loaded.add(path)
