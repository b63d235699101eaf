"""The one switch over every fast path, the notice that says once why the reference runs, and
whether this machine's C++ kernels are loaded. `retnet.kernels.dispatch` asks these; the
package re-exports them (`retnet.kernels.set_enabled`, `retnet.kernels.enabled`, ...)."""

from __future__ import annotations

import os
import sys

ENV = "RETNET_KERNELS"  # "0", "off", "false" or "no" turns every fast path off
_override: bool | None = None  # set_enabled's value; None: the environment decides
_noticed: set[str] = set()
_cpu: bool | None = None  # None: not tried yet


def enabled() -> bool:
    """Whether fast paths may be used: `set_enabled`, else the environment (default on)."""
    if _override is not None:
        return _override
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def set_enabled(flag: bool | None) -> None:
    """Turn the fast paths on or off for this process; None goes back to $RETNET_KERNELS."""
    global _override
    _override = flag


def why_off() -> str:
    """What turned the fast paths off, in words (for `enabled()` False)."""
    return f"{ENV}={os.environ.get(ENV)}" if _override is None else "set_enabled(False)"


def notice(reason: str) -> None:
    """Say once on stderr that the reference runs instead of a fast path, and why."""
    if reason not in _noticed:
        _noticed.add(reason)
        print(f"retnet: {reason}; using the PyTorch reference", file=sys.stderr)


def note(reason: str) -> None:
    """Say once on stderr that a fast path is not made for this call (its dtype, device or
    backend), so the reference runs it: by design and with the same results, not a failure."""
    if reason not in _noticed:
        _noticed.add(reason)
        print(f"retnet: note: {reason}; the PyTorch reference runs it instead, with the same "
              "results", file=sys.stderr)


def cpu_kernels() -> bool:
    """Whether torch.ops.retnet's CPU kernels are loaded here (building them on first use)."""
    global _cpu
    if not enabled():
        return False
    if _cpu is None:
        from retnet.kernels.build import BuildError, load

        try:
            load()
            _cpu = worth_using()
        except BuildError as err:
            notice(f"CPU kernels unavailable ({err})")
            _cpu = False
    return _cpu


def worth_using() -> bool:
    """The rule that keeps every CPU fast path at least as fast as the reference: a library
    whose vector layer fell back to at::vec's plain arrays (no AVX2+FMA, AVX-512 or NEON at
    build time) runs scalar loops, slower than PyTorch's own vectorised kernels, so it is used
    only when that build was asked for by name ($RETNET_KERNEL_VARIANT=scalar: the tests of
    that back end); otherwise the reference runs, after one notice."""
    from retnet.kernels import build

    if build.vector_isa() != "scalar" or os.environ.get(build.VARIANT_ENV):
        return True
    notice("the CPU kernels were built without vector instructions (this compiler or CPU has "
           "no AVX2+FMA, AVX-512 or NEON), slower than PyTorch's own")
    return False


def vector_isa() -> str:
    """The vector back end of this machine's C++ kernels ("avx512", "avx2", "neon", "scalar";
    "none" where they cannot be loaded), building them first if needed."""
    from retnet.kernels import build

    cpu_kernels()
    return build.vector_isa()
