"""The report's readings of the records (report.py writes them): the learning-rate sweep, the
scaling fits and their crossing, the ablations against the base model, MQAR recall, loss by
position beyond the training length, and 0/k-shot accuracy. Each returns markdown lines; the
plots take the same numbers (plots.py)."""

from __future__ import annotations

import statistics
from typing import Any

from retnet.study import analysis
from retnet.study.grid import BASE, Grid

FAMILIES = ("retnet", "llama", "mamba", "mamba2", "rwkv", "linear")


def _done(records: list[dict[str, Any]], task: str = "lm") -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "done" and r.get("task", "lm") == task]


def sweep_section(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    # the sweep: the smallest size at which some family ran several rates
    rates: dict[tuple, set] = {}
    for r in _done(records):
        rates.setdefault((r["size"], r["arch"]), set()).add(r["lr"])
    swept = {size for (size, _), lrs in rates.items() if len(lrs) > 1 and size in grid.sizes}
    if not swept:
        return ["No sweep cells recorded yet."]
    smallest = min(swept, key=lambda k: grid.sizes[k].d_model ** 2 * grid.sizes[k].n_layers)
    found = analysis.sweep(_done(records), smallest)
    rates = sorted({lr for v in found.values() for lr in v["losses"]})
    lines = [f"Seed 0, size {smallest}; validation loss per peak rate (bold: the lowest). "
             "The grid's other blocks train each family at the rate in the last column.", "",
             "| arch | " + " | ".join(f"{lr:g}" for lr in rates) + " | lowest | used |",
             "|---|" + "---|" * (len(rates) + 2)]
    for arch, v in found.items():
        cells = [(f"**{v['losses'][lr]:.4f}**" if lr == v["best"] else f"{v['losses'][lr]:.4f}")
                 if lr in v["losses"] else "" for lr in rates]
        edge = " (edge of the sweep)" if v["edge"] else ""
        lines.append(f"| {arch} | {' | '.join(cells)} | {v['best']:g}{edge} | "
                     f"{grid.lr_of(arch):g} |")
    return lines + _rate_checks(grid, records, swept - {smallest})


def _rate_checks(grid: Grid, records: list[dict[str, Any]], sizes: set[str]) -> list[str]:
    """Larger sizes where a family also ran another rate (seed 0): does the sweep's choice
    still hold there?"""
    lines = []
    for size in sorted(sizes, key=list(grid.sizes).index):
        for arch, v in analysis.sweep(_done(records), size).items():
            if len(v["losses"]) > 1:
                tried = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in sorted(v["losses"].items()))
                lines.append(f"- At {size}, {arch} (seed 0): {tried}; lowest {v['best']:g}, "
                             f"the grid uses {grid.lr_of(arch):g}.")
    return ["", *lines] if lines else []


def fits(grid: Grid, records: list[dict[str, Any]], x_key: str) -> dict[str, analysis.Fit]:
    """family -> its fit at the family's rate (base variant), where ≥ 2 sizes are done."""
    out = {}
    for arch in FAMILIES:
        found = analysis.fit(analysis.family_points(_done(records), arch, BASE,
                                                    grid.lr_of(arch), x_key))
        if found is not None:
            out[arch] = found
    return out


