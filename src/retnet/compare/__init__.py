"""`retnet compare`: RetNet against a Transformer of matched non-embedding parameters (Llama:
RoPE, RMSNorm, SwiGLU, sdpa), trained on the same tokenizer, the same batches in the same
order, the same token budget, optimiser and schedule (`retnet train`'s step); and the paper's
ablations as options of the one RetNet. Reports validation curves, loss by position up to 4×
the training length, zero-shot multiple-choice accuracy (lm-eval), throughput and peak memory.

`config` holds the options, `experiment` the runs, `report` the summary and plots,
`baselines` the matched Transformer."""

from retnet.compare.config import VARIANTS, CompareConfig
from retnet.compare.experiment import build_models, command, non_embedding, run
from retnet.compare.report import summarise

__all__ = ["VARIANTS", "CompareConfig", "build_models", "command", "non_embedding", "run",
           "summarise"]
