"""Channel dependency graph: which layers must change together when a channel goes.

Every weight layer (conv with ``groups == 1``, linear) starts a *channel space*: the channels of
its output. Ops that keep channels where they are put their input and output in the same space —
BatchNorm, activations, pooling, dropout, depthwise convs, means over spatial dims — and
elementwise ops between tensors (residual ``add``, ``mul``) tie their operands' spaces together.
The spaces are the connected components of a ``networkx`` graph over the FX nodes.

For each space the graph records its *producers* (layers whose output rows are its channels),
*channel-wise* modules (BatchNorm, depthwise convs: one parameter slice per channel) and
*consumers* (layers that read it: input channels of a conv or linear; ``flatten`` in between
turns one channel into a block of ``H*W`` input features). A space that reaches an op the graph
does not understand, a concatenation, the network input or the network output is *pinned*: its
channels cannot be removed.

Channel ``c`` of a space is then removable exactly when every consumer ignores it (its input
column / block is zero): producers may still compute it, nobody reads it. That is what
``shrink_channels`` removes, and what channel-structured methods (IMP-Refill, IEE channels) zero.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["ChannelGraph", "ChannelSpace", "Consumer", "build_channel_graph", "layer_module"]

_CHANNELWISE_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
)
_CHANNELWISE_FUNCS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.sigmoid,
    F.dropout,
    F.leaky_relu,
    F.elu,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.max_pool2d,
    F.avg_pool2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.hardtanh,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "float", "half"}
_BINARY = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    operator.iadd,
    operator.imul,
}
_BINARY_METHODS = {"add", "mul", "sub", "add_", "mul_"}
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}


@dataclass(frozen=True)
class Consumer:
    """A layer reading a space: ``factor`` input features per channel (1, or H*W after flatten)."""

    module: str
    factor: int = 1


@dataclass
class ChannelSpace:
    index: int
    size: int
    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # why the channels cannot be removed

    @property
    def removable(self) -> bool:
        return not self.pinned and bool(self.consumers)


@dataclass
class ChannelGraph:
    spaces: list[ChannelSpace]
    space_of_output: dict[str, int]  # producer module -> space of its output channels

    def coupled(self, module: str) -> list[str]:
        """Producers whose output channels are tied to ``module``'s (residual adds)."""
        idx = self.space_of_output.get(module)
        return [] if idx is None else list(self.spaces[idx].producers)