def scaling_section(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for x_key, what, short in (("non_embedding", "non-embedding parameters N", "N"),
                               ("flops_6nd", "training FLOPs C = 6·N·tokens", "C")):
        found = fits(grid, records, x_key)
        lines += [f"Fit of validation loss L against {what}: L = A·x^b, least squares in "
                  f"log-log over every seed's point; b's {analysis.LEVEL:.0%} interval from "
                  f"{analysis.BOOTSTRAP} bootstrap refits over seeds.", "",
                  "| family | sizes | points | b | interval of b |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {f.sizes} | {f.points} | {f.b:.4f} | {f.b_low:.4f} … "
                  f"{f.b_high:.4f} |" for k, f in found.items()] or ["| (none yet) | | | | |"]
        lines += ["", _crossing_line(found, short), ""]
    return lines


def _crossing_line(found: dict[str, analysis.Fit], x: str) -> str:
    if "retnet" not in found or "llama" not in found:
        return "Crossing of RetNet and Llama: needs both at two sizes or more."
    c = analysis.crossing(found["retnet"], found["llama"])
    if c is None:
        return "RetNet's and Llama's fits have the same slope: no crossing."
    side = "above" if c["first_better_above"] else "below"
    return (f"RetNet's and Llama's fitted lines cross at {x} ≈ 10^{c['log10_x']:.2f} "
            f"(10^{c['log10_low']:.2f} … 10^{c['log10_high']:.2f} over the {c['share']:.0%} of "
            f"bootstrap draws whose slopes are ordered the same way); RetNet's fit is the lower "
            f"one {side} it. An extrapolation far outside the sizes run is a statement about "
            "two fitted lines, not about models.")


def ablation_section(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict]]:
    """Variants of RetNet at the size the ablations ran, against base at that size and rate."""
    done = [r for r in _done(records) if r["arch"] == "retnet"]
    variants = {r["variant"] for r in done} - {BASE}
    if not variants:
        return ["No ablation cells recorded yet."], {}
    size = next(r["size"] for r in done if r["variant"] != BASE)
    lr = next(r["lr"] for r in done if r["variant"] != BASE)
    by = {}
    for r in done:
        if r["size"] == size and r["lr"] == lr:
            by.setdefault(r["variant"], []).append(r["val_loss"])
    if BASE not in by:
        return [f"Ablations at {size}: the base model's cells are not recorded yet."], {}
    rows = {v: analysis.difference(by[v], by[BASE]) for v in sorted(by) if v != BASE}
    lines = [f"Size {size}, rate {lr:g}; difference of the mean validation loss from the base "
             f"model's ({statistics.mean(by[BASE]):.4f} over {len(by[BASE])} seeds), ± its "
             "standard error; positive: the ablation hurts.", "",
             "| variant | seeds | mean loss | sd | difference ± se |", "|---|---|---|---|---|"]
    for v, d in rows.items():
        lines.append(f"| {v} | {d['n']} | {statistics.mean(by[v]):.4f} | {d['sd']:.4f} | "
                     f"{d['diff']:+.4f} ± {d['se']:.4f} |")
    return lines, rows


def recall_section(records: list[dict[str, Any]]) -> tuple[list[str], dict[tuple, dict]]:
    """MQAR accuracy by architecture and width, mean over seeds, one column per pair count."""
    table: dict[tuple, list[dict]] = {}
    for r in _done(records, "mqar"):
        table.setdefault((r["arch"], r["d_model"]), []).append(r["recall_accuracy"])
    if not table:
        return ["No MQAR cells recorded yet."], {}
    pairs = sorted({int(n) for accs in table.values() for a in accs for n in a})
    mean = {k: {n: statistics.mean(a[str(n)] for a in accs if str(n) in a) for n in pairs
                if any(str(n) in a for a in accs)} for k, accs in table.items()}
    lines = ["Fraction of values recalled on fresh rows (chance ≈ 1/values), mean over seeds.",
             "", "| arch | width | " + " | ".join(f"{n} pairs" for n in pairs) + " |",
             "|---|---|" + "---|" * len(pairs)]
    for (arch, width), accs in sorted(mean.items()):
        lines.append(f"| {arch} | {width} | " + " | ".join(
            f"{accs[n]:.3f}" if n in accs else "" for n in pairs) + " |")
    return lines, mean


