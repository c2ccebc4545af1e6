"""``finalize``: fold masks into weights, remove mask nodes, optionally fold BatchNorm.

After ``finalize`` the graph is the original one again (each masked functional call becomes the
``call_module`` it replaced), with ``weight <- weight * mask`` written into the parameters, so an
exporter sees plain Conv / Gemm nodes whose constant weights carry the N:M zeros. A
``Mul(weight, mask)`` left in an exported graph would hide the sparsity from TensorRT.

BatchNorm folding (eval mode only; ``Conv -> BN`` or ``Linear -> BN`` where the layer's output
feeds only the BN and each module is called once)::

    s = gamma / sqrt(running_var + eps)
    W' = W * s[:, None, ...]          (per output channel: zeros stay zeros, N:M is kept)
    b' = (b - running_mean) * s + beta
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from nmcompile._errors import ConfigError

from ._infra import PassResult
from .insert_masks import mask_value, masked_calls

__all__ = ["finalize", "fold_batchnorm"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def finalize(gm: fx.GraphModule, *, fold_bn: bool = False) -> PassResult:
    """Fold every mask into its weight and restore plain ``call_module`` nodes (in place)."""
    calls = list(masked_calls(gm))
    graph = gm.graph
    folded: set[str] = set()
    owners: set[tuple[str, str]] = set()
    with torch.no_grad():
        for call in calls:
            param = gm.get_parameter(call.site.param)
            if call.site.param not in folded:
                param.mul_(mask_value(gm, call).to(param.dtype))
                folded.add(call.site.param)
            owners.add((call.site.owner, call.site.attr))
            if call.module is None:  # matmul site: every reader gets the parameter again
                call.source.replace_all_uses_with(call.weight)
                graph.erase_node(call.source)
                continue
            x = call.node.args[0]
            with graph.inserting_before(call.node):
                restored = graph.call_module(call.module, (x,))
            restored.meta = {k: v for k, v in call.node.meta.items() if k != "nm_module"}
            call.node.replace_all_uses_with(restored)
            graph.erase_node(call.node)
    if calls:
        graph.eliminate_dead_code()
        for name, attr in owners:
            owner = gm.get_submodule(name)
            owner._buffers.pop(f"{attr}_mask", None)
            if hasattr(owner, f"{attr}_masker"):
                delattr(owner, f"{attr}_masker")
        graph.lint()
        gm.recompile()
    modified = bool(calls)
    if fold_bn:
        modified |= fold_batchnorm(gm).modified
    return PassResult(gm, modified)


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Fold eval-mode BatchNorm into the conv/linear that feeds it (see the module docstring)."""
    if gm.training:
        raise ConfigError(
            "BatchNorm folding needs the module in eval mode (call .eval() first): in training "
            "mode BatchNorm normalises with batch statistics, which cannot be folded into weights"
        )
    graph = gm.graph
    call_counts = Counter(n.target for n in graph.nodes if n.op == "call_module")
    modified = False
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module":
            continue
        bn = gm.get_submodule(bn_node.target)
        if not isinstance(bn, _BN_TYPES) or bn.running_mean is None or not bn_node.args:
            continue
        src = bn_node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer = gm.get_submodule(src.target)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        if call_counts[src.target] != 1 or call_counts[bn_node.target] != 1:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
            w = layer.weight.float() * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
            b = shift if layer.bias is None else layer.bias.float() * scale + shift
            dtype = layer.weight.dtype
            layer.weight = nn.Parameter(w.to(dtype), requires_grad=layer.weight.requires_grad)
            layer.bias = nn.Parameter(b.to(dtype))
        bn_node.replace_all_uses_with(src)
        graph.erase_node(bn_node)
        modified = True
    if modified:
        gm.delete_all_unused_submodules()
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
