"""The study's statistics, from finished records only: the learning-rate sweep's choice, power-law
fits of validation loss against non-embedding parameters and training FLOPs with bootstrap
intervals over seeds, the point where two families' fits cross, and differences of ablations
from the base model with their spread.

A fit is log L = a + b·log x by least squares over every seed's point. Its interval comes from
B bootstrap refits, each drawing, at every size, as many seeds as the size has, with
replacement (a size with one seed contributes its one point: it has no spread to resample)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Fit:
    """L(x) = exp(a) · x^b, with the bootstrap's (low, high) interval of b and its draws."""

    a: float
    b: float
    b_low: float
    b_high: float
    sizes: int
    points: int
    draws: np.ndarray  # [BOOTSTRAP, 2]: (a, b) of each bootstrap refit

    def at(self, x: float) -> float:
        return math.exp(self.a + self.b * math.log(x))


def _line(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    b, a = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(a), float(b)


def fit(points: dict[Any, list[tuple[float, float]]], seed: int = 0) -> Fit | None:
    """points: size -> [(x, loss) per seed]; None with fewer than two sizes."""
    if len(points) < 2:
        return None
    groups = [np.array(v, dtype=float) for v in points.values()]
    every = np.concatenate(groups)
    a, b = _line(every[:, 0], every[:, 1])
    rng = np.random.default_rng(seed)
    draws = np.empty((BOOTSTRAP, 2))
    for i in range(BOOTSTRAP):
        sample = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        draws[i] = _line(sample[:, 0], sample[:, 1])
    low, high = np.quantile(draws[:, 1], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Fit(a, b, float(low), float(high), len(groups), len(every), draws)


def crossing(first: Fit, second: Fit) -> dict[str, Any] | None:
    """Where `first`'s fitted line crosses `second`'s, in log x (log x* = (a2 − a1)/(b1 − b2),
    kept in logs: x* itself overflows a float where the slopes nearly agree). The interval is
    over the bootstrap draws whose slopes are ordered as the fits' are (in the others the
    better side flips), `share` the fraction of such draws; None for parallel fits."""
    if first.b == second.b:
        return None
    log_x = (second.a - first.a) / (first.b - second.b)
    same = np.sign(first.draws[:, 1] - second.draws[:, 1]) == np.sign(first.b - second.b)
    f, s = first.draws[same], second.draws[same]
    logs = (s[:, 0] - f[:, 0]) / (f[:, 1] - s[:, 1])
    low, high = np.quantile(logs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) if len(logs) else (
        math.nan, math.nan)
    # first's slope steeper (more negative) means its loss is the lower one above x*
    return {"log10_x": log_x / math.log(10), "log10_low": float(low) / math.log(10),
            "log10_high": float(high) / math.log(10), "first_better_above": first.b < second.b,
            "share": float(same.mean())}


def family_points(records: list[dict[str, Any]], arch: str, variant: str, lr: float,
                  x_key: str) -> dict[str, list[tuple[float, float]]]:
    """size -> [(x, val loss)] of the finished cells of one family and rate; x_key
    "non_embedding" or "flops_6nd"."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if (r.get("status") == "done" and r.get("task", "lm") == "lm" and r["arch"] == arch
                and r["variant"] == variant and r["lr"] == lr):
            out.setdefault(r["size"], []).append((float(r[x_key]), float(r["val_loss"])))
    return out


def sweep(records: list[dict[str, Any]], size: str) -> dict[str, dict[str, Any]]:
    """arch -> {"losses": {lr: val loss}, "best": lr, "edge": best is the largest or smallest
    rate tried} over the seed-0 base cells at `size`."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if (r.get("status") == "done" and r.get("task", "lm") == "lm" and r["size"] == size
                and r["variant"] == "base" and r["seed"] == 0):
            out.setdefault(r["arch"], {"losses": {}})["losses"][r["lr"]] = r["val_loss"]
    for v in out.values():
        lrs = sorted(v["losses"])
        v["best"] = min(lrs, key=v["losses"].get)
        v["edge"] = len(lrs) > 1 and v["best"] in (lrs[0], lrs[-1])
    return out


def difference(variant: list[float], base: list[float]) -> dict[str, float]:
    """Mean of variant − mean of base, with the standard error of that difference (the two
    groups' seed variances; 0 where a group has one seed) and each group's sd."""
    def var(xs):
        return statistics.variance(xs) if len(xs) > 1 else 0.0

    se = math.sqrt(var(variant) / len(variant) + var(base) / len(base))
    return {"diff": statistics.mean(variant) - statistics.mean(base), "se": se,
            "sd": math.sqrt(var(variant)), "n": len(variant)}
