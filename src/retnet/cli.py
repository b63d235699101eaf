"""The `retnet` command line. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import retnet

# Subcommands register here: name -> (add_arguments, run).
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset name, e.g. tiny, small, paper-1.3b")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab_size")


def _info(args: argparse.Namespace) -> int:
    import torch

    from retnet import RetNetConfig, RetNetLM

    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    config = RetNetConfig.from_preset(args.preset, **overrides)
    with torch.device("meta"):  # paper sizes build without allocating memory
        model = RetNetLM(config)
    c = config
    total, body = model.num_parameters(), model.num_parameters(embeddings=False)
    print(f"preset {args.preset}: d_model={c.d_model} layers={c.n_layers} heads={c.n_heads} "
          f"K={c.key_head_dim} V={c.value_head_dim} ffn={c.ffn_dim} vocab={c.vocab_size} "
          f"decays={c.decays}")
    print(f"parameters: {total:,} total, {body:,} non-embedding "
          f"({body / (12 * c.d_model**2 * c.n_layers):.4f} × 12·d²·L)")
    print("per-layer shapes:")
    for name, p in model.blocks[0].named_parameters():
        print(f"  {name:32s} {list(p.shape)}")
    state = c.state_bytes_per_sequence
    print(f"recurrent state per sequence (float32): {_human_bytes(state)}, at any length")
    kv_per_token = 2 * c.n_layers * c.d_model * 4
    for t in (2048, 8192, 32768):
        print(f"KV cache of a same-width Transformer at {t // 1024}k tokens (float32): "
              f"{_human_bytes(kv_per_token * t)} ({kv_per_token * t / state:.1f}× the state)")
    return 0


def _field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing comment, used as its --help text."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M))


def _flag_type(f: dataclasses.Field) -> type:
    """int, float or str, from the default or else from the annotation ("int | None")."""
    if f.default is not None and f.default is not dataclasses.MISSING:
        return type(f.default)
    annotation = str(f.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def add_dataclass_args(p: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a run-options dataclass; dict fields take KEY=VALUE pairs."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=text)
        elif str(f.type).startswith("list"):  # list[int] or list[str]; repeatable
            kind = int if str(f.type) == "list[int]" else str
            p.add_argument(flag, action="extend", nargs="+", type=kind, default=None, metavar="X",
                           help=f"{text} (default: {' '.join(map(str, f.default_factory()))})")
        elif f.default_factory is not dataclasses.MISSING:  # dict of overrides
            p.add_argument(flag, action="append", metavar="KEY=VALUE", help=text)
        else:
            p.add_argument(flag, type=_flag_type(f), default=None,
                           help=f"{text} (default: {default})")


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of a run-options dataclass that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name) is not None}


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """["d_model=128", "dropout=0.1"] -> {"d_model": 128, "dropout": 0.1} (JSON values)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _train_args(p: argparse.ArgumentParser) -> None:
    from retnet.train import TrainConfig

    p.add_argument("--config", help="a .toml or .yaml file of these options (flags win)")
    add_dataclass_args(p, TrainConfig)


def _train(args: argparse.Namespace) -> int:
    from retnet.train import TrainConfig, train

    values = _given(args, TrainConfig)
    if "model" in values:
        values["model"] = parse_overrides(values["model"])
    values = {**(TrainConfig.read_file(args.config) if args.config else {}), **values}
    if values.get("resume"):  # the run's stored options, then the file's, then the flags
        values = {**TrainConfig.stored(values.get("out", TrainConfig.out)), **values}
    cfg = TrainConfig(**values)
    result = train(cfg)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return 0


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train"], help="what to do")
    p.add_argument("--data", help="text file, .jsonl, directory or glob (default: the stdlib)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")


def _tokenizer(args: argparse.Namespace) -> int:
    from retnet.data import load_documents, split_documents
    from retnet.tokenizer import train_bpe

    train_docs, _ = split_documents(load_documents(args.data, args.text_field))
    tok = train_bpe((d.text for d in train_docs), args.vocab_size)
    tok.save(args.out)
    from retnet.tokenizer import save_chat_template

    save_chat_template(Path(args.out).parent)
    print(f"wrote {args.out}: {tok.vocab_size} tokens, trained on {len(train_docs)} documents")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: ~3 min)")
    p.add_argument("--data", default=None, help="other text instead of the stdlib corpus")


