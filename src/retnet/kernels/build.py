"""Compile the C++ kernels once per machine and torch build, into a cache folder, and load them.

The library is built with this machine's compiler and `-march=native` (it runs where it is
built: the cache key includes the CPU's feature flags and torch's version), then loaded with
`torch.ops.load_library`, which registers `torch.ops.retnet.*`. The kernels are written once
against a vector layer (`cpu/simd.h`: at::vec, with AVX-512, AVX2, NEON and plain back ends),
and the flags pick its back end: the widest the CPU has. Narrower variants of the same source
(`VARIANTS`: the AVX2 build of an AVX-512 machine, the plain build) are built on request
($RETNET_KERNEL_VARIANT, one per process) so one machine tests every x86 path. Nothing is
downloaded; without a C++ compiler the build fails with a one-line reason and callers use the
PyTorch reference.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import torch

from retnet.files import atomic_write_text, reason

SOURCES = ("cpu/decode.cpp", "cpu/simd.h", "cpu/products.h", "cpu/activations.h",
           "cpu/head_norm.h")
# Hidden visibility: the library exports nothing (its ops register themselves when loaded), so
# the inline kernels are called directly, not through the PLT.
FLAGS = ("-O3", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno",
         "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-w")
# The builds of one source: "native" (the default) targets this CPU; on x86 the others turn
# its widest extensions off so that a developer's machine also runs the narrower paths users
# have: "avx2" (AVX-512 off) and "scalar" (every AVX extension off: at::vec's plain arrays).
VARIANTS = {"native": ("-march=native",),
            "avx2": ("-march=native", "-mno-avx512f"),
            "scalar": ("-march=native", "-mno-avx")}
VARIANT_ENV = "RETNET_KERNEL_VARIANT"
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


def variants() -> list[str]:
    """The variants this machine can build and run: every x86 one whose extensions the CPU
    has (the AVX2 build only where AVX-512 makes "native" another), just "native" elsewhere."""
    flags = _cpu_flags().split()
    if "avx" not in flags:  # not x86 with AVX (e.g. aarch64): the native build only
        return ["native"]
    return ["native"] + (["avx2"] if "avx512f" in flags and "avx2" in flags else []) + ["scalar"]


def variant() -> str:
    """The variant this process loads: $RETNET_KERNEL_VARIANT, else "native"."""
    name = os.environ.get(VARIANT_ENV, "native").strip() or "native"
    if name not in VARIANTS:
        raise BuildError(f"{VARIANT_ENV}={name!r} is not a kernel variant; use one of "
                         f"{', '.join(VARIANTS)}")
    return name


def _key(compiler: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    root = files("retnet.kernels")
    for name in SOURCES:
        h.update(root.joinpath(*name.split("/")).read_bytes())
    for part in (torch.__version__, compiler, " ".join(flags), _cpu_flags(), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def command(compiler: str, source: Path, target: Path, name: str = "native") -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    return [compiler, *VARIANTS[name], *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in include_paths()), str(source), "-o", str(target),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
            "-lc10", "-ltorch_cpu", "-ltorch"]


def library_path(name: str = "native") -> Path:
    """Where this machine's build of the kernels (variant `name`) lives (built or not)."""
    compiler = os.environ.get("CXX", "g++")
    return cache_dir() / f"kernels-{_key(compiler, VARIANTS[name])}" / "retnet_kernels.so"


def build(quiet: bool = False, name: str | None = None) -> Path:
    """The path of the compiled library (variant `name`, else this process's `variant()`),
    compiling it first if this machine has none yet, or has one whose size or sha256 differ
    from those recorded when it was built (a truncated library would die of SIGBUS when
    loaded). Raises BuildError (one line) when there is no compiler, the compile fails, or
    the cache folder cannot be written."""
    name = variant() if name is None else name
    target = library_path(name)
    if _problem(target) is None:
        return target
    try:
        return _rebuild(target, name, quiet)
    except OSError as err:  # RETNET_CACHE is a file, a read-only folder, a full disk
        raise BuildError(f"the kernel cache {cache_dir()} cannot be written "
                         f"({reason(err)}); set {CACHE_ENV} to a writable folder") from None


