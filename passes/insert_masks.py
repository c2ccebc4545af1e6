"""``insert_masks``: route every site's weight through a mask node.

Each ``call_module`` of a conv / linear site becomes the functional op fed by the masked weight::

    y = self.layer1.conv1(x)
      ->
    w = self.layer1.conv1.weight;  k = self.layer1.conv1.weight_mask
    y = torch.conv2d(x, torch.mul(w, k), self.layer1.conv1.bias, stride, padding, dilation, 1)

A ``matmul`` site (a parameter the graph feeds to a product itself: the packed qkv
``in_proj_weight`` of attention, a transformers ``Conv1D`` weight in ``addmm``, a weight handed to
an opaque helper) keeps its calls; the parameter's read is masked where it happens::

    w = self.attn.qkv.weight                 w = self.attn.qkv.weight
    y = shifted_window_attention(x, w, ...)  ->  wm = torch.mul(w, self.attn.qkv.weight_mask)
                                             y = shifted_window_attention(x, wm, ...)

The mask is either a persistent bool buffer ``<module>.<attr>_mask`` (IMP, ASP, IEE: methods
rewrite it in place between rounds; it is in ``state_dict``, so checkpoints carry it) or, when
``mask_module`` is given, a module ``<module>.<attr>_masker`` that maps the weight to the masked
weight, ``masker(w)``, and tells its current mask with ``masker.mask(w)`` (learned masks such as
LBC, and SR-STE / STE, whose straight-through gradients need to own the product). The parameters
stay on their original modules, so fully-qualified names do not change.

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

__all__ = ["MaskedCall", "get_masks", "insert_masks", "mask_value", "masked_calls"]

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


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

    ``mask_module(site, weight)`` builds the masker module (``forward(weight)`` -> masked weight,
    ``mask(weight)`` -> bool mask); left ``None``, each site gets an all-ones bool buffer.
    """
    sites = {s.param: s for s in get_sites(gm)}
    for site in sites.values():
        owner = gm.get_submodule(site.owner)
        weight = getattr(owner, site.attr)
        if mask_module is None:
            if not hasattr(owner, f"{site.attr}_mask"):
                owner.register_buffer(
                    f"{site.attr}_mask", torch.ones_like(weight, dtype=torch.bool), persistent=True
                )
        elif not hasattr(owner, f"{site.attr}_masker"):
            owner.add_module(f"{site.attr}_masker", mask_module(site, weight))

    graph = gm.graph
    modified = False
    matmul = {s.param: s for s in sites.values() if s.kind == "matmul"}
    by_param = {id(gm.get_parameter(p)): site for p, site in matmul.items()}
    for node in list(graph.nodes):
        if node.op != "get_attr" or not by_param:
            continue
        try:
            site = by_param.get(id(gm.get_parameter(node.target)))
        except AttributeError:
            continue
        if site is None or any(_is_source(u, site) for u in node.users):
            continue  # not a matmul site, or already masked
        with graph.inserting_before(node.next):
            wm = _mask_node(graph, node, site, mask_module is None)
        node.replace_all_uses_with(wm, delete_user_cb=lambda u, _wm=wm: u is not _wm)
        modified = True
    for node in list(graph.nodes):
        site: PrunableSite | None = node.meta.get("nm_site")
        if site is None or node.op != "call_module" or site.kind == "matmul":
            continue
        with graph.inserting_before(node):
            w = graph.get_attr(site.param)
            wm = _mask_node(graph, w, site, mask_module is None)
            mod = gm.get_submodule(node.target)
            x = node.args[0] if node.args else node.kwargs["input"]
            bias = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            if site.kind == "conv":
                new = graph.call_function(
                    _conv_fn(mod), (x, wm, bias, mod.stride, mod.padding, mod.dilation, mod.groups)
                )
            else:
                new = graph.call_function(F.linear, (x, wm, bias))
        new.meta = dict(node.meta)
        new.meta["nm_module"] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        modified = True
    if modified:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _mask_node(graph: fx.Graph, w: fx.Node, site: PrunableSite, buffer: bool) -> fx.Node:
    if buffer:
        wm = graph.call_function(torch.mul, (w, graph.get_attr(site.mask_target)))
    else:
        wm = graph.call_module(site.masker_target, (w,))
    wm.meta["nm_site"] = site
    wm.meta["nm_mask_source"] = True  # the weight's mask node, not a call computing with it
    return wm


def _is_source(node: object, site: PrunableSite) -> bool:
    """Whether ``node`` is the mask node of ``site`` (``mul(weight, mask)`` or its masker)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return node.target == site.masker_target
    if node.op != "call_function" or node.target is not torch.mul or len(node.args) != 2:
        return False
    mask = node.args[1]
    return isinstance(mask, fx.Node) and mask.op == "get_attr" and mask.target == site.mask_target


@dataclass(frozen=True)
class MaskedCall:
    """One call whose weight argument is a mask node (``mul(weight, mask)`` or a masker)."""

    node: fx.Node  # the rewritten conv / linear call; for matmul sites the mask node itself
    site: PrunableSite
    module: str | None  # the conv / linear module this call replaced; None for matmul sites
    source: fx.Node  # the mul or masker node feeding the weight argument

    @property
    def weight(self) -> fx.Node:
        return self.source.args[0]

    @property
    def is_buffer(self) -> bool:
        return self.source.op == "call_function"


def masked_calls(gm: fx.GraphModule) -> Iterator[MaskedCall]:
    """Every masked call of ``gm`` in graph order: one per rewritten module call, one per mask
    node of a matmul site."""
    for node in gm.graph.nodes:
        site = node.meta.get("nm_site")
        if site is None or node.op not in ("call_function", "call_module"):
            continue
        if _is_source(node, site):
            if site.kind == "matmul":
                yield MaskedCall(node, site, None, node)
            continue
        module = node.meta.get("nm_module")
        if module is not None and len(node.args) >= 2 and _is_source(node.args[1], site):
            yield MaskedCall(node, site, module, node.args[1])


def mask_value(gm: fx.GraphModule, call: MaskedCall) -> torch.Tensor:
    """The current bool mask of ``call`` (a buffer read, or the masker module asked)."""
    if call.is_buffer:
        owner, attr = module_and_attr(gm, call.source.args[1].target)
        return getattr(owner, attr).detach().to(torch.bool, copy=True)
    masker = gm.get_submodule(call.source.target)
    with torch.no_grad():
        return masker.mask(gm.get_parameter(call.site.param)).detach().to(torch.bool, copy=True)


def get_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``{parameter fqn: bool mask}`` for every masked site (one entry per weight)."""
    out: dict[str, torch.Tensor] = {}
    for call in masked_calls(gm):
        if call.site.param not in out:
            out[call.site.param] = mask_value(gm, call)
    return out
