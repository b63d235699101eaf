"""The compiled weight-streaming product against the float64 product of the dequantised weights,
with the fast path on and off (the fallback), and the switch and the build's fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from retnet import kernels

TOL = 1e-5  # relative, float32 accumulation over K ≤ 1029


def _weight(fmt: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weight in fmt, scales or None, the float64 weight it stands for)."""
    w = torch.randn(n, k)
    if fmt == "float32":
        return w, None, w.double()
    if fmt == "bfloat16":
        b = w.bfloat16()
        return b, None, b.double()
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) / 127
    return q, s, q.double() * s.double()[:, None]


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("m", [1, 3, 6, 8, 32])
@pytest.mark.parametrize("k", [16, 37, 512, 1029])
def test_linear_matches_float64(fast, fmt, m, k):
    torch.manual_seed(m * 1000 + k)
    n = 45  # not a multiple of the 4-row blocks
    w, s, exact_w = _weight(fmt, n, k)
    x = torch.randn(m, k)
    y = kernels.linear(x, w, s)
    exact = x.double() @ exact_w.t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    err = ((y.double() - exact).norm() / exact.norm()).item()
    assert err < TOL, err
    if fast:  # the kernel really ran: this machine has g++ and the build must work
        assert kernels.cpu_kernels()


def test_switch_turns_every_path_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and not kernels.cpu_kernels()
    kernels.set_enabled(True)
    try:
        assert kernels.enabled()
    finally:
        kernels.set_enabled(None)
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.enabled()


@pytest.mark.slow
def test_no_compiler_falls_back_with_one_line(tmp_path):
    """Without a compiler the product still runs (through PyTorch), after a single notice."""
    code = ("import torch; from retnet import kernels\n"
            "x, w = torch.randn(2, 8), torch.randn(3, 8)\n"
            "for _ in range(2): y = kernels.linear(x, w)\n"
            "assert torch.allclose(y, x @ w.t()) and not kernels.cpu_kernels()\n")
    env = {**os.environ, "CXX": "no-such-compiler", "RETNET_CACHE": str(tmp_path),
           kernels.ENV: "1"}  # the switch on: the build is tried and fails
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["retnet: CPU kernels unavailable (no C++ compiler (no-such-compiler not "
                     "found; set CXX or install g++)); using the PyTorch reference"]
