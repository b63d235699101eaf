"""retnet: Retentive Networks (Sun et al. 2023), exact in parallel, recurrent and chunkwise form."""

from retnet.generation import generate, generate_stream
from retnet.loading import load
from retnet.model import (
    PRESETS,
    RetNetConfig,
    RetNetLM,
    RetNetOutput,
    RetNetState,
    lm_loss,
    load_state,
    save_state,
    use_inference_layout,
)
from retnet.modules.quant import quantize

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "RetNetConfig",
    "RetNetLM",
    "RetNetOutput",
    "RetNetState",
    "__version__",
    "generate",
    "generate_stream",
    "lm_loss",
    "load",
    "load_state",
    "quantize",
    "save_state",
    "use_inference_layout",
]
