"""Generation: sampling apart from the loop (`sampling`), the prefill / decode-one loop and its
state double-buffer (`loop`), the one text-streaming helper (`text`), and `retnet generate`
(`command`, whose model loading `retnet serve` shares)."""

from retnet.generation.loop import StepBuffers, decode_one, generate, generate_stream, prefill
from retnet.generation.sampling import (
    SamplingParams,
    filter_logits,
    make_generators,
    penalise_repetition,
    sample,
)
from retnet.generation.text import TextStream

__all__ = [
    "SamplingParams",
    "StepBuffers",
    "TextStream",
    "decode_one",
    "filter_logits",
    "generate",
    "generate_stream",
    "make_generators",
    "penalise_repetition",
    "prefill",
    "sample",
]
