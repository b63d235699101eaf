"""microsoft/torchscale's RetNetDecoder measured like `retnet bench` measures its backends.

A standalone script (it imports torch and torchscale only, never retnet): torchscale needs
timm, hence torchvision, which does not import beside the project's CPU torch, so it runs
under another interpreter, e.g. one made with

    python3 -m venv /tmp/venv-ts
    /tmp/venv-ts/bin/pip install torch==2.14.1 torchvision==0.29.1 torchscale==0.3.0

and `retnet bench --torchscale-python /tmp/venv-ts/bin/python` starts it with a JSON job as
its only argument and reads one JSON object from its stdout. Progress goes to stderr.

What is timed, per torchscale's own API:
- decode: `model(tokens[:, :context+1], incremental_state)`, whose recurrent form embeds only
  the last token and rotates it by the sequence length; the incremental state is filled with
  random values of the right shapes ([B, H, V_head, K] per layer plus the running scale).
- prefill: its chunkwise forward (the job's chunk size, the benchmark's own) with the LM head on
  the last position only; it returns no state (torchscale's chunkwise form cannot hand one over).
- training: forward + backward of the parallel and the chunkwise forms.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path


# This process cannot import retnet (see above), so it keeps tiny copies of what
# retnet.memory (rss_mib, trim, reset_peak) and retnet.bench.measure (summary, timed) do.
def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _summary(times: list[float]) -> dict:
    return {"status": "ok", "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "raw_s": times}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(job: dict):
    import torch
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder

    torch.manual_seed(0)
    arch = dict(decoder_embed_dim=job["d_model"], decoder_value_embed_dim=job["value_dim"],
                decoder_retention_heads=job["n_heads"], decoder_ffn_embed_dim=job["ffn_dim"],
                decoder_layers=job["n_layers"], vocab_size=job["vocab_size"],
                share_decoder_input_output_embed=True, dropout=0.0, activation_dropout=0.0,
                recurrent_chunk_size=job["chunk_size"])
    embed = torch.nn.Embedding(job["vocab_size"], job["d_model"])
    model = RetNetDecoder(RetNetConfig(**arch), embed_tokens=embed).eval()
    skip = {id(model.embed_tokens.weight), id(model.output_projection.weight)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return model, arch, non_embedding


def decode(model, job: dict) -> list[dict]:
    import torch

    H, D = job["n_heads"], job["d_model"]
    K, V = D // H, job["value_dim"] // H
    rows = []
    for batch in job["batches"]:
        for context in job["contexts"]:
            state_bytes = batch * job["n_layers"] * H * V * K * 4
            if state_bytes > job["kv_limit"]:
                rows.append({"batch": batch, "context": context,
                             "result": {"status": "skipped: state over the limit"}})
                continue
            state = {i: {"prev_key_value": torch.randn(batch, H, V, K) * 1e-2,
                         "scale": torch.full((H,), float(min(context, 512)))}
                     for i in range(job["n_layers"])}
            tokens = torch.randint(0, job["vocab_size"], (batch, context + 1))

            def step(tokens=tokens, state=state) -> None:
                logits, _ = model(tokens, incremental_state=state)
                logits[:, -1].argmax(-1)

            with torch.no_grad():
                gc.collect()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                before = _rss_mib()
                for _ in range(2):
                    step()
                times = [_timed(lambda: [step() for _ in range(4)]) / 4
                         for _ in range(job["repeats"])]
            rows.append({"batch": batch, "context": context, "result": {
                **_summary(times), "memory_bytes": state_bytes,
                "rss_delta_mib": _rss_mib() - before}})
            print(f"torchscale decode b{batch} c{context}: {1e3 * statistics.median(times):.1f} ms",
                  file=sys.stderr)
    return rows


def prefill(model, job: dict) -> list[dict]:
    import torch

    rows = []
    for length in job["prefill_lengths"]:
        ids = torch.randint(0, job["vocab_size"], (1, length))
        model.chunkwise_recurrent = True

        def run(ids=ids) -> None:
            with torch.no_grad():
                x, _ = model(ids, features_only=True)
                model.output_layer(x[:, -1:])

        times = []
        for _ in range(max(1, job["repeats"] // 2)):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            times.append(_timed(run))
        model.chunkwise_recurrent = False
        gc.collect()
        rows.append({"T": length, "result": _summary(times)})
        print(f"torchscale prefill {length}: {statistics.median(times):.2f} s", file=sys.stderr)
    return rows


def train(model, job: dict) -> list[dict]:
    import torch
    import torch.nn.functional as F

    rows = []
    for length in job["train_lengths"]:
        batch = max(1, job["train_tokens"] // length)
        ids = torch.randint(0, job["vocab_size"], (batch, length + 1))
        results = {}
        for mode in ("parallel", "chunkwise"):
            model.chunkwise_recurrent = mode == "chunkwise"
            model.train()

            def step(ids=ids) -> None:
                logits, _ = model(ids[:, :-1])
                F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
                model.zero_grad(set_to_none=True)

            times, peak = [], 0.0
            try:
                for r in range(max(1, job["repeats"] // 2) + 1):  # round 0 is the warm-up
                    gc.collect()
                    ctypes.CDLL("libc.so.6").malloc_trim(0)
                    Path("/proc/self/clear_refs").write_text("5")
                    base = _rss_mib()
                    took = _timed(step)
                    peak = max(peak, _rss_mib("VmHWM") - base)
                    if r:
                        times.append(took)
                results[f"torchscale-{mode}"] = {**_summary(times), "peak_mib": peak,
                                                 "tokens_per_s": batch * length /
                                                 statistics.median(times)}
            except (RuntimeError, MemoryError) as err:
                results[f"torchscale-{mode}"] = {"status": "out of memory",
                                                 "error": str(err).splitlines()[0][:200]}
            print(f"torchscale train {mode} T={length}: "
                  f"{results[f'torchscale-{mode}'].get('tokens_per_s', 0):.0f} tokens/s",
                  file=sys.stderr)
        model.chunkwise_recurrent = False
        model.eval()
        rows.append({"T": length, "batch": batch, "results": results})
    return rows


def _thresholds(job: dict, mmap: int, trim: int) -> None:
    """The allocator as in the benchmark's own process (retnet.memory), phase by phase."""
    if job.get("keep_freed_memory"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim)  # M_TRIM_THRESHOLD


def main() -> None:
    import resource

    import torch
    import torchscale

    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    cap = int(job["memory_cap_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    model, arch, non_embedding = build(job)
    out = {"versions": {"torch": torch.__version__,
                        "torchscale": getattr(torchscale, "__version__", "0.3.0"),
                        "python": sys.version.split()[0]},
           "config": arch, "non_embedding": non_embedding, "threads": torch.get_num_threads()}
    _thresholds(job, 32 << 20, 64 << 20)
    out["decode"] = decode(model, job)
    _thresholds(job, 1 << 30, 2 << 30)
    out["prefill"] = prefill(model, job)
    out["train"] = train(model, job)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
