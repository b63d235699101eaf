"""The Markdown report and PNG plots of a `retnet bench` results file, with the derived figures:
decode floor, ratios against the Transformer and peers, flatness, crossover, MFU, and each fast
path against the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retnet.bench import llamacpp
from retnet.bench.backends import REFERENCE
from retnet.bench.measure import BENCH_FORM

MiB = 2**20


def _ms(cell: dict, name: str, stat: str = "median_s") -> float | None:
    """Backend `name`'s time in `cell` in ms: its median, or another summary (min_s: best)."""
    r = cell["results"].get(name, {})
    return 1e3 * r[stat] if r.get("status") == "ok" and stat in r else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _state_bytes(results: dict) -> int:
    """RetNet's state bytes per sequence, from the config recorded in the results."""
    from retnet.model import RetNetConfig

    return RetNetConfig.from_dict(results["meta"]["retnet_config"]).state_bytes_per_sequence


RETNET_FORMATS = ("retnet", "retnet-bfloat16", "retnet-int8")  # float32, bf16, int8 weights


def copy_bandwidth(results: dict, cell: dict | None = None) -> float:
    """Bytes/s of the copy a floor divides by: the best copy taken beside the cell's rounds
    where the bench took them, else the run's own at its start."""
    return (cell or {}).get("copy_bytes_per_s") or results["limits"]["copy_bytes_per_s"]


def decode_floor_ms(results: dict, batch: int, context: int, name: str = "retnet") -> float:
    """(weight bytes in backend `name`'s format + 2 × float32 state bytes) / copy bandwidth:
    every weight read once (the tied table whole, as the LM head), the state read and written
    once; the bandwidth measured beside the (batch, context) cell."""
    state = batch * _state_bytes(results)
    info = results["meta"]["backends"].get(name, {})
    weights = info.get("weight_bytes") or results["meta"]["weight_bytes"]
    cell = next((c for c in results["decode"]
                 if c["batch"] == batch and c["context"] == context), None)
    return 1e3 * (weights + 2 * state) / copy_bandwidth(results, cell)


def _flatness(results: dict, batch: int, name: str, stat: str) -> float | None:
    """Step time after the longest context / after the shortest, from the bench's cell that
    interleaves the two (`bench_flatness`); None without one."""
    for cell in results.get("flatness", []):
        if cell["batch"] == batch:
            lo, hi = (_ms(cell, f"{name}@{c}", stat) for c in cell["contexts"])
            return hi / lo if hi and lo else None
    return None


