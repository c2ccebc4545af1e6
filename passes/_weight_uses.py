"""How a graph uses its parameters: which weights feed a matrix product, and along which axis.

A weight is prunable when every use of it is a product whose reduction runs over one of its axes.
The uses are classified by the op's name, so the same table reads the three forms a graph can
take: torch functions and Tensor methods (torch.fx graphs and the runtime probe below) and ATen
overloads (torch.export graphs)::

    linear(x, W)          W is [out, in]   reduction axis 1
    matmul(x, W) / x @ W  W is [in, out]   reduction axis 0  (also mm, addmm(b, x, W))
    matmul(W, x)          W is [out, in]   reduction axis 1

followed through layout-only views of the weight (``t``, ``transpose``, ``T``, ``permute``,
``contiguous``, dtype casts), which move the axis. Any other use (an embedding lookup, a norm, an
elementwise product, a reshape) makes the weight *other-used*: masking it would change that use
too, so the weight stays dense with that reason.

A weight passed into a function the graph keeps opaque (a ``torch.fx.wrap``-ed helper such as
torchvision's ``shifted_window_attention``) cannot be read from the graph. :class:`WeightProbe`
runs such a call once on real inputs under a ``TorchFunctionMode`` and records the same
classification for what happens inside, with the FLOPs of each product.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

__all__ = ["WeightProbe", "WeightUse", "graph_weight_uses", "op_name", "tensor_args"]

_LINEAR = frozenset({"linear"})
_MM = frozenset({"matmul", "mm", "rmatmul"})
_ADDMM = frozenset({"addmm"})
_KEEP = frozenset(
    {
        "contiguous",
        "alias",
        "detach",
        "clone",
        "to",
        "_to_copy",
        "float",
        "half",
        "bfloat16",
        "lift_fresh_copy",
    }
)
_SWAP = frozenset({"t", "T", "mT", "numpy_T", "transpose", "permute", "swapaxes", "swapdims"})


@dataclass(frozen=True)
class WeightUse:
    """One use of a parameter: ``op`` by name, ``axis`` the reduction axis in the parameter's own
    layout (None when the use is not a product), and the graph node that makes it."""

    op: str
    axis: int | None
    node: fx.Node | None = None
    flops: float | None = None  # per call, for uses seen by the probe

    @property
    def is_product(self) -> bool:
        return self.axis is not None


def op_name(target: Any, op: str = "call_function") -> str:
    """A graph node's (or a probed call's) target by plain name: ``aten.addmm.default``,
    ``torch.addmm`` and ``Tensor.addmm`` are all ``"addmm"``; ``x @ W`` is ``"matmul"``."""
    if op == "call_method":
        name = str(target)
    elif target is operator.matmul:
        return "matmul"
    elif target is getattr:
        return "getattr"
    else:
        packet = getattr(target, "_overloadpacket", None)
        name = getattr(packet if packet is not None else target, "__name__", "") or ""
        if name == "__get__":  # a Tensor property read (``W.T``) under a TorchFunctionMode
            name = getattr(getattr(target, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
    return name


def _swaps(name: str, args: tuple, ndim: int) -> bool | None:
    """True when a layout op swaps the two axes of a 2-D weight, False when it keeps them, None
    when it is not a layout op we can follow."""
    if name in _KEEP:
        return False
    if name not in _SWAP or ndim != 2:
        return None
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = [int(d) % 2 for d in dims]
        return dims == [1, 0] if len(dims) == 2 else None
    if name in ("transpose", "swapaxes", "swapdims"):
        if len(args) < 3:
            return None
        return int(args[1]) % 2 != int(args[2]) % 2
    return True


def _product_axis(name: str, position: int, ndim: int) -> int | None:
    """The reduction axis of a weight at argument ``position`` of product ``name`` (its own
    layout), or None when that position is not a weight operand."""
    if ndim != 2:
        return None
    if name in _LINEAR:
        return 1 if position == 1 else None
    if name in _ADDMM:
        position -= 1  # addmm(bias, a, b)
    if name == "rmatmul":
        position = 1 - position  # W.__rmatmul__(x) is x @ W
    if name in _MM or name in _ADDMM:
        return {0: 1, 1: 0}.get(position)  # W @ x reduces W's axis 1; x @ W its axis 0
    return None


def tensor_args(node: fx.Node) -> list[tuple[int | str, fx.Node]]:
    """``(position or keyword, node)`` for every node argument of ``node`` (flat, one level of
    lists)."""
    out: list[tuple[int | str, fx.Node]] = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            out.append((i, a))
        elif isinstance(a, (list, tuple)):
            out.extend((i, x) for x in a if isinstance(x, fx.Node))
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            out.append((k, a))
    return out


def _kw_position(name: str, keyword: str) -> int:
    """The position of keyword argument ``keyword`` of product ``name`` (-1: not an operand)."""
    if name in _LINEAR:
        return {"input": 0, "weight": 1, "bias": 2}.get(keyword, -1)
    if name in _ADDMM:
        return {"input": 0, "mat1": 1, "mat2": 2}.get(keyword, -1)
    if name in _MM:
        return {"input": 0, "other": 1, "mat2": 1}.get(keyword, -1)
    return -1


def graph_weight_uses(start: fx.Node, ndim: int) -> list[WeightUse]:
    """Every use of the tensor ``start`` produces (a parameter's ``get_attr``), followed through
    layout views. Calls that the runtime probe looked into contribute what it saw."""
    uses: list[WeightUse] = []
    stack: list[tuple[fx.Node, bool]] = [(start, False)]
    seen: set[fx.Node] = set()
    while stack:
        node, swapped = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                uses.append(WeightUse("output", None, user))
                continue
            if user.op not in ("call_function", "call_method", "call_module"):
                continue
            name = op_name(user.target, user.op) if user.op != "call_module" else "module"
            positions = [
                _kw_position(name, p) if isinstance(p, str) else p
                for p, a in tensor_args(user)
                if a is node
            ]
            probed = user.meta.get("nm_probe")
            if probed is not None and user.op == "call_function":
                seen_uses = probed.get(node.name, [])
                if not seen_uses:
                    uses.append(WeightUse(name, None, user))
                for u in seen_uses:
                    axis = u.axis if u.axis is None or not swapped else 1 - u.axis
                    uses.append(WeightUse(u.op, axis, user, u.flops))
                continue
            if name == "getattr" and len(user.args) == 2:  # fx: W.T is getattr(W, "T")
                name = str(user.args[1])
            if positions == [0]:
                swap = _swaps(name, tuple(user.args), ndim)
                if swap is not None:
                    stack.append((user, swapped != swap))
                    continue
            for pos in positions:  # one use per operand: W @ W uses W along both axes
                axis = _product_axis(name, pos, ndim)
                if axis is not None and swapped:
                    axis = 1 - axis
                uses.append(WeightUse(name, axis, user))
    return uses


class WeightProbe(TorchFunctionMode):
    """Run one opaque call and record how it uses the given tensors (module docstring).

    ``tracked``: ``{id(tensor): key}``; after the call, ``uses[key]`` lists :class:`WeightUse`
    (``node`` None, ``flops`` of the product for this call)."""

    def __init__(self, tracked: dict[int, Any]) -> None:
        super().__init__()
        # id -> (key, swapped); derived views are added as they appear and kept alive in _keep,
        # so an id is never reused by another tensor during the call
        self._frames: dict[int, tuple[Any, bool]] = {i: (k, False) for i, k in tracked.items()}
        self._keep: list[torch.Tensor] = []
        self.uses: dict[Any, list[WeightUse]] = {k: [] for k in tracked.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        operands = [*enumerate(args), *((_kw_position(name, k), a) for k, a in kwargs.items())]
        hits = [
            (i, a, self._frames[id(a)])
            for i, a in operands
            if isinstance(a, torch.Tensor) and id(a) in self._frames
        ]
        if not hits:
            return out
        for pos, w, (key, swapped) in hits:
            if pos == 0 and isinstance(out, torch.Tensor) and out.dim() == 2:
                swap = _swaps(name, tuple(args), 2)
                if swap is not None:
                    self._keep.append(out)
                    self._frames[id(out)] = (key, swapped != swap)
                    continue
            axis = _product_axis(name, pos, 2)
            flops = None
            if axis is not None:
                reduction = w.shape[axis]
                flops = 2.0 * (out.numel() if isinstance(out, torch.Tensor) else 0) * reduction
                if swapped:
                    axis = 1 - axis
            self.uses[key].append(WeightUse(name, axis, None, flops))
        return out
