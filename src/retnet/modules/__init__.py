"""nn.Modules built from plain ints: multi-scale retention, the FFN and the RetNet block."""

from retnet.modules.block import FeedForward, RetNetBlock
from retnet.modules.retention import MultiScaleRetention

__all__ = ["FeedForward", "MultiScaleRetention", "RetNetBlock"]
