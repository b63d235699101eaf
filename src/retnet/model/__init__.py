"""Config → modules → language model, and the recurrent state it passes around."""

from retnet.model.config import PRESETS, RetNetConfig
from retnet.model.fast_decode import use_inference_layout
from retnet.model.lm import RetNetLM, RetNetOutput, lm_loss
from retnet.model.state import RetNetState
from retnet.model.state_file import load_state, save_state
from retnet.modules.layout import set_weight_layout, use_decode_layout

__all__ = [
    "PRESETS",
    "RetNetConfig",
    "RetNetLM",
    "RetNetOutput",
    "RetNetState",
    "lm_loss",
    "load_state",
    "save_state",
    "set_weight_layout",
    "use_decode_layout",
    "use_inference_layout",
]
