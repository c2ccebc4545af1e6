"""``insert_masks``: route every site's weight through a mask node.

Each ``call_module`` of a site becomes the functional op fed by ``mul(weight, mask)``::

    y = self.layer1.conv1(x)
      ->
    w = self.layer1.conv1.weight;  k = self.layer1.conv1.weight_mask
    y = torch.conv2d(x, torch.mul(w, k), self.layer1.conv1.bias, stride, padding, dilation, 1)

``mask`` is either a persistent bool buffer ``<module>.weight_mask`` (IMP, ASP, IEE: methods
rewrite it in place between rounds; it is in ``state_dict``, so checkpoints carry it) or, when
``mask_module`` is given, the output of a small module ``<module>.weight_masker`` called on the
weight (learned masks such as LBC / SR-STE with a straight-through gradient). The parameters stay
on their original modules, so fully-qualified names do not change.

With all-ones masks the masked graph computes exactly what the original did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._infra import PassResult, module_and_attr
from .find_sites import PrunableSite, get_sites

__all__ = ["MaskedCall", "get_masks", "insert_masks", "masked_calls"]

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
MASKER_ATTR = "weight_masker"


def _conv_fn(mod: nn.Module) -> Callable:
    for cls, fn in _CONV_FN.items():
        if isinstance(mod, cls):
            return fn
    raise TypeError(f"not a conv module: {type(mod).__name__}")


def insert_masks(
    gm: fx.GraphModule,
    *,
    mask_module: Callable[[PrunableSite, nn.Parameter], nn.Module] | None = None,
) -> PassResult:
    """Insert mask nodes for the sites ``find_sites`` recorded (see the module docstring).

    ``mask_module(site, weight)`` builds the module whose ``forward(weight)`` returns the mask; left
    ``None``, each site gets an all-ones persistent bool buffer.
    """
    sites = {s.param: s for s in get_sites(gm)}
    for site in sites.values():
        owner = gm.get_submodule(site.name)
        if mask_module is None:
            if not hasattr(owner, "weight_mask"):
                owner.register_buffer(
                    "weight_mask", torch.ones_like(owner.weight, dtype=torch.bool), persistent=True
                )
        elif not hasattr(owner, MASKER_ATTR):
            owner.add_module(MASKER_ATTR, mask_module(site, owner.weight))

    graph = gm.graph
    modified = False
    for node in list(graph.nodes):
        site: PrunableSite | None = node.meta.get("nm_site")
        if node.op != "call_module" or site is None:
            continue
        mod = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_before(node):
            w = graph.get_attr(site.param)
            if mask_module is None:
                mask = graph.get_attr(site.mask_target)
            else:
                mask = graph.call_module(f"{site.name}.{MASKER_ATTR}", (w,))
            wm = graph.call_function(torch.mul, (w, mask))
            bias = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            if site.kind == "conv":
                new = graph.call_function(
                    _conv_fn(mod),
                    (x, wm, bias, mod.stride, mod.padding, mod.dilation, mod.groups),
                )
            else:
                new = graph.call_function(F.linear, (x, wm, bias))
        new.meta = dict(node.meta)
        new.meta["nm_module"] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


@dataclass(frozen=True)
class MaskedCall:
    """One functional call fed by ``mul(weight, mask)``."""

    node: fx.Node
    site: PrunableSite
    module: str  # the module this call replaced (an alias of the site for tied weights)
    mul: fx.Node
    mask: fx.Node


def masked_calls(gm: fx.GraphModule) -> Iterator[MaskedCall]:
    """Every masked call of ``gm`` in graph order."""
    for node in gm.graph.nodes:
        site = node.meta.get("nm_site")
        if node.op != "call_function" or site is None or "nm_module" not in node.meta:
            continue
        mul = node.args[1]
        if not (isinstance(mul, fx.Node) and mul.target is torch.mul):
            continue
        yield MaskedCall(node, site, node.meta["nm_module"], mul, mul.args[1])


def mask_value(gm: fx.GraphModule, call: MaskedCall) -> torch.Tensor:
    """The current bool mask of ``call`` (a buffer read, or the masker module evaluated)."""
    if call.mask.op == "get_attr":
        owner, attr = module_and_attr(gm, call.mask.target)
        return getattr(owner, attr).detach().to(torch.bool, copy=True)
    masker = gm.get_submodule(call.mask.target)
    owner = gm.get_submodule(call.site.name)
    with torch.no_grad():
        return masker(owner.weight).detach() != 0


def get_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``{parameter fqn: bool mask}`` for every masked site (one entry per weight)."""
    out: dict[str, torch.Tensor] = {}
    for call in masked_calls(gm):
        if call.site.param not in out:
            out[call.site.param] = mask_value(gm, call)
    return out