def position_section(grid: Grid, records: list[dict[str, Any]]) -> tuple[list[str], dict]:
    """Loss in each training-length bucket of windows 8× longer, per family at the largest
    size where every family with such records has one; mean over seeds."""
    done = [r for r in _done(records) if r.get("loss_by_position") and r["variant"] == BASE
            and r["lr"] == grid.lr_of(r["arch"])]
    if not done:
        return ["No cell with loss by position recorded yet."], {}
    archs = {r["arch"] for r in done}
    sizes = [s for s in grid.sizes if {r["arch"] for r in done if r["size"] == s} == archs]
    size = sizes[-1] if sizes else max(done, key=lambda r: r["non_embedding"])["size"]
    curves = {}
    for arch in sorted(archs):
        rows = [r["loss_by_position"] for r in done if (r["arch"], r["size"]) == (arch, size)]
        if rows:
            curves[arch] = [statistics.mean(col) for col in zip(*rows)]
    n = len(next(iter(curves.values())))
    lines = [f"Size {size}; validation windows {n}× the training length, mean loss in each "
             "span of one training length (span 1 is what training saw).", "",
             "| arch | " + " | ".join(str(i + 1) for i in range(n)) + " |",
             "|---|" + "---|" * n]
    lines += [f"| {a} | " + " | ".join(f"{x:.3f}" for x in c) + " |" for a, c in curves.items()]
    return lines, {"size": size, "curves": curves}


def shots_section(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    done = [r for r in _done(records) if r.get("few_shot") and r["variant"] == BASE
            and r["lr"] == grid.lr_of(r["arch"])]
    if not done:
        return ["No cell with few-shot accuracy recorded yet."]
    tasks = sorted(done[0]["few_shot"])
    shots = sorted(done[0]["few_shot"][tasks[0]], key=int)
    head = [f"{t} {k}-shot" for t in tasks for k in shots]
    lines = ["Accuracy through lm-eval (`num_fewshot`), mean over seeds; 30 four-way items, "
             "so one item is 0.033.", "", "| arch | size | seeds | " + " | ".join(head) + " |",
             "|---|---|---|" + "---|" * len(head)]
    keys = sorted({(r["arch"], r["size"]) for r in done}, key=lambda k: (k[0], k[1]))
    for arch, size in keys:
        rs = [r for r in done if (r["arch"], r["size"]) == (arch, size)]
        vals = [statistics.mean(r["few_shot"][t][k] for r in rs) for t in tasks for k in shots]
        lines.append(f"| {arch} | {size} | {len(rs)} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + " |")
    return lines


def cost_section(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    """Training tokens/s and peak memory of every architecture at each size (base variant, its
    rate), mean over seeds, and each against RetNet's at the same size: the cells of one
    process read the same batches, so the ratios compare architectures, not machines."""
    done = [r for r in _done(records) if r["variant"] == BASE
            and r["lr"] == grid.lr_of(r["arch"])]
    cells: dict[tuple, list[dict]] = {}
    for r in done:
        cells.setdefault((r["size"], r["arch"]), []).append(r)
    if not cells:
        return ["No finished cell at its family's rate yet."]
    lines = ["Tokens/s at each cell's median step (cells recorded before step times were kept: "
             "over the whole run), mean over seeds; ratios against RetNet of the same size "
             "(tokens/s: > 1 is faster than RetNet; memory: < 1 is less).", "",
             "| size | arch | tokens/s | × RetNet | peak MiB | × RetNet |",
             "|---|---|---|---|---|---|"]
    for size in grid.sizes:
        ref = cells.get((size, "retnet"))
        for arch in FAMILIES:
            rs = cells.get((size, arch))
            if not rs:
                continue
            speed = statistics.mean(map(rate, rs))
            peak = max(r["peak_mib"] for r in rs)
            if ref:
                ref_speed = statistics.mean(map(rate, ref))
                ref_peak = max(r["peak_mib"] for r in ref)
                memory = f"{peak / ref_peak:.2f}" if ref_peak else ""
                ratios = f"{speed / ref_speed:.2f} | {peak:,.0f} | {memory}"
            else:
                ratios = f" | {peak:,.0f} | "
            lines.append(f"| {size} | {arch} | {speed:,.0f} | {ratios} |")
    return lines


def rate(r: dict[str, Any]) -> float:
    """Tokens/s at the median step where recorded, else over the whole run."""
    return r.get("tokens_per_s_median_step") or r["tokens_per_s"]
