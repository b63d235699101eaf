"""Load test of `retnet serve`: N concurrent streaming clients, a fixed number of requests,
prompts of each context length; throughput, time to first token, inter-token latency and the
server's memory. The server runs as a real subprocess on 127.0.0.1 (random `small` weights
and the byte tokenizer: the cost does not depend on the values).

    python benchmarks/serve_load.py [--contexts 512 8192] [--clients 8] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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


async def one_request(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: time to its first token, the gaps between tokens, tokens."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    async with httpx.AsyncClient(timeout=600) as c, c.stream(
            "POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] - start, "gaps": gaps, "tokens": len(stamps)}


async def load(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(clients)

    async def limited(p):
        async with sem:
            return await one_request(url, p, max_tokens)

    return await asyncio.gather(*(limited(p) for p in prompts))


def start_server(args: argparse.Namespace, ckpt: Path, context: int) -> tuple[subprocess.Popen,
                                                                              str]:
    """`retnet serve` on a free port, once its /health answers; the process and its URL."""
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "retnet", "serve", "--checkpoint", str(ckpt), "--port",
         str(port), "--max-prompt-tokens", str(max(context, 512)), "--max-batch",
         str(args.clients), "--cache-mib", str(args.cache_mib), "--model-name", "bench"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def main(argv: Sequence[str] | None = None) -> None:
    p = script_parser(__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--cache-mib", type=int, default=256)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), args.preset)
        rows = [run_context(args, ckpt, c) for c in args.contexts]
    write_results(args.out, "serve_load", rows, report(rows, args))


if __name__ == "__main__":
    main()
