"""The `retnet` command line: a thin shell. Each command is one options dataclass (its fields'
help is the --help text, `retnet.options.opt`) and one function in its feature package; this
file only parses the options into the dataclass, calls the function, and turns a user error
into one line and exit status 2 (never a traceback).

To add a command: write `Options` (fields via `opt`) and `command(opts) -> int` in the feature's
package, then add one `Command` line to COMMANDS below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import retnet
from retnet.options import add_options, given, require


@dataclass(frozen=True)
class Command:
    help: str
    options: str | None  # "module:OptionsClass"; None: the arguments pass through unparsed
    run: str  # "module:function", called with the options; returns the exit status
    extra: str | None = None  # the pip extra that provides `needs`
    needs: tuple[str, ...] = ()  # modules checked before any work (one-line error if missing)


COMMANDS: dict[str, Command] = {
    "info": Command("parameter counts, shapes, state and KV-cache sizes of a preset or a run",
                    "retnet.info:InfoOptions", "retnet.info:command"),
    "train": Command("train a RetNet language model (torchrun for several processes)",
                     "retnet.train:TrainConfig", "retnet.train:command", "train",
                     ("matplotlib",)),
    "tokenizer": Command("train a byte-level BPE tokenizer",
                         "retnet.prepare.tokenizer:TokenizerOptions",
                         "retnet.prepare.tokenizer:command", "train", ("tokenizers",)),
    "data": Command("prepare a corpus once (streamed, multi-worker, resumable) or describe one",
                    "retnet.corpus.command:DataOptions", "retnet.corpus.command:command"),
    "generate": Command("generate text from a checkpoint, streaming; save or continue a state",
                        "retnet.generation.command:GenerateOptions",
                        "retnet.generation.command:command"),
    "serve": Command("an OpenAI-compatible HTTP server with continuous batching",
                     "retnet.serve:ServeConfig", "retnet.serve:command", "serve",
                     ("fastapi", "uvicorn", "prometheus_client")),
    "convert": Command("convert weights from microsoft/torchscale",
                       "retnet.prepare.convert:ConvertOptions", "retnet.prepare.convert:command"),
    "export": Command("export a checkpoint for Hugging Face transformers",
                      "retnet.hf.export:ExportOptions", "retnet.hf.export:command", "hf",
                      ("transformers", "tokenizers")),
    "eval": Command("lm-evaluation-harness tasks and perplexity of a checkpoint",
                    "retnet.eval.command:EvalOptions", "retnet.eval.command:command"),
    "lm-eval": Command("lm-evaluation-harness's own command line with --model retnet and the "
                       "shipped tasks (every flag passes through: retnet lm-eval --help)",
                       None, "retnet.eval.lm_eval_command:command", "eval", ("lm_eval",)),
    "bench": Command("decode/prefill/training cost against a matched Transformer and peers",
                     "retnet.bench.cost:BenchConfig", "retnet.bench.cost:command", "bench",
                     ("transformers", "matplotlib")),
    "compare": Command("RetNet against a matched Transformer (and ablations) on the same data",
                       "retnet.compare:CompareConfig", "retnet.compare:command", "hf,eval,train",
                       ("transformers", "lm_eval", "tokenizers", "matplotlib")),
    "study": Command("a resumable grid of training runs: architectures × sizes × seeds × "
                     "variants, with a report", "retnet.study:StudyOptions",
                     "retnet.study:command", "hf,train",
                     ("transformers", "tokenizers", "matplotlib")),
    "demo": Command("the main job: train the demo model on the stdlib corpus, then sample",
                    "retnet.train.demo:DemoOptions", "retnet.train.demo:command", "train",
                    ("tokenizers", "matplotlib")),
}


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as for every other user error (not the usage)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only `selected` gets its arguments (so `retnet --help` imports
    no feature, and a command's missing extra cannot break another's)."""
    parser = _Parser(prog="retnet", description=retnet.__doc__)
    parser.add_argument("--version", action="version", version=f"retnet {retnet.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == selected and command.options is not None:
            add_options(p, _resolve(command.options))
    return parser


def _selected(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line(err: Exception) -> str:
    """The message of a user error on one line; an OSError as 'what: path'."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _run(name: str, argv: Sequence[str]) -> int:
    command = COMMANDS[name]
    if command.options is None:  # another tool's command line: its own parser reads the rest
        require(command.extra or "", *command.needs)
        return _resolve(command.run)(argv[argv.index(name) + 1:])
    try:
        cls = _resolve(command.options)  # an options module may itself need the extra
    except ImportError:
        require(command.extra or "", *command.needs)
        raise
    args = build_parser(name).parse_args(argv)  # --help works without the extra
    if command.needs:  # before any work: not after training, when the plot is drawn
        require(command.extra or "", *command.needs)
    values = given(args, cls)
    opts = cls.from_cli(values) if hasattr(cls, "from_cli") else cls(**values)
    from retnet.memory import keep_freed_memory

    keep_freed_memory()  # large temporaries reused, not re-faulted (see retnet/memory.py)
    return _resolve(command.run)(opts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _selected(argv)
    if name not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help, --version, or an unknown command: argparse says
        parser.print_help()
        return 0
    try:
        return _run(name, argv)
    except (ValueError, OSError) as err:  # user errors (features raise no others on bad input)
        print(f"retnet {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retnet {name}: interrupted", file=sys.stderr)
        return 130
