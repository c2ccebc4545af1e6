"""Shaping: scores -> masks under a budget.

``global_unstructured`` prunes the ``sparsity`` fraction of lowest scores across every tensor
together (the IMP / OMP convention: layers compete for the budget). Ties at the threshold are
broken by position (tensor order, then flat index), so the count is exact and the result
deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["global_unstructured"]


def global_unstructured(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    eligible: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning ``round(sparsity * total)`` of the lowest scores globally.

    ``eligible`` (bool masks) restricts pruning to those entries; the budget counts only them and
    ineligible entries are always kept.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    names = list(scores)
    flat = []
    for name in names:
        s = scores[name].detach().reshape(-1).float()
        if eligible is not None:
            s = torch.where(eligible[name].reshape(-1), s, torch.full_like(s, float("inf")))
        flat.append(torch.nan_to_num(s, nan=float("-inf")).cpu())
    allv = torch.cat(flat) if flat else torch.empty(0)
    pool = allv.numel() if eligible is None else int(sum(int(eligible[n].sum()) for n in names))
    k = round(sparsity * pool)
    prune = torch.zeros(allv.shape, dtype=torch.bool)
    if k > 0:
        thr = torch.kthvalue(allv, k).values
        below = allv < thr
        at = allv == thr
        room = k - int(below.sum())
        prune = below | (at & (torch.cumsum(at, 0) <= room))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        n = scores[name].numel()
        out[name] = (
            (~prune[offset : offset + n]).reshape(scores[name].shape).to(scores[name].device)
        )
        offset += n
    return out
