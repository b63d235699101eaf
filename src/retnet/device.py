"""Where tensors go: the one place that turns a --device option into a torch.device."""

from __future__ import annotations

import torch

from retnet.options import short


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` as a torch.device; None: the first CUDA device if there is one, else the
    CPU. A name torch does not know is a one-line ValueError (exit 2 from the CLI)."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {short(requested)}; use cpu, cuda, cuda:N or mps"
                         ) from None


def check_device(requested: str | None) -> None:
    """Raise the ValueError of `pick_device` for a bad name, before any slow work."""
    if requested is not None:
        pick_device(requested)
