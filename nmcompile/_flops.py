"""Training FLOPs, sparse-aware, as the papers count them.

Forward FLOPs count multiplications and additions (2 per multiply-accumulate) of convolutions,
linear layers and matrix products; elementwise ops are ignored (they are a rounding error next to
the GEMMs, and the papers ignore them too). The dense total comes from
``torch.utils.flop_counter.FlopCounterMode`` on one forward of the example inputs; each site's
share is ``2 * numel(output) * numel(weight) / weight.shape[out_axis]`` (the multiply-adds per
output element) from the recorded output shape, or what the probe counted inside an opaque call.

A site with mask density ``d_l`` costs ``d_l`` times its dense FLOPs, so for a model with dense
forward cost ``zeta_D`` the sparse forward cost is::

    zeta_P = (zeta_D - sum_l F_l) + sum_l d_l * F_l

and one training sample costs ``3 * zeta_P`` (forward + activation gradient + weight gradient:
the backward pass is about twice the forward; IEE paper, appendix 3). Methods that keep dense
weight gradients (SR-STE, IEE's explore phase) cost ``2 * zeta_P + zeta_D`` per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from nmcompile.passes import propagate_shapes

__all__ = ["FlopModel", "count_total"]


def count_total(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> float:
    """Dense forward FLOPs of ``gm`` on ``example_inputs`` (all samples); records node shapes
    (and what opaque calls do with weights) on the way, see ``propagate_shapes``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        propagate_shapes(gm, example_inputs)
    return float(counter.get_total_flops())


def _batch_size(example_inputs: Sequence[Any]) -> int:
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return max(int(x.shape[0]), 1)
    return 1


@dataclass(frozen=True)
class FlopModel:
    """Per-sample forward FLOPs of a model: dense total and each site's dense share."""

    dense: float  # zeta_D, per sample
    sites: Mapping[str, float]  # parameter fqn -> dense forward FLOPs per sample

    @classmethod
    def build(cls, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> FlopModel:
        """Count on one forward of ``gm`` (also validates the inputs and records node shapes)."""
        total = count_total(gm, example_inputs)
        return cls.from_shapes(gm, total, _batch_size(example_inputs))

    @classmethod
    def from_shapes(cls, gm: fx.GraphModule, total: float, batch: int) -> FlopModel:
        per_site: dict[str, float] = {}
        for node in gm.graph.nodes:
            for param, flops in (node.meta.get("nm_site_flops") or {}).items():
                per_site[param] = per_site.get(param, 0.0) + flops / batch
            site = node.meta.get("nm_site")
            shape = node.meta.get("nm_shape")
            if site is None or shape is None or node.meta.get("nm_mask_source"):
                continue
            macs_per_output = site.numel // max(site.shape[site.out_axis], 1)
            out = 1
            for d in shape:
                out *= d
            per_site[site.param] = (
                per_site.get(site.param, 0.0) + 2.0 * out * macs_per_output / batch
            )
        dense = max(total / batch, sum(per_site.values()))
        return cls(dense=dense, sites=per_site)

    def forward(self, densities: Mapping[str, float] | None = None) -> float:
        """Sparse forward FLOPs per sample given each site's mask density (missing: dense)."""
        if not densities:
            return self.dense
        saved = sum(f * (1.0 - densities.get(p, 1.0)) for p, f in self.sites.items())
        return self.dense - saved

    def train_step(
        self, densities: Mapping[str, float] | None = None, *, dense_weight_grad: bool = False
    ) -> float:
        """FLOPs of one training sample: ``3 zeta_P``, or ``2 zeta_P + zeta_D`` with dense weight
        gradients."""
        sparse = self.forward(densities)
        return 2.0 * sparse + (self.dense if dense_weight_grad else sparse)
