"""The `retnet` command line. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")


def _demo(args: argparse.Namespace) -> int:
    from retnet.demo import run_demo

    return run_demo(args.preset)


COMMANDS: dict[str, tuple[str, Command]] = {
    "info": ("parameter counts, shapes, state and KV-cache sizes of a preset", (_info_args, _info)),
    "demo": ("build a model, check the three forms agree, decode a few tokens",
             (_demo_args, _demo)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retnet", description=retnet.__doc__)
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
    try:
        return COMMANDS[args.command][1][1](args)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"retnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retnet {args.command}: interrupted", file=sys.stderr)
        return 130
