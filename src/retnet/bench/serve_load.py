"""Load test of `retnet serve`: N concurrent streaming clients, a fixed number of requests,
prompts of each context length; throughput, time to first token, inter-token latency and the
server's memory. The server runs as a real subprocess on 127.0.0.1 (random `small` weights
and the byte tokenizer: the cost does not depend on the values).

    python benchmarks/serve_load.py [--contexts 512 8192] [--clients 8] [--requests 16]

The mixed scenario measures fairness instead: short streamed requests, sent back to back by
--clients clients, while one 8k-token prompt and one 200-message chat arrive; the time to
first token and inter-token latency of the short ones, for each server code given (a
PYTHONPATH each, run in turns, so that a machine shared with other work loads them alike):

    python benchmarks/serve_load.py --mixed before=/tmp/wt-before/src after=src --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from retnet.bench.machine import header
from retnet.bench.measure import percentile, script_parser, table, write_results
from retnet.memory import rss_mib


def make_checkpoint(folder: Path, preset: str) -> Path:
    """A checkpoint of a random model with the byte tokenizer, as `retnet serve` loads one."""
    import torch

    from retnet.checkpoint import save_checkpoint
    from retnet.model import RetNetConfig, RetNetLM
    from retnet.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset(preset))
    save_checkpoint(folder / "bench", 0, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 0, "rng": {}}, {})
    return folder / "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(url: str, prompt: list[int], max_tokens: int,
                      messages: list[dict] | None = None) -> dict:
    """One streamed completion (a chat if messages are given): its start, time to its
    first token, the gaps between tokens, tokens."""
    import httpx

    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    body |= {"messages": messages} if messages else {"prompt": prompt}
    path = "/v1/chat/completions" if messages else "/v1/completions"
    start = time.perf_counter()
    stamps = []
    async with httpx.AsyncClient(timeout=600) as c, c.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"start": start, "ttft": stamps[0] - start, "gaps": gaps, "tokens": len(stamps)}


async def load(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(clients)

    async def limited(p):
        async with sem:
            return await one_request(url, p, max_tokens)

    return await asyncio.gather(*(limited(p) for p in prompts))


def start_server(args: argparse.Namespace, ckpt: Path, context: int, pythonpath: str = "",
                 batch: int | None = None) -> tuple[subprocess.Popen, str]:
    """`retnet serve` (from `pythonpath`, if given) on a free port, once its /health answers;
    the process and its URL."""
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    server = subprocess.Popen(
        [sys.executable, "-m", "retnet", "serve", "--checkpoint", str(ckpt), "--port",
         str(port), "--max-prompt-tokens", str(max(context, 512)), "--max-batch",
         str(batch or args.clients), "--cache-mib", str(args.cache_mib), "--model-name", "bench"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return server, url


def run_context(args: argparse.Namespace, ckpt: Path, context: int) -> dict:
    import httpx

    server, url = start_server(args, ckpt, context)
    try:
        idle = rss_mib(pid=server.pid)
        rng = random.Random(context)
        prompts = [[rng.randrange(256) for _ in range(context)] for _ in range(args.requests)]
        start = time.perf_counter()
        results = asyncio.run(load(url, prompts, args.clients, args.max_tokens))
        wall = time.perf_counter() - start
        metrics = httpx.get(url + "/metrics?format=json", timeout=10).json()
        peak = rss_mib("VmHWM", server.pid)
        after = rss_mib(pid=server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"context": context, "requests": args.requests, "clients": args.clients,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * statistics.median(gaps),
            "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
            "rss_idle_mib": idle, "rss_after_mib": after, "rss_peak_mib": peak,
            "batch_size_mean": metrics["batch_size_mean"],
            "prefix_cache_mib": metrics["prefix_cache_bytes"] / 2**20}


COLUMNS = ("context", "tokens/s", "TTFT p50 / p99 s", "inter-token p50 / p99 ms", "mean batch",
           "server RSS idle / after / peak MiB", "prefix cache MiB")


def _row(r: dict) -> list[str]:
    return [str(r["context"]), f"{r['tokens_per_s']:.0f}",
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}",
            f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}", f"{r['batch_size_mean']:.1f}",
            f"{r['rss_idle_mib']:.0f} / {r['rss_after_mib']:.0f} / {r['rss_peak_mib']:.0f}",
            f"{r['prefix_cache_mib']:.0f}"]


def report(rows: list[dict], args: argparse.Namespace) -> list[str]:
    return [header("float32", f"preset {args.preset}", f"{args.clients} concurrent clients",
                   f"{args.requests} requests of {args.max_tokens} tokens each"), "",
            *table(COLUMNS, map(_row, rows))]


LONG_PROMPT, CHAT_MESSAGES, SHORT_PROMPT = 8192, 200, 32


async def mixed_load(url: str, clients: int, max_tokens: int, delay_s: float) -> dict:
    """Short requests from `clients` clients, back to back, until the two long ones sent
    after delay_s (an 8k-token prompt, a 200-message chat) have their first token; the short
    requests that started before then, and the long ones' times to first token."""
    rng = random.Random(0)
    done = asyncio.Event()

    async def client() -> list[dict]:
        out = []
        while not done.is_set():
            prompt = [rng.randrange(256) for _ in range(SHORT_PROMPT)]
            out.append(await one_request(url, prompt, max_tokens))
        return out

    async def long_ones() -> list[dict]:
        await asyncio.sleep(delay_s)
        long = [rng.randrange(256) for _ in range(LONG_PROMPT)]
        chat = [{"role": "user", "content": "a"} for _ in range(CHAT_MESSAGES)]
        both = await asyncio.gather(one_request(url, long, 1),
                                    one_request(url, [], 1, messages=chat))
        done.set()
        return both

    shorts, long = await asyncio.gather(asyncio.gather(*(client() for _ in range(clients))),
                                        long_ones())
    start = min(r["start"] for r in long)  # the short requests that met the long ones
    end = max(r["start"] + r["ttft"] for r in long)
    met = [r for rs in shorts for r in rs if r["start"] + r["ttft"] >= start
           and r["start"] <= end]
    return {"short": met, "long_ttft": [r["ttft"] for r in long]}


