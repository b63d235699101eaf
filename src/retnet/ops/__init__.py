"""Pure tensor functions: retention in its three forms, decays, rotation, normalisation."""

from retnet.ops.decay import DECAY_SCHEMES, decay_row_sum, log_decays
from retnet.ops.retention import (
    CHUNKWISE,
    DEFAULT_CHUNK_SIZE,
    MODES,
    PARALLEL,
    RECURRENT,
    Form,
    RetentionForm,
    retention,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)
from retnet.ops.rotary import rotary_factors, rotate

__all__ = [
    "CHUNKWISE",
    "DECAY_SCHEMES",
    "DEFAULT_CHUNK_SIZE",
    "MODES",
    "PARALLEL",
    "RECURRENT",
    "Form",
    "RetentionForm",
    "decay_row_sum",
    "log_decays",
    "retention",
    "retention_chunkwise",
    "retention_parallel",
    "retention_recurrent",
    "rotary_factors",
    "rotate",
]
