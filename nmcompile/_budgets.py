"""Layer budgets: how a global sparsity is split over layers.

``uniform``: every layer at the global sparsity. ``erk`` (Erdős-Rényi-Kernel, Evci et al. 2020):
a layer's density is proportional to ``sum(shape) / prod(shape)`` of its weight (kernel dims
included), scaled by one factor so the total matches; layers that would exceed density 1 are made
dense and the factor is solved again for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["layer_densities"]


def layer_densities(shapes: Sequence[Sequence[int]], sparsity: float, mode: str) -> list[float]:
    """Per-layer kept fraction for ``shapes`` at global ``sparsity``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if mode == "uniform":
        return [1.0 - sparsity] * len(shapes)
    if mode != "erk":
        raise ValueError(f"layer budget must be 'uniform' or 'erk', got {mode!r}")
    numel = [1] * len(shapes)
    raw = [0.0] * len(shapes)
    for i, shape in enumerate(shapes):
        n = 1
        for d in shape:
            n *= d
        numel[i] = n
        raw[i] = sum(shape) / n
    total_keep = (1.0 - sparsity) * sum(numel)
    dense: set[int] = set()
    while True:
        budget = total_keep - sum(numel[i] for i in dense)
        free = sum(raw[i] * numel[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / free if free > 0 else 0.0
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            break
        dense |= over
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