def decode_compute_floor_ms(results: dict, batch: int) -> float:
    """A step's FLOPs / the measured float32 matmul peak (the kernels multiply in float32
    whatever the weight format): 2 per weight of every product (the tied head included) and
    4 per state element (decay-and-add, read-out), per sequence."""
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_dict(results["meta"]["retnet_config"])
    weights = results["meta"]["backends"]["retnet"]["non_embedding"]
    weights += config.vocab_size * config.d_model
    flops = batch * (2 * weights + 4 * _state_bytes(results) // 4)
    return 1e3 * flops / results["limits"]["matmul_flops"]


def _decode_entry(results: dict, decode: dict, batch: int, probe: int, contexts: list[int],
                  name: str) -> dict[str, Any]:
    """One format's figures at one batch: its floor, the peers' speed-ups, flatness."""
    cell = decode[(batch, probe)]
    ours = _ms(cell, name)
    entry = {"backend": name, "batch": batch, "context": probe, f"{name}_ms": ours,
             "floor_ms": decode_floor_ms(results, batch, probe, name)}
    entry["over_floor"] = ours / entry["floor_ms"] if ours else None
    # the limits are bests (a shared machine only ever slows a round): the best step beside them
    best = _ms(cell, name, "min_s")
    entry[f"{name}_best_ms"] = best
    entry["over_floor_best"] = best / entry["floor_ms"] if best else None
    entry["compute_floor_ms"] = decode_compute_floor_ms(results, batch)
    entry["over_max_floor"] = (ours / max(entry["floor_ms"], entry["compute_floor_ms"])
                               if ours else None)
    for other in ("llama-dynamic", "llama-static", "yet-another-retnet", "torchscale"):
        theirs = _ms(cell, other)
        entry[f"{other}_ms"] = theirs
        entry[f"speedup_vs_{other}"] = theirs / ours if theirs and ours else None
        entry[f"step_ratio_vs_{other}"] = ours / theirs if theirs and ours else None
    for key, stat in (("flatness", "median_s"), ("flatness_best", "min_s")):
        entry[key] = _flatness(results, batch, name, stat)
        if entry[key] is None:  # no interleaved cell: the two decode cells, minutes apart
            lo, hi = (_ms(decode[(batch, c)], name, stat) for c in (contexts[0], contexts[-1]))
            entry[key] = hi / lo if hi and lo else None
    entry["flatness_contexts"] = (contexts[0], contexts[-1])
    entry["copy_gb_per_s"] = copy_bandwidth(results, cell) / 1e9
    return entry


def _where(phase: str, cell: dict) -> str:
    """A cell's coordinates in words: "batch 8, context 2048", "T 8192", "T 2048, batch 4"."""
    if phase == "decode":
        return f"batch {cell['batch']}, context {cell['context']}"
    return f"T {cell['T']}" + (f", batch {cell['batch']}" if "batch" in cell else "")


def fast_vs_reference(results: dict) -> dict[str, Any]:
    """Each of our fast cells against the same model with every fast path off, timed round by
    round in the same cell (results named X and X + "-reference"): fast ms / reference ms of
    the medians ("ratio", the target is ≤ 1.0, issue #33) and of the bests; "worst": the cell
    of the highest ratio (None without reference cells)."""
    rows = []
    for phase in ("decode", "prefill", "train"):
        for cell in results.get(phase, []):
            for ref in [k for k in cell["results"] if k.endswith(REFERENCE)]:
                fast = ref.removesuffix(REFERENCE)
                ms, ref_ms = _ms(cell, fast), _ms(cell, ref)
                if not (ms and ref_ms):
                    continue
                best = _ms(cell, fast, "min_s") / _ms(cell, ref, "min_s")
                rows.append({"phase": phase, "backend": fast, "where": _where(phase, cell),
                             "fast_ms": ms, "reference_ms": ref_ms, "ratio": ms / ref_ms,
                             "ratio_best": best})
    return {"cells": rows, "worst": max(rows, key=lambda r: r["ratio"], default=None)}


def _reference_lines(results: dict) -> list[str]:
    """The section of each fast path against the reference: a table and the worst cell."""
    figures = fast_vs_reference(results)
    if not figures["cells"]:
        return []
    worst = figures["worst"]
    lines = ["", "## Fast paths against the reference", "",
             "Each cell of ours beside the same model with every fast path off "
             "(`retnet.kernels.set_enabled(False)`, its own model built so), interleaved "
             "round by round; ratio = fast / reference of the medians (of the bests in "
             "brackets), ≤ 1.0 is the target. Worst: "
             f"{worst['phase']} {worst['backend']}, {worst['where']}: "
             f"{_fmt(worst['ratio'])} ({_fmt(worst['ratio_best'])}).", "",
             "| cell | fast ms | reference ms | ratio |", "|---|---|---|---|"]
    for r in figures["cells"]:
        lines.append(f"| {r['phase']} {r['backend']}, {r['where']} | {_fmt(r['fast_ms'])} | "
                     f"{_fmt(r['reference_ms'])} | {_fmt(r['ratio'])} "
                     f"({_fmt(r['ratio_best'])}) |")
    return lines


def derived(results: dict) -> dict[str, Any]:
    """The figures the targets are stated in."""
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_dict(results["meta"]["retnet_config"])
    decode = {(c["batch"], c["context"]): c for c in results["decode"]}
    contexts = sorted({c for _, c in decode})
    out: dict[str, Any] = {}
    probe = 8192 if 8192 in contexts else (contexts[-1] if contexts else None)
    for batch in sorted({b for b, _ in decode}):
        if (batch, probe) not in decode:
            continue
        for name in RETNET_FORMATS:
            suffix = name.removeprefix("retnet").removeprefix("-")
            key = f"decode_batch_{batch}" + (f"_{suffix}" if suffix else "")
            if _ms(decode[(batch, probe)], name) is not None:
                out[key] = _decode_entry(results, decode, batch, probe, contexts, name)
        if f"decode_batch_{batch}" in out:
            crossover = next((c for c in contexts
                              if (_ms(decode[(batch, c)], "llama-dynamic") or 0)
                              > (_ms(decode[(batch, c)], "retnet") or float("inf"))), None)
            out[f"decode_batch_{batch}"]["crossover_context_vs_llama_dynamic"] = crossover
    for cell in results["prefill"]:
        r = {k: _ms(cell, k) for k in cell["results"]}
        ours = r.get("retnet")
        out[f"prefill_{cell['T']}"] = {k: v for k, v in r.items()} | {
            f"ratio_vs_{k}": ours / v for k, v in r.items() if v and ours and k != "retnet"}
    scaling = results.get("prefill_scaling", [])
    if len(scaling) > 1:
        (short, long) = (min(scaling, key=lambda c: c["T"]), max(scaling, key=lambda c: c["T"]))
        out[f"prefill_scaling_batch_{short['batch']}"] = {
            "ms": {c["T"]: _ms(c, "retnet") for c in scaling},
            "growth": _ms(long, "retnet") / _ms(short, "retnet"),  # time(longest) / time(shortest)
            "linear": long["T"] / short["T"]}
    limits = results["limits"]
    backends = results["meta"]["backends"]
    # 6 × parameters per token, the tied LM head counted as the matmul it is
    n_total = backends["retnet"]["non_embedding"] + config.vocab_size * config.d_model
    llama = backends.get("llama-dynamic")
    for cell in results["train"]:
        T = cell["T"]
        entry = {}
        for name, r in cell["results"].items():
            if r.get("status") != "ok" or "tokens_per_s" not in r:
                entry[name] = r.get("status")
                continue
            entry[f"{name}_tokens_per_s"] = r["tokens_per_s"]
            plain = name.removesuffix(REFERENCE)  # the reference does the same FLOPs
            base = plain.removesuffix("-bf16")
            # the matmul peak of the dtype the products ran in (bf16 autocast or float32)
            peak = limits.get("matmul_flops_bf16") if base != plain else limits["matmul_flops"]
            if base.startswith("retnet"):
                span = T if base.endswith("parallel") else BENCH_FORM.chunk_size
                flops = 6 * n_total + 3 * config.n_layers * span * (config.d_model
                                                                    + config.value_dim)
                if base.endswith("chunkwise"):
                    flops += 12 * config.n_layers * config.n_heads * config.key_head_dim * (
                        config.value_head_dim + 1)
            elif base.startswith("llama") and llama:
                # causal attention: QKᵀ and AV over T/2 keys on average, ×3 for the backward
                flops = (6 * (llama["non_embedding"] + config.vocab_size * config.d_model)
                         + 6 * llama["config"]["layers"] * T * llama["config"]["hidden_size"])
            else:
                continue
            if peak:
                entry[f"{name}_mfu"] = flops * r["tokens_per_s"] / peak
        for suffix in ("", "-bf16"):
            ref = entry.get(f"llama-sdpa{suffix}_tokens_per_s")
            for name in (f"retnet-parallel{suffix}", f"retnet-chunkwise{suffix}"):
                if ref and entry.get(f"{name}_tokens_per_s"):
                    entry[f"{name}_vs_llama"] = entry[f"{name}_tokens_per_s"] / ref
        out[f"train_{T}"] = entry
    return out | llamacpp.derived(results)


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    batches = sorted({c["batch"] for c in results["decode"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    backends = sorted({k for c in results["decode"] for k in c["results"]})
    for ax, batch in zip(axes[0], batches):
        cells = sorted((c for c in results["decode"] if c["batch"] == batch),
                       key=lambda c: c["context"])
        for name in backends:
            pts = [(c["context"], _ms(c, name)) for c in cells if _ms(c, name)]
            if pts:
                ax.plot(*zip(*pts), "o--" if name.endswith(REFERENCE) else "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
               title=f"decode, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=100)
    names.append("decode.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    contexts = sorted({c["context"] for c in results["decode"]})
    state = _state_bytes(results)
    ax.plot(contexts, [state / MiB] * len(contexts), "o-", label="RetNet state (batch 1)")
    kv = [c["results"].get("llama-dynamic", {}).get("memory_bytes") for c in results["decode"]
          if c["batch"] == batches[0]]
    if any(kv):
        ax.plot(contexts, [k / MiB if k else None for k in kv], "o-", label="Llama KV cache")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB per sequence",
           title="decode memory per sequence (float32)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    names.append("memory.png")
    plt.close(fig)
    return names


def _floor_lines(d: dict) -> list[str]:
    """The decode targets' table: each format and batch against its floors and the others."""
    entries = [e for k, e in d.items() if k.startswith("decode_batch_")]
    if not entries:
        return []
    lines = ["", f"## Decode after {entries[0]['context']} tokens against the floors", "",
             "Medians, and in brackets the best repeat (the limits are the best of several). "
             "The floor divides by the best copy taken beside the cell's rounds (GB/s "
             "column); flatness is the step after the longest context over the shortest, "
             "the two interleaved round by round.",
             "", "| format, batch | ms | copy GB/s | floor ms | × floor | compute floor ms | "
             "× max floor | × faster than llama dynamic / static | step vs "
             "yet-another-retnet / torchscale | flatness |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        name = e["backend"]
        fmt = name.removeprefix("retnet").removeprefix("-") or "float32"
        lines.append(
            f"| {fmt}, {e['batch']} | {_fmt(e[f'{name}_ms'])} ({_fmt(e[f'{name}_best_ms'])}) | "
            f"{_fmt(e['copy_gb_per_s'], 1)} | {_fmt(e['floor_ms'])} | "
            f"{_fmt(e['over_floor'])} ({_fmt(e['over_floor_best'])}) | "
            f"{_fmt(e['compute_floor_ms'])} | "
            f"{_fmt(e['over_max_floor'])} | {_fmt(e['speedup_vs_llama-dynamic'], 1)} / "
            f"{_fmt(e['speedup_vs_llama-static'], 1)} | "
            f"{_fmt(e['step_ratio_vs_yet-another-retnet'])} / "
            f"{_fmt(e['step_ratio_vs_torchscale'])} | {_fmt(e['flatness'])} "
            f"({_fmt(e['flatness_best'])}) |")
    return lines


def write_report(results: dict, out: Path) -> Path:
    """Write OUT/results.json (every raw timing), OUT/report.md and the plots; the report's
    path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    d = derived(results)
    meta, limits = results["meta"], results["limits"]
    lines = [f"# Cost benchmark: {meta['bench_config']['preset']}", "",
             f"Command: `{meta['command']}`. Machine: {meta['cpu']}, {meta['cores']} cores, "
             f"{meta['threads']} threads ({meta['backend']}); versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
             "Measured limits (the better of the run's start and end): float32 matmul "
             f"{limits['matmul_flops'] / 1e9:.0f} GFLOP/s ({limits['matmul_n']}³), bf16 "
             f"{limits['matmul_flops_bf16'] / 1e9:.1f} GFLOP/s "
             f"({limits.get('matmul_n_bf16', limits['matmul_n'])}³), copy "
             f"bandwidth {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s (buffer "
             f"{limits['copy_buffer_bytes'] / MiB:.0f} MiB). Weights: "
             f"{meta['weight_bytes'] / MiB:.0f} MiB float32. Allocator: "
             f"{meta.get('allocator', 'glibc malloc defaults')}.", ""]
    for name, info in meta["backends"].items():
        lines.append(f"- `{name}`: {info['non_embedding']:,} non-embedding parameters, "
                     f"{info['config']}" + (f"; {info['process']}" if "process" in info else ""))
    for name, why in meta["skipped"].items():
        lines.append(f"- skipped `{name}`: {why}")
    backends = sorted({k for c in results["decode"] for k in c["results"]})
    lines += ["", "## Decode: ms per step (one token per sequence, LM head and greedy choice)",
              "", "| batch | context | " + " | ".join(backends) + " |",
              "|---|---|" + "---|" * len(backends)]
    for c in results["decode"]:
        cells = []
        for b in backends:
            r = c["results"].get(b, {})
            cells.append(_fmt(_ms(c, b)) + (f" ({1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f})"
                                            if _ms(c, b) else " " + r.get("status", "")))
        lines.append(f"| {c['batch']} | {c['context']} | " + " | ".join(cells) + " |")
    lines += _floor_lines(d)
    prefill_names = sorted(results["prefill"][0]["results"]) if results["prefill"] else []
    lines += ["", "## Prefill: seconds to read T tokens (state/cache and last logits only)", "",
              "| T | " + " | ".join(prefill_names) + " |", "|---|" + "---|" * len(prefill_names)]
    for c in results["prefill"]:
        lines.append(f"| {c['T']} | " + " | ".join(
            _fmt(c["results"][k].get("median_s"), 3) for k in sorted(c["results"])) + " |")
    if results.get("prefill_scaling"):
        lines += ["", "Ours (float32) at batch "
                  f"{results['prefill_scaling'][0]['batch']}: "
                  + ", ".join(f"T = {c['T']} {_fmt(c['results']['retnet']['median_s'], 3)} s"
                              for c in results["prefill_scaling"])]
    lines += llamacpp.report_lines(results)
    lines += ["", "## Training: forward+backward tokens/s (peak MiB above the process)", "",
              "| T | batch | backend | tokens/s | peak MiB |", "|---|---|---|---|---|"]
    for c in results["train"]:
        for name, r in sorted(c["results"].items()):
            lines.append(f"| {c['T']} | {c['batch']} | {name} | "
                         f"{_fmt(r.get('tokens_per_s'), 0) if r['status'] == 'ok' else r['status']}"
                         f" | {_fmt(r.get('peak_mib'), 0)} |")
    lines += _reference_lines(results)
    lines += ["", "## Derived figures", "", "```", *(f"{k}: {v}" for k, v in d.items()), "```"]
    plots = _plots(results, out) if results["decode"] else []
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
