"""`retnet lm-eval ...`: lm-evaluation-harness's own command line with the "retnet" model
registered (lm-eval 0.4.13 loads no outside model without an import) and our shipped tasks on
its task path. Every flag is lm-eval's and passes through unchanged, with four adjustments:

- `--device` defaults to what exists (lm-eval's default is cuda:0, an error on a CPU machine);
- `batch_size=` inside `--model_args`, where lm-eval users put it, becomes `--batch_size`
  (lm-eval would also pass its own default and the model would get the argument twice);
- `--include_path DIR` adds DIR to the shipped tasks instead of replacing them;
- `checkpoint=` in `--model_args` is passed as `pretrained=`, the name lm-eval gives the
  results folder (`results/runs__demo/`, not a random `results/i82qcls7/`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

SUBCOMMANDS = ("run", "ls", "validate")


def _argv(args: Sequence[str]) -> list[str]:
    """lm-eval's legacy form (no subcommand) means `run`, as in its own `lm_eval ...`."""
    args = list(args)
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
        args.insert(0, "run")
    return args


def adjust(namespace) -> None:
    """The four adjustments of the module docstring, on lm-eval's parsed arguments."""
    from retnet.eval.tasks import shipped_tasks

    if hasattr(namespace, "include_path"):
        extra = [namespace.include_path] if namespace.include_path else []
        namespace.include_path = [str(shipped_tasks()), *extra]
    if hasattr(namespace, "device") and namespace.device is None \
            and getattr(namespace, "config", None) is None:
        namespace.device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = getattr(namespace, "model_args", None)
    if isinstance(model_args, dict) and getattr(namespace, "model", None) == "retnet" \
            and "checkpoint" in model_args and "pretrained" not in model_args:
        # lm-eval names the results folder after pretrained= (else a random name)
        model_args["pretrained"] = model_args.pop("checkpoint")
    if isinstance(model_args, dict) and "batch_size" in model_args:
        size = str(model_args.pop("batch_size"))
        given = getattr(namespace, "batch_size", None)
        if given is not None and str(given) != size:
            raise ValueError(f"batch_size={size} in --model_args but --batch_size {given}; "
                             "give one of them")
        namespace.batch_size = size


def command(args: Sequence[str]) -> int:
    """Run lm-eval's command line on `args` (everything after `retnet lm-eval`)."""
    # lm-eval's built-in models first: it imports them only while its registry is empty,
    # so registering ours first would hide `--model hf` and `local-completions`.
    import lm_eval.models  # noqa: F401
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from retnet.eval.harness import quiet_git  # the import registers --model retnet

    setup_logging()
    quiet_git()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm-eval", *_argv(args)]
    try:
        namespace = parser.parse_args()
    finally:
        sys.argv = saved
    adjust(namespace)
    parser.execute(namespace)
    return 0
