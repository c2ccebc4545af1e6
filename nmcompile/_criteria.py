"""Importance criteria: a criterion maps a weight to scores of the same shape (higher = keep).

Scoring is kept apart from shaping (a pattern or a global budget turns scores into masks) and from
scheduling (a method says how much to prune when).
"""

from __future__ import annotations

import torch

__all__ = ["magnitude", "random_scores"]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w| (L1 magnitude), the criterion of ASP, OMP and the IMP family."""
    return weight.detach().abs()


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores drawn from ``generator`` (CPU), for random-pruning baselines."""
    return torch.rand(weight.shape, generator=generator).to(weight.device)
