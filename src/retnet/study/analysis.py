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
    """Where `first`'s fitted loss falls below `second`'s (x*, with the bootstrap interval of
    the draws whose lines cross, and the fraction of draws that cross at all)."""
    def point(a1, b1, a2, b2):
        return math.exp((a2 - a1) / (b1 - b2)) if b1 != b2 else math.inf

    x = point(first.a, first.b, second.a, second.b)
    cross = [point(*f, *s) for f, s in zip(first.draws, second.draws) if f[1] != s[1]]
    cross = [c for c in cross if math.isfinite(c) and c > 0]
    if not cross:
        return None
    low, high = np.quantile(np.log(cross), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    # the side each family is better on: first's slope steeper means it wins above x
    return {"x": x, "low": math.exp(low), "high": math.exp(high),
            "first_better_above": first.b < second.b, "share": len(cross) / len(first.draws)}


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
