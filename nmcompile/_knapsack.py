"""Latency-constrained channel selection: a multiple-choice knapsack solved by dynamic programming.

Each group (a channel space) offers options ``k = 0..K``: keep its ``k`` most important channels
(channels inside a group are always kept in importance order, as in HALP), for value
``sum(top-k importances)`` and cost ``cost[k]`` (its measured latency with ``k`` channels). The
solver picks one option per group maximising the total value with total cost within the budget.
Costs are scaled to integers (``resolution`` units for the whole budget) and the DP runs over
groups x budget units; ties keep more channels. A non-finite cost forbids its option.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["choose_channels", "knapsack"]


def knapsack(
    values: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    *,
    resolution: int = 2000,
    minimum: Sequence[int] | None = None,
) -> list[int] | None:
    """Pick one option per group: ``values[g][k]`` / ``costs[g][k]`` for option ``k``.

    Returns the chosen option index per group, or None when even the cheapest allowed choice
    exceeds the budget. ``minimum[g]``: smallest option allowed for group ``g``.
    """
    n = len(values)
    if n == 0:
        return []
    scale = resolution / budget if budget > 0 else 0.0
    # Round costs up so the integer solution never exceeds the real budget. A negative cost
    # (measured latency that drops when channels are added: tile alignment, or noise; HALP's
    # "negative latency contribution") counts as free, which can only overestimate the total.
    cap = resolution
    # a non-finite cost marks an option that may not be chosen (a channel count off the grid)
    icost = []
    for c in costs:
        c = np.asarray(c, dtype=np.float64)
        ok = np.isfinite(c)
        scaled = np.maximum(np.ceil(np.where(ok, c, 0.0) * scale - 1e-9), 0)
        icost.append(np.where(ok, np.minimum(scaled, cap + 1), cap + 1).astype(np.int64))
    neg = -np.inf
    best = np.full(cap + 1, neg)
    best[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int64)
    for g in range(n):
        lo = minimum[g] if minimum is not None else 0
        new = np.full(cap + 1, neg)
        pick = np.zeros(cap + 1, dtype=np.int64)
        vals = np.asarray(values[g], dtype=np.float64)
        for k in range(lo, len(vals)):
            c = int(icost[g][k])
            if c > cap:
                continue
            cand = np.full(cap + 1, neg)
            cand[c:] = best[: cap + 1 - c] + vals[k]
            better = cand >= new  # >=: on ties prefer the larger k (visited later)
            new = np.where(better, cand, new)
            pick = np.where(better, k, pick)
        best, choice[g] = new, pick
    if not np.isfinite(best).any():
        return None
    used = int(np.argmax(np.where(np.isfinite(best), best, neg)))
    out = [0] * n
    for g in range(n - 1, -1, -1):
        k = int(choice[g][used])
        out[g] = k
        used -= int(icost[g][k])
    return out


def choose_channels(
    importance: Sequence[np.ndarray],
    cost_curves: Sequence[Sequence[float]],
    budget: float,
    *,
    resolution: int = 2000,
    minimum: int = 1,
) -> list[np.ndarray] | None:
    """Boolean keep-masks per group: the most important channels of each group within the
    latency ``budget`` (``cost_curves[g][k]``: latency of group ``g`` with ``k`` channels)."""
    values, orders = [], []
    for imp in importance:
        imp = np.asarray(imp, dtype=np.float64)
        order = np.argsort(-imp, kind="stable")
        orders.append(order)
        values.append(np.concatenate([[0.0], np.cumsum(imp[order])]))
    picks = knapsack(
        values,
        cost_curves,
        budget,
        resolution=resolution,
        minimum=[min(minimum, len(v) - 1) for v in values],
    )
    if picks is None:
        return None
    masks = []
    for order, k in zip(orders, picks):
        m = np.zeros(len(order), dtype=bool)
        m[order[:k]] = True
        masks.append(m)
    return masks