def run_mixed(args: argparse.Namespace, ckpt: Path, label: str, pythonpath: str) -> dict:
    # Room in the batch for the two long requests beside the short ones.
    server, url = start_server(args, ckpt, LONG_PROMPT + 12 * CHAT_MESSAGES, pythonpath,
                               batch=args.clients + 2)
    try:
        result = asyncio.run(mixed_load(url, args.clients, args.max_tokens, 2.0))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"label": label, **result}


def summarize_mixed(runs: list[dict]) -> list[dict]:
    """Per label, over all its rounds: percentiles of the short requests' latencies."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        ttft = [s["ttft"] for r in mine for s in r["short"]]
        gaps = [g for r in mine for s in r["short"] for g in s["gaps"]]
        rows.append({"label": label, "rounds": len(mine), "short_requests": len(ttft),
                     "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
                     "itl_p50_ms": 1e3 * statistics.median(gaps),
                     "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
                     "long_ttft_s": [t for r in mine for t in r["long_ttft"]]})
    return rows


MIXED_COLUMNS = ("server", "short requests", "TTFT p50 / p99 s", "inter-token p50 / p99 ms",
                 "8k prompt, 200-message chat: TTFT s (per round)")


def _mixed_row(r: dict) -> list[str]:
    longs = r["long_ttft_s"]
    return [r["label"], str(r["short_requests"]), f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}",
            f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f}",
            "; ".join(f"{a:.1f}, {b:.1f}" for a, b in zip(longs[::2], longs[1::2]))]


def main_mixed(args: argparse.Namespace) -> None:
    servers = [item.partition("=")[::2] for item in args.mixed]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.preset)
        runs = [run_mixed(args, ckpt, label, path)
                for _ in range(args.rounds) for label, path in servers]
    rows = summarize_mixed(runs)
    lines = [header("float32", f"preset {args.preset}", f"{args.clients} clients of "
                    f"{SHORT_PROMPT}-token prompts and {args.max_tokens} tokens",
                    f"{args.rounds} rounds"), "", *table(MIXED_COLUMNS, map(_mixed_row, rows))]
    write_results(args.out, "serve_mixed", rows, lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = script_parser(__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--cache-mib", type=int, default=256)
    p.add_argument("--mixed", nargs="+", metavar="LABEL=PYTHONPATH",
                   help="the mixed scenario instead, for each server code")
    p.add_argument("--rounds", type=int, default=1, help="turns of the mixed scenario")
    args = p.parse_args(argv)
    if args.mixed:
        return main_mixed(args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.preset)
        rows = [run_context(args, ckpt, c) for c in args.contexts]
    write_results(args.out, "serve_load", rows, report(rows, args))


if __name__ == "__main__":
    main()
