"""Where tensors go: the one place that turns a --device option into a torch.device; and
what the processor is called, for the records that name the machine behind a figure."""

from __future__ import annotations

import torch

from retnet.options import short


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` as a torch.device; None: the first CUDA device if there is one, else the
    CPU. A name torch does not know, or a device this machine lacks, is a one-line ValueError
    (exit 2 from the CLI), not torch's assertion deep inside the first `.to()`."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {short(requested)}; use cpu, cuda, cuda:N or mps"
                         ) from None
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count() > 0:
        raise ValueError(f"device {device} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        build = "a CPU-only torch build" if torch.version.cuda is None else "no usable GPU"
        raise ValueError(f"device {device} is not available here ({build}); use --device cpu")
    return device


def check_device(requested: str | None) -> None:
    """Raise the ValueError of `pick_device` for a bad name, before any slow work."""
    if requested is not None:
        pick_device(requested)


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), else its architecture."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
