"""retnet: Retentive Networks (Sun et al. 2023), exact in parallel, recurrent and chunkwise form."""

from retnet.model import PRESETS, RetNetConfig, RetNetLM, RetNetOutput, RetNetState, lm_loss

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "RetNetConfig",
    "RetNetLM",
    "RetNetOutput",
    "RetNetState",
    "__version__",
    "lm_loss",
]