def _demo(args: argparse.Namespace) -> int:
    from retnet.train.demo import run_demo

    return run_demo(args.out, args.steps, args.data)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="0: only prefill (--state-out)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-in", help="continue from a state saved by --state-out")
    p.add_argument("--state-out", help="save the state after the run (safetensors)")


def _check_generate_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the options, before the model loads or prints."""
    from retnet.generation import SamplingParams

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be ≥ 0; got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("--prompt is not valid UTF-8 text") from None
    if args.state_out:
        out = Path(args.state_out)
        if out.is_dir():
            raise UserError(f"--state-out {out} is a directory; name a file in it, such as "
                            f"{out / 'state.safetensors'}")
        if not out.parent.is_dir():
            raise UserError(f"--state-out {out}: the directory {out.parent} does not exist; "
                            "create it first")
    if args.state_in and not Path(args.state_in).is_file():
        raise UserError(f"--state-in {args.state_in} is not a file; pass one that --state-out "
                        "wrote")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from retnet.checkpoint import load_checkpoint
    from retnet.generation import generate_stream
    from retnet.model import load_state, save_state
    from retnet.model.layout import use_inference_layout

    _check_generate_args(args)
    ckpt = load_checkpoint(args.checkpoint)
    model, tok = use_inference_layout(ckpt.build_model()), ckpt.tokenizer
    fingerprint = model.config.fingerprint()
    state = load_state(args.state_in, fingerprint) if args.state_in else None
    ids = tok.encode(args.prompt) or [tok.eos_id]
    if max(ids) >= model.config.vocab_size:
        raise UserError("the prompt encodes to ids beyond the model's vocabulary")
    stream = generate_stream(
        model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, seed=args.seed, state=state)
    sys.stdout.write(args.prompt)
    new: list[int] = []
    shown = ""
    for token, final in stream:
        if final is not None:
            state = final
            continue
        new.append(int(token[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    if args.state_out:
        save_state(args.state_out, state, fingerprint)
        print(f"state after {int(state.offset[0])} tokens saved to {args.state_out}",
              file=sys.stderr)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    from retnet.serve import ServeConfig

    add_dataclass_args(p, ServeConfig)


def _serve(args: argparse.Namespace) -> int:
    try:
        from retnet.serve import ServeConfig, serve
    except ImportError as err:
        raise UserError(f"serving needs the [serve] extra ({err.name} is missing): "
                        "pip install 'retnet-exact[serve]'") from None
    values = _given(args, ServeConfig)
    if "checkpoint" not in values:
        raise UserError("--checkpoint is required (a run directory such as runs/demo)")
    # As vLLM does (VLLM_API_KEY): an environment variable keeps the key out of `ps`.
    values.setdefault("api_key", os.environ.get("RETNET_API_KEY") or None)
    serve(ServeConfig(**values))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", nargs=2, metavar=("CHECKPOINT", "OUT"), required=True,
                   help="write a transformers folder with its own code (AutoModelForCausalLM "
                   "with trust_remote_code=True, or after import retnet.hf)")


def _export(args: argparse.Namespace) -> int:
    hf = _extra("retnet.hf", "hf")
    out = hf.export_checkpoint(*args.hf)
    print(f"wrote {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True), or after `import retnet.hf` without it")
    return 0


def _extra(module: str, extra: str):
    """Import an optional part, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"this needs the [{extra}] extra ({err.name} is missing): "
                        f"pip install 'retnet-exact[{extra}]'") from None


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint folder")
    p.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated")
    p.add_argument("--include-path", default=None,
                   help="folder of extra task YAML files (the shipped tasks retnet_mc, "
                   "retnet_rolling, retnet_gen and python_mc are always available)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--perplexity", nargs="?", const="", default=None, metavar="DATA",
                   help="also report perplexity on DATA (no value: the stdlib validation split)")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _eval(args: argparse.Namespace) -> int:
    from retnet.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model, tok = ckpt.build_model(), ckpt.tokenizer
    results: dict[str, Any] = {}
    if args.perplexity is not None:
        from retnet.data import load_documents, split_documents
        from retnet.eval import perplexity

        _, val = split_documents(load_documents(args.perplexity or None))
        results["perplexity"] = perplexity(model, tok, [d.text for d in val])
        print(f"perplexity {results['perplexity']['perplexity']:.3f}, bits per byte "
              f"{results['perplexity']['bits_per_byte']:.4f} over "
              f"{results['perplexity']['tokens']:,} tokens")
    if args.tasks:
        _extra("lm_eval", "eval")
        from retnet.eval import run_tasks

        results["tasks"] = run_tasks(model, tok, args.tasks.split(","),
                                     include_path=args.include_path,
                                     num_fewshot=args.num_fewshot, limit=args.limit,
                                     batch_size=args.batch_size)
        for task, metrics in results["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{task}: {shown}")
    if not results:
        raise UserError("nothing to do: pass --tasks and/or --perplexity")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=["torchscale"],
                   help="the implementation that wrote CKPT")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="state_dict (.pt, weights only) or .safetensors")
    p.add_argument("out", metavar="OUT", help="run directory to write (retnet generate/serve it)")
    p.add_argument("--arch", help="torchscale's RetNetConfig arguments, as a JSON file or "
                                  "inline JSON; activation_fn, layernorm_eps and "
                                  "no_scale_embedding are required (the weights do not record "
                                  "them); shapes give the rest")
    p.add_argument("--tokenizer", default="byte", help="the model's tokenizer.json (default byte)")


