"""Every vector back end this machine can run, tested against the reference: the kernels' tests
run again in a process that loads a narrower build of the same source (`retnet.kernels.build`
VARIANTS: on an AVX-512 machine its AVX2 build, on any x86 the plain at::vec build), so a
developer on either machine kind tests both x86 paths. (aarch64's NEON build is checked by
tests/kernels/test_kernels_cross.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retnet.kernels.build import VARIANT_ENV, variants

HERE = Path(__file__).parents[1]  # tests/
# The tests of the compiled code itself; "-k not reference" leaves out their runs with the
# fast paths off, which the main run covers.
KERNEL_TESTS = ["kernels/test_kernels.py", "kernels/test_fast_decode.py", "ops/test_head_norm.py",
                "kernels/test_kernels_opcheck.py"]
ISA = {"avx2": "avx2", "scalar": "scalar"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [v for v in variants() if v != "native"])
def test_kernel_tests_pass_on_each_variant(name):
    env = {**os.environ, VARIANT_ENV: name}
    code = ("from retnet.kernels import build; build.load(); print(build.vector_isa())")
    isa = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert isa.returncode == 0, isa.stderr
    assert isa.stdout.split() == [ISA[name]]  # the variant really has that back end
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "not reference", *(str(HERE / t) for t in KERNEL_TESTS)],
                          env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_an_unknown_variant_is_refused_in_one_line():
    env = {**os.environ, VARIANT_ENV: "avx1024"}
    code = "from retnet.kernels import build; build.load()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "RETNET_KERNEL_VARIANT='avx1024' is not a kernel variant" in done.stderr


def test_a_plain_build_sends_calls_to_the_reference(monkeypatch, capsys, kernels_on):
    """Never slower than the reference: a library without a vector ISA is not used unless
    asked for by name, and one notice says why."""
    from retnet.kernels import build, switch

    monkeypatch.setattr(build, "vector_isa", lambda: "scalar")
    monkeypatch.setattr(build, "load", lambda quiet=False: None)  # as if a plain build loaded
    monkeypatch.delenv(VARIANT_ENV, raising=False)
    monkeypatch.setattr(switch, "_cpu", None)
    monkeypatch.setattr(switch, "_noticed", set())
    assert not switch.cpu_kernels()
    assert "built without vector instructions" in capsys.readouterr().err
    monkeypatch.setenv(VARIANT_ENV, "scalar")  # asked for by name: used (its tests)
    monkeypatch.setattr(switch, "_cpu", None)
    assert switch.cpu_kernels()
