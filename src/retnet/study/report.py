"""The report of a study, regenerated from whatever records exist (no models, no training):
report.md with every cell, the mean and spread over seeds of each (architecture, size,
variant, learning rate), the training cost per architecture and size, the cells that did not
finish with their reasons; loss_vs_params.png and throughput.png."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from retnet.files import atomic_write_text
from retnet.study import store
from retnet.study.grid import BASE, Grid
from retnet.study.sections import rate


def groups(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Finished records by (arch, size, variant, lr), in the order they first appear."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "done":
            out.setdefault((r["arch"], r["size"], r["variant"], r["lr"]), []).append(r)
    return out


def summary(rs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, standard deviation (0 for one seed) and range of the validation loss over seeds;
    mean throughput, largest peak memory, mean training minutes."""
    losses = [r["val_loss"] for r in rs]
    return {"n": len(rs), "val_loss": statistics.mean(losses),
            "sd": statistics.stdev(losses) if len(rs) > 1 else 0.0,
            "min": min(losses), "max": max(losses),
            "tokens_per_s": statistics.mean(map(rate, rs)),
            "peak_mib": max(r["peak_mib"] for r in rs),
            "minutes": statistics.mean(r["train_seconds"] for r in rs) / 60,
            "non_embedding": rs[0]["non_embedding"],
            "flops": statistics.mean(r["flops_6nd"] for r in rs)}


def _cell_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| cell | status | non-embedding params (vs RetNet) | steps | tokens | val loss | "
             "tokens/s | peak MiB | train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("non_embedding") is None:
            lines.append(f"| {r['id']} | {r['status']} | | | | | | | |")
            continue
        loss = "" if r.get("val_loss") is None else f"{r['val_loss']:.4f}"
        speed = "" if not r.get("tokens_per_s") else f"{rate(r):,.0f}"
        off = r["non_embedding"] / r["target_non_embedding"] - 1
        lines.append(f"| {r['id']} | {r['status']} | {r['non_embedding']:,} ({off:+.2%}) | "
                     f"{r['steps']:,} | {r['tokens']:,} | {loss} | {speed} | "
                     f"{r['peak_mib']:.0f} | {r['train_seconds'] / 60:.1f} |")
    return lines