def layer_module(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """(module name, module) when ``node`` runs a conv / linear — a ``call_module`` or, in a
    masked graph, the functional call that replaced it."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return node.target, mod
        return None
    name = node.meta.get("nm_module")
    if node.op == "call_function" and name is not None:
        return name, gm.get_submodule(name)
    return None


def _shape(node: Any) -> tuple[int, ...] | None:
    if isinstance(node, fx.Node):
        s = node.meta.get("nm_shape")
        return tuple(s) if s is not None else None
    return None


def build_channel_graph(gm: fx.GraphModule, example_inputs: tuple | None = None) -> ChannelGraph:
    """Build the channel spaces of ``gm``. Needs node shapes: pass ``example_inputs`` unless
    ``propagate_shapes`` already ran on ``gm``."""
    if example_inputs is not None:
        from .trace import propagate_shapes

        propagate_shapes(gm, example_inputs)
    import networkx as nx  # lazily: ~0.1 s of import time that most runs never need

    g = nx.Graph()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        g.add_node(n.name)
    produced: dict[str, str] = {}  # node name -> producer module (space roots)
    channelwise: dict[str, str] = {}  # node name -> channel-wise module
    consumers: list[tuple[str, Consumer]] = []  # (input node name, consumer)
    pins: list[tuple[str, str]] = []  # (node name, reason)

    def tensor_args(n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if _shape(a) is not None]

    def link(a: fx.Node, n: fx.Node, *, per_channel_params: str | None = None) -> None:
        """``n`` keeps ``a``'s channels (and its flatten factor)."""
        factor = g.nodes[a.name].get("factor", 1)
        if per_channel_params is not None and factor != 1:
            pins.append((a.name, f"{per_channel_params} after flatten"))
        g.add_edge(a.name, n.name)
        g.nodes[n.name]["factor"] = factor

    for n in nodes:
        shape = _shape(n)
        if n.op == "placeholder":
            pins.append((n.name, "network input"))
            continue
        if n.op == "output":
            for a in n.all_input_nodes:
                pins.append((a.name, "network output"))
            continue
        if n.op == "get_attr" or shape is None:
            continue
        layer = layer_module(gm, n)
        if layer is not None:
            name, mod = layer
            x = n.args[0] if n.args else None
            depthwise = (
                isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and mod.groups > 1
                and mod.groups == mod.in_channels == mod.out_channels
            )
            if depthwise:
                link(x, n, per_channel_params=name)
                channelwise[n.name] = name
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups > 1:
                pins += [(x.name, f"grouped conv {name}"), (n.name, f"grouped conv {name}")]
            else:
                produced[n.name] = name
                if isinstance(x, fx.Node):
                    consumers.append((x.name, Consumer(name)))
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, _CHANNELWISE_MODULES):
                is_bn = isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
                link(n.all_input_nodes[0], n, per_channel_params=n.target if is_bn else None)
                if is_bn:
                    channelwise[n.name] = n.target
                continue
            if isinstance(mod, nn.Flatten) and _flatten_ok(n.all_input_nodes[0], mod.start_dim):
                _flatten(n, n.all_input_nodes[0], g, pins)
                continue
            for a in tensor_args(n):
                pins.append((a.name, f"module {n.target} ({type(mod).__name__})"))
            pins.append((n.name, f"module {n.target} ({type(mod).__name__})"))
            continue
        target = n.target
        ins = tensor_args(n)
        if (n.op == "call_function" and target in _CHANNELWISE_FUNCS) or (
            n.op == "call_method" and target in _CHANNELWISE_METHODS
        ):
            if ins:
                link(ins[0], n)
            continue
        if (n.op == "call_function" and target in _BINARY) or (
            n.op == "call_method" and target in _BINARY_METHODS
        ):
            same = [a for a in ins if _shape(a) == shape]
            factors = {g.nodes[a.name].get("factor", 1) for a in ins}
            if len(same) == len(ins) and ins and len(factors) == 1:
                for a in ins:
                    link(a, n)
                continue
        if (n.op == "call_function" and target is torch.flatten) or (
            n.op == "call_method" and target == "flatten"
        ):
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            if ins and _flatten_ok(ins[0], start):
                _flatten(n, ins[0], g, pins)
                continue
        if (n.op == "call_method" and target == "mean") or (
            n.op == "call_function" and target is torch.mean
        ):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            in_shape = _shape(ins[0]) if ins else None
            if (
                in_shape
                and dims is not None
                and 1 not in _dims(dims, len(in_shape))
                and (len(shape) > 1 and shape[1] == in_shape[1])
            ):
                link(ins[0], n)
                continue
        for a in ins:
            pins.append((a.name, f"{n.op} {getattr(target, '__name__', target)}"))
        pins.append((n.name, f"{n.op} {getattr(target, '__name__', target)}"))

    # flatten nodes carry an expansion factor on their edge; resolve them per component
    spaces: list[ChannelSpace] = []
    index_of: dict[str, int] = {}
    factor_of: dict[str, int] = {}
    for comp in nx.connected_components(g):
        comp = set(comp)
        roots = [c for c in comp if c in produced]
        if not roots:
            continue
        idx = len(spaces)
        size = _channels(gm, produced[roots[0]])
        space = ChannelSpace(idx, size)
        space.producers = sorted({produced[r] for r in roots})
        space.channelwise = sorted({channelwise[c] for c in comp if c in channelwise})
        for c in comp:
            index_of[c] = idx
            factor_of[c] = g.nodes[c].get("factor", 1)
        if len({_channels(gm, p) for p in space.producers}) > 1:
            space.pinned.append("producers disagree on the channel count")
        spaces.append(space)
    for node_name, cons in consumers:
        idx = index_of.get(node_name)
        if idx is not None:
            spaces[idx].consumers.append(Consumer(cons.module, factor_of.get(node_name, 1)))
    for node_name, reason in pins:
        idx = index_of.get(node_name)
        if idx is not None and reason not in spaces[idx].pinned:
            spaces[idx].pinned.append(reason)
    out_space = {}
    for s in spaces:
        for p in s.producers:
            out_space[p] = s.index
    return ChannelGraph(spaces, out_space)


def _dims(dims: Any, ndim: int) -> set[int]:
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return {d % ndim for d in dims}


def _flatten_ok(src: fx.Node, start_dim: Any) -> bool:
    shape = _shape(src)
    return shape is not None and len(shape) >= 2 and start_dim in (1, -len(shape) + 1)


def _flatten(n: fx.Node, src: fx.Node, g: nx.Graph, pins: list) -> None:
    shape = _shape(src)
    factor = 1
    for d in shape[2:]:
        factor *= d
    if g.nodes[src.name].get("factor", 1) != 1:
        pins.append((src.name, "flatten of a flattened tensor"))
        return
    g.add_edge(src.name, n.name)
    g.nodes[n.name]["factor"] = factor


def _channels(gm: fx.GraphModule, module: str) -> int:
    return int(gm.get_submodule(module).weight.shape[0])