def _convert(args: argparse.Namespace) -> int:
    from retnet.convert import convert_command

    convert_command(args.source, args.checkpoint, args.out, args.arch, args.tokenizer)
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    from retnet.bench.cost import BenchConfig

    add_dataclass_args(p, BenchConfig)


def _bench(args: argparse.Namespace) -> int:
    from retnet.bench.cost import BenchConfig, run

    values = _given(args, BenchConfig)
    for key in ("contexts", "batches", "prefill_lengths", "train_lengths"):
        if key in values:
            values[key] = [int(x) for x in values[key]]
    cfg = BenchConfig(**values)
    run(cfg)
    print(f"wrote {cfg.out}/results.json, report.md and plots")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    from retnet.compare import CompareConfig

    add_dataclass_args(p, CompareConfig)


def _compare(args: argparse.Namespace) -> int:
    from retnet.compare import CompareConfig, run, summarise

    values = _given(args, CompareConfig)
    if "variants" in values:  # --variants no-gate no-decay (or comma-separated)
        values["variants"] = [v for item in values["variants"] for v in item.split(",") if v]
    cfg = CompareConfig(**values)
    results = run(cfg)
    for name, row in summarise(results["runs"]).items():
        print(f"{name:24s} val loss {row['val_loss']:.4f}  ppl {row['val_ppl']:.2f}  "
              f"acc {row['acc']:.3f}  {row['tokens_per_s']:.0f} tokens/s")
    print(f"report: {cfg.out}/report.md")
    return 0


COMMANDS: dict[str, tuple[str, Command]] = {
    "info": ("parameter counts, shapes, state and KV-cache sizes of a preset", (_info_args, _info)),
    "train": ("train a RetNet language model (torchrun for several processes)",
              (_train_args, _train)),
    "tokenizer": ("train a byte-level BPE tokenizer", (_tokenizer_args, _tokenizer)),
    "generate": ("generate text from a checkpoint, streaming; save or continue a state",
                 (_generate_args, _generate)),
    "serve": ("an OpenAI-compatible HTTP server with continuous batching",
              (_serve_args, _serve)),
    "convert": ("convert weights from microsoft/torchscale", (_convert_args, _convert)),
    "export": ("export a checkpoint for Hugging Face transformers", (_export_args, _export)),
    "eval": ("lm-evaluation-harness tasks and perplexity of a checkpoint", (_eval_args, _eval)),
    "bench": ("decode/prefill/training cost against a matched Transformer and peers",
              (_bench_args, _bench)),
    "compare": ("RetNet against a matched Transformer (and ablations) on the same data",
                (_compare_args, _compare)),
    "demo": ("the main job: train the demo model on the stdlib corpus, then sample",
             (_demo_args, _demo)),
}


def _one_line(err: Exception) -> str:
    """The message of a user error on one line; an OSError as 'what: path'."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as for every other user error (not the usage)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retnet", description=retnet.__doc__)
    parser.add_argument("--version", action="version", version=f"retnet {retnet.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, (add_args, _)) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from retnet.memory import keep_freed_memory

    keep_freed_memory()  # large temporaries reused, not re-faulted (see retnet/memory.py)
    try:
        return COMMANDS[args.command][1][1](args)
    except (UserError, ValueError, OSError) as err:
        print(f"retnet {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retnet {args.command}: interrupted", file=sys.stderr)
        return 130
