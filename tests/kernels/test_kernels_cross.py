"""The CPU kernels' vector back ends, NEON included, checked from an x86 machine: decode.cpp
cross-compiled for aarch64, and tests/cross/simd_check.cpp (every simd.h function, the
activations and the weight-streaming products against scalar loops) run under qemu-aarch64 and
natively for each x86 build variant this CPU runs. The cross tools come from `make cross-tools`;
without them these tests fail and say so."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from retnet.kernels import build

CPU = Path(str(files("retnet.kernels").joinpath("cpu")))
CHECK = Path(__file__).parents[1] / "cross" / "simd_check.cpp"
CROSS_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
# The library's flags, for an executable; -march as an Arm v8.2 server core (Graviton 2, Ampere).
FLAGS = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")]
AARCH64 = ("-march=armv8.2-a",)
LANES = {"neon": 4, "avx2": 8, "avx512": 16, "scalar": 8}
# Targets of simd_check: the aarch64 build under qemu, then this machine's kernel variants.
TARGETS = ["neon", *build.variants()]


def _missing_tools() -> str | None:
    missing = [tool for tool in (CROSS_CXX, QEMU) if shutil.which(tool) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not found: run `make cross-tools`"


def _host_isa(variant: str) -> str:
    """The back end simd.h picks for build variant `variant` on this CPU."""
    flags = set(build._cpu_flags().split())
    if variant == "scalar":
        return "scalar"
    if variant == "native" and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "neon" if platform.machine() in ("aarch64", "arm64") else "scalar"


def _compile(target: str, out: Path) -> list[str]:
    """The command that builds simd_check for target into out, or for "decode" checks decode.cpp
    for aarch64 without generating code (half the time: every ISA-specific line is in simd.h,
    whose NEON code the "neon" simd_check build compiles in full)."""
    common = [*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              f"-I{CPU}", *(f"-I{p}" for p in include_paths())]
    if target == "decode":
        return [CROSS_CXX, *AARCH64, *common, "-fsyntax-only", str(CPU / "decode.cpp")]
    if target == "neon":
        return [CROSS_CXX, *AARCH64, "-static", *common, str(CHECK), "-o", str(out)]
    return [os.environ.get("CXX", "g++"), *build.VARIANTS[target], *common, str(CHECK), "-o",
            str(out)]


pytestmark = pytest.mark.slow  # compiles every variant (and for aarch64, run under qemu)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compile of this module started at once (they are most of its time), as
    target -> (process, executable, compiler log); the aarch64 ones only where the cross
    tools are."""
    folder = tmp_path_factory.mktemp("cross")
    cross = [] if _missing_tools() else ["decode", "neon"]
    started = {}
    for target in cross + build.variants():
        exe, log = folder / target, folder / f"{target}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen(_compile(target, exe), stdout=sink, stderr=subprocess.STDOUT)
        started[target] = (proc, exe, log)
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _built(builds, target: str) -> Path:
    """Wait for target's compile; fail with its first error line."""
    if target in ("decode", "neon") and _missing_tools():
        pytest.fail(_missing_tools(), pytrace=False)
    proc, exe, log = builds[target]
    if proc.wait() != 0:
        text = log.read_text()
        first = next((line for line in text.splitlines() if "error" in line), text[-500:])
        pytest.fail(f"{target}: the compile failed: {first}", pytrace=False)
    return exe


def test_decode_compiles_for_aarch64(builds):
    _built(builds, "decode")


@pytest.mark.parametrize("target", TARGETS)
def test_simd_check(builds, target):
    exe = _built(builds, target)
    run = subprocess.run([QEMU, exe] if target == "neon" else [exe], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    isa = "neon" if target == "neon" else _host_isa(target)
    assert run.stdout.splitlines()[0] == f"isa={isa} lanes={LANES[isa]}", run.stdout[:200]