def _summary_table(table: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    lines = ["| arch | size | variant | lr | seeds | non-embedding params | val loss (sd; "
             "min–max) | tokens/s | peak MiB | train min per cell |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, size, variant, lr), rs in table.items():
        s = summary(rs)
        lines.append(f"| {arch} | {size} | {variant} | {lr:g} | {s['n']} | "
                     f"{s['non_embedding']:,} | {s['val_loss']:.4f} ({s['sd']:.4f}; "
                     f"{s['min']:.4f}–{s['max']:.4f}) | {s['tokens_per_s']:,.0f} | "
                     f"{s['peak_mib']:.0f} | {s['minutes']:.2f} |")
    return lines


def _not_done(records: list[dict[str, Any]]) -> list[str]:
    rest = [r for r in records if r.get("status") != "done"]
    if not rest:
        return ["Every recorded cell finished."]
    return ["| cell | status | reason |", "|---|---|---|",
            *(f"| {r['id']} | {r['status']} | {r.get('reason', '')} |" for r in rest)]


def _same_batches(records: list[dict[str, Any]]) -> str:
    """Whether the cells of one seed and step count read byte-identical batches."""
    seen: dict[tuple, set[str]] = {}
    for r in records:
        if r.get("status") == "done":
            key = (r.get("task", "lm"), r["seed"], r["steps"])
            seen.setdefault(key, set()).add(r["batches_sha256"])
    same = all(len(v) == 1 for v in seen.values())
    return (f"Cells of the same seed and step count read byte-identical batches: {same} "
            f"({len(seen)} groups; a sha256 chain over every batch).")


def _header(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    b = grid.budget
    machines = {(m["cpu"] + (f" ({m['isa']})" if m.get("isa") else ""), m["cores"],
                 m["threads"], m["device"], m["torch"], m["transformers"])
                for r in records if (m := r.get("machine"))}
    lines = [f"# Study `{grid.name}`", "",
             f"{len(records)} of {len(grid.cells())} cells recorded. Budget: batch "
             f"{b.batch_size} × {b.seq_len} tokens, {b.tokens_per_param:g} training tokens "
             f"per non-embedding parameter of the size's RetNet (at least {b.min_steps} steps), "
             f"AdamW with {b.warmup_frac:.0%} warm-up and cosine decay, {b.tokenizer} "
             f"tokenizer{'' if b.tokenizer == 'byte' else f' of {b.vocab_size}'}, validation "
             f"on {b.eval_batches} fixed batches.", ""]
    for cpu, cores, threads, device, torch_v, hf in sorted(machines, key=str):
        lines.append(f"- machine: {device}, {cpu}, {cores} cores, {threads} threads per cell; "
                     f"torch {torch_v}, transformers {hf}")
    return lines


def write_report(out: Path, grid: Grid) -> Path:
    """report.md and the plots in `out`, from cells.jsonl (cells in grid order, then any
    recorded cell the grid no longer names)."""
    found = store.records(out)
    order = [c.id for c in grid.cells()]
    records = ([found[i] for i in order if i in found]
               + [r for i, r in found.items() if i not in set(order)])
    table = groups([r for r in records if r.get("task", "lm") == "lm"])
    lines = [*_header(grid, records), "", "## Mean over seeds", "", *_summary_table(table),
             "", *_readings(grid, records, table, out),
             "## Cells that did not finish", "", *_not_done(records), "",
             _same_batches(records), "", "## Every cell", "", *_cell_table(records), ""]
    path = Path(out) / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _readings(grid: Grid, records: list[dict[str, Any]], table: dict, out: Path) -> list[str]:
    """The sections that read the records (sections.py), each with its plot."""
    from retnet.study import plots, sections

    lines = ["## Learning rate", "", *sections.sweep_section(grid, records), "",
             "## Scaling", "", *sections.scaling_section(grid, records)]
    chosen = {k: v for k, v in table.items() if k[3] == grid.lr_of(k[0])}
    if chosen:
        names = plots.plot_all(base_families(chosen), out,
                               sections.fits(grid, records, "non_embedding"),
                               sections.fits(grid, records, "flops_6nd"))
        lines += [f"![{name}]({name}.png)" for name in names] + [""]
    ablations, rows = sections.ablation_section(records)
    lines += ["## Ablations", "", *ablations, ""]
    if rows:
        lines += [f"![ablations]({plots.plot_ablations(rows, out)}.png)", ""]
    recall, mean = sections.recall_section(records)
    lines += ["## Recall (MQAR)", "", *recall, ""]
    if mean:
        lines += [f"![mqar]({plots.plot_recall(mean, out)}.png)", ""]
    positions, found = sections.position_section(grid, records)
    lines += ["## Loss by position", "", *positions, ""]
    if found:
        lines += [f"![loss_by_position]({plots.plot_positions(found, out)}.png)", ""]
    return [*lines, "## Zero- and few-shot", "", *sections.shots_section(grid, records), "",
            "## Training cost", "", *sections.cost_section(grid, records), ""]


def base_families(table: dict[tuple, list[dict[str, Any]]]) -> dict[str, list[tuple]]:
    """arch (or arch-variant) -> its (non-embedding params, summary) points, by size (pass
    one learning rate per family: the plots draw one line each)."""
    fam: dict[str, list[tuple]] = {}
    for (arch, _size, variant, _lr), rs in table.items():
        name = arch if variant == BASE else f"{arch}-{variant}"
        fam.setdefault(name, []).append((rs[0]["non_embedding"], summary(rs)))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in fam.items()}
