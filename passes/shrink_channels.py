"""``shrink_channels``: physically remove channels nobody reads.

From the channel graph (``channel_graph``), channel ``c`` of an unpinned space is dead when every
consumer's input column for it (or its ``H*W`` block after a flatten) is zero in the effective
weight (``weight * mask`` on a masked graph). Removing it then changes no output: the producers'
rows ``c`` (weight and bias), the channel-wise modules' slices ``c`` (BatchNorm statistics and
affine, depthwise conv filters) and the consumers' columns ``c`` all go, and every module's
``in_/out_channels`` / ``num_features`` / ``groups`` follows. Masks shrink with their weights. A
space keeps at least one channel.

Works on masked and finalized GraphModules; run it in eval or train mode (BatchNorm's running
statistics are sliced, not recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from ._infra import PassResult
from .channel_graph import ChannelGraph, build_channel_graph

__all__ = ["ShrinkReport", "dead_channels", "shrink_channels"]


@dataclass(frozen=True)
class ShrinkReport:
    removed: dict[str, int]  # producer module -> output channels removed
    params_before: int
    params_after: int


def _effective(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    mask = getattr(mod, "weight_mask", None)
    return w * mask if mask is not None else w


def _column_alive(mod: nn.Module, channels: int, factor: int) -> torch.Tensor:
    """Bool [channels]: whether the consumer reads each input channel."""
    w = _effective(mod)
    cols = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(-1)
    alive = (cols != 0).any(dim=0).any(dim=-1)  # [in]
    if factor != 1:
        alive = alive.reshape(channels, factor).any(dim=1)
    return alive


def dead_channels(gm: fx.GraphModule, graph: ChannelGraph) -> dict[int, torch.Tensor]:
    """Space index -> bool mask of channels to keep (only spaces with something to remove)."""
    keep: dict[int, torch.Tensor] = {}
    for space in graph.spaces:
        if not space.removable:
            continue
        alive = torch.zeros(space.size, dtype=torch.bool)
        for cons in space.consumers:
            mod = gm.get_submodule(cons.module)
            alive |= _column_alive(mod, space.size, cons.factor).cpu()
        if not alive.any():
            alive[0] = True  # keep one channel: zero-size layers are not worth the special cases
        if not alive.all():
            keep[space.index] = alive
    return keep


def _slice(t: torch.Tensor | None, idx: torch.Tensor, dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.index_select(dim, idx.to(t.device)).contiguous()


def _set(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)


def _shrink_rows(mod: nn.Module, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "weight_mask"):
        if getattr(mod, name, None) is not None:
            _set(mod, name, _slice(getattr(mod, name), idx, 0))
    if isinstance(mod, nn.Linear):
        mod.out_features = len(idx)
    else:
        mod.out_channels = len(idx)


def _shrink_cols(mod: nn.Module, idx: torch.Tensor, factor: int) -> None:
    if factor != 1:
        idx = (idx[:, None] * factor + torch.arange(factor)[None, :]).reshape(-1)
    for name in ("weight", "weight_mask"):
        if getattr(mod, name, None) is not None:
            _set(mod, name, _slice(getattr(mod, name), idx, 1))
    if isinstance(mod, nn.Linear):
        mod.in_features = len(idx)
    else:
        mod.in_channels = len(idx)


def _shrink_channelwise(mod: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                _set(mod, name, _slice(getattr(mod, name), idx, 0))
        mod.num_features = len(idx)
    else:  # depthwise conv: one filter per channel
        for name in ("weight", "bias", "weight_mask"):
            if getattr(mod, name, None) is not None:
                _set(mod, name, _slice(getattr(mod, name), idx, 0))
        mod.in_channels = mod.out_channels = mod.groups = len(idx)


def shrink_channels(gm: fx.GraphModule, example_inputs: tuple | None = None) -> PassResult:
    """Remove every dead channel of ``gm`` in place (see the module docstring).

    ``example_inputs`` are needed unless ``propagate_shapes`` already annotated ``gm``. The
    report is left in ``gm.meta["nm_shrink"]``.
    """
    graph = build_channel_graph(gm, example_inputs)
    keep = dead_channels(gm, graph)
    before = sum(p.numel() for p in gm.parameters())
    removed: dict[str, int] = {}
    with torch.no_grad():
        for space_index, alive in keep.items():
            space = graph.spaces[space_index]
            idx = alive.nonzero().flatten()
            for name in space.producers:
                _shrink_rows(gm.get_submodule(name), idx)
                removed[name] = int((~alive).sum())
            for name in space.channelwise:
                _shrink_channelwise(gm.get_submodule(name), idx)
            for cons in space.consumers:
                _shrink_cols(gm.get_submodule(cons.module), idx, cons.factor)
    if keep:
        sites = gm.meta.get("nm_sites")
        if sites:
            shapes = {s.param: tuple(gm.get_parameter(s.param).shape) for s in sites}
            new_sites = [replace(s, shape=shapes[s.param]) for s in sites]
            by_param = {s.param: s for s in new_sites}
            for node in gm.graph.nodes:
                site = node.meta.get("nm_site")
                if site is not None:
                    node.meta["nm_site"] = by_param[site.param]
            gm.meta["nm_sites"] = new_sites
        gm.recompile()
    after = sum(p.numel() for p in gm.parameters())
    gm.meta["nm_shrink"] = ShrinkReport(removed, before, after)
    return PassResult(gm, bool(keep))
