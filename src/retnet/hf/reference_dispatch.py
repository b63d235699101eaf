"""The dispatch of the exported remote code (`retnet export --hf`): no fast path travels with
an export, so every operation runs its PyTorch reference. In the package,
`retnet.kernels.dispatch` answers instead; this stands in for it in `modeling_retnet.py`."""

from __future__ import annotations


def choose(op: str, *args, **kwargs) -> None:
    """No fast path: the caller runs the reference of `op`."""
    return None