def _rebuild(target: Path, name: str, quiet: bool) -> Path:
    """Compile variant `name` into `target`, one process at a time per folder."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        missing = f"no C++ compiler ({compiler} not found; set CXX or install g++)"
        if target.exists():
            missing = (f"the cached {target} failed verification ({_problem(target)}), and "
                       f"{missing}")
        raise BuildError(missing)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per folder; whoever waited finds the library made.
    with open(target.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = _problem(target)
        if problem is None:
            return target
        if not quiet:
            what = (f"the cached CPU kernels failed verification ({problem}): rebuilding them"
                    if target.exists() else "building the CPU kernels once")
            print(f"retnet: {what} (about a minute) into {target.parent}", file=sys.stderr)
        _compile(compiler, target, name)
    return target


def _compile(compiler: str, target: Path, name: str) -> None:
    """Compile into a temporary file, record its size and sha256 beside `target`, then
    rename it into place (atomic: a half-written library is never loaded)."""
    source = Path(str(files("retnet.kernels").joinpath("cpu", "decode.cpp")))
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(command(compiler, source, tmp, name), capture_output=True,
                              text=True)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line),
                         done.stderr.strip()[:200])
            raise BuildError(f"the C++ compile failed: {first}")
        atomic_write_text(record_path(target), json.dumps(_fingerprint(tmp)))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def record_path(library: Path) -> Path:
    """The build record beside a library: {"bytes": size, "sha256": hex digest}."""
    return library.with_name(library.name + ".json")


def _fingerprint(path: Path) -> dict[str, int | str]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _problem(library: Path) -> str | None:
    """None where `library` is the one built here (size and sha256 as recorded beside it),
    else what is wrong with it, in words. A library without a record (an older retnet's) is
    rebuilt too: nothing unverified is loaded."""
    if not library.exists():
        return "not built"
    if not record_path(library).exists():
        return "no build record beside it: an older retnet built it"
    try:
        record = json.loads(record_path(library).read_text())
        found = _fingerprint(library)
    except (OSError, ValueError) as err:
        return f"its build record {record_path(library).name} is unreadable ({err})"
    if not isinstance(record, dict) or record.get("bytes") != found["bytes"]:
        recorded = record.get("bytes") if isinstance(record, dict) else None
        return f"{found['bytes']} bytes where {recorded} were built"
    if record.get("sha256") != found["sha256"]:
        return "its sha256 differs from the one recorded when it was built"
    return None


_loaded: set[Path] = set()


def load(quiet: bool = False) -> None:
    """Build if needed and register torch.ops.retnet.* in this process (once)."""
    path = build(quiet)
    if _loaded and path not in _loaded:  # a second TORCH_LIBRARY(retnet) would abort
        raise BuildError(f"another build of the kernels is loaded in this process; "
                         f"{VARIANT_ENV} is read once, before the first use")
    if path not in _loaded:
        try:
            torch.ops.load_library(str(path))
        except OSError as err:
            raise BuildError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
        from retnet.kernels.fakes import register

        register()
        _loaded.add(path)


def vector_isa() -> str:
    """The vector back end of the kernels this process runs: "avx512", "avx2", "neon" or
    "scalar" (at::vec's plain arrays: correct, not fast), as compiled into the loaded library;
    "none" where no library is loaded."""
    if not _loaded:
        return "none"
    return torch.ops.retnet.isa()


def build_all() -> list[Path]:
    """Every variant this machine runs (`variants()`), compiled two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # each compile is one process: two cores, two builds
        return list(pool.map(lambda name: build(name=name), variants()))


if __name__ == "__main__":  # `make kernels`
    for path in build_all():
        print(path)
