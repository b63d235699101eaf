"""Evaluation: continuation log-likelihoods, whole-document perplexity and generation
(`scoring`), the lm-evaluation-harness adapter (`harness`, imported only where lm-eval is
used) and the one task driver with the task files shipped in the package (`tasks`)."""

from retnet.eval.scoring import (
    continuation_logprobs,
    document_logprob,
    generate_until,
    perplexity,
)
from retnet.eval.tasks import run_tasks, shipped_tasks

__all__ = ["continuation_logprobs", "document_logprob", "generate_until", "perplexity",
           "run_tasks", "shipped_tasks"]
