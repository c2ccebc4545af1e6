"""``trace``: nn.Module -> torch.fx GraphModule, and ``propagate_shapes`` over example inputs.

Tracing is ``torch.fx.symbolic_trace`` with configurable leaf modules (kept as one opaque
``call_module``; their weights stay dense). When tracing fails, the error names the innermost
module being traced and the two fixes: mark it as a leaf, or make its ``forward`` free of Python
control flow on tensor values.

``propagate_shapes`` runs the graph node by node on real inputs, records each node's output shape
in ``node.meta["nm_shape"]`` (used for FLOP counting), and turns a failure into an ``InputError``
that names the layer, its input shapes and what it expected.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from nmcompile._errors import InputError, TraceError

from ._infra import PassResult

__all__ = ["propagate_shapes", "trace"]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self._stack: list[tuple[str, str]] = []
        self.failed_at: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self._stack)
            raise
        finally:
            self._stack.pop()


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[str | type] = (),
    copy_model: bool = True,
    expand_attention: bool = True,
) -> PassResult:
    """Symbolically trace ``model`` into a GraphModule.

    ``leaf_modules``: module paths (``"layer3.0"``) or classes that stay opaque calls. The model is
    deep-copied first unless ``copy_model=False``, so the caller's module is never mutated by later
    passes. ``expand_attention`` first swaps ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``
    (``Layer``) for traceable equivalents with the same parameters (``passes/attention.py``), so
    their projections can be pruned.
    """
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model) if copy_model else model
        return PassResult(gm, False)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(leaf_names - known)
    if unknown:
        raise TraceError(
            f"leaf_modules names {unknown}, which are not submodules of {type(model).__name__}; "
            f"valid names look like {sorted(known - {''})[:5]}"
        )
    root = copy.deepcopy(model) if copy_model else model
    if expand_attention:
        from .attention import make_traceable

        root = make_traceable(root)
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(root, concrete_args=_optional_defaults(root))
    except Exception as exc:
        where = tracer.failed_at[-1] if tracer.failed_at else ("", type(model).__name__)
        path, cls = where
        label = f"`{path}` ({cls})" if path else f"the top-level module ({cls})"
        fix = (
            f"pass leaf_modules=[{path!r}] to keep it as one opaque call (its weights then stay "
            "dense), or remove Python control flow on tensor values from its forward"
            if path
            else "remove Python control flow on tensor values from forward(), or wrap the "
            "untraceable part in a submodule and list it in leaf_modules"
        )
        raise TraceError(
            f"torch.fx could not trace {label}: {type(exc).__name__}: {exc}. Fix: {fix}."
        ) from exc
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(root.training)
    return PassResult(gm, True)


def _optional_defaults(root: nn.Module) -> dict[str, Any] | None:
    """Forward arguments defaulting to None / a bool are baked in at their defaults: options
    like ``mask=None`` or ``is_causal=False`` would otherwise become graph inputs that Python
    control flow inside the model cannot branch on."""
    import inspect

    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    baked = {
        p.name: p.default for p in params[1:] if p.default is None or isinstance(p.default, bool)
    }
    return baked or None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            args, _kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "call_module":
                mod = self.module.get_submodule(n.target)
                what = f"layer `{n.target}` ({type(mod).__name__}"
                for attr in ("in_channels", "in_features", "normalized_shape", "num_features"):
                    if hasattr(mod, attr):
                        what += f", {attr}={getattr(mod, attr)}"
                what += ")"
            else:
                what = f"operation `{n.name}` ({n.op} {getattr(n.target, '__name__', n.target)})"
            raise InputError(
                f"example_inputs do not fit the model: {what} failed on inputs "
                f"{_describe(args)}: {type(exc).__name__}: {exc}. Fix: pass example_inputs with "
                "the shape and dtype the model expects, e.g. example_inputs=(torch.randn(1, 3, "
                "224, 224),) for an ImageNet-sized vision model."
            ) from exc
        if isinstance(out, torch.Tensor):
            n.meta["nm_shape"] = tuple(out.shape)
        return out


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``gm`` on ``example_inputs``; record output shapes; return the output.

    Runs in eval mode under ``no_grad`` (restoring the module's mode after), so BatchNorm running
    statistics and dropout state are not touched and a batch of one works.
    """
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}; "
            "write example_inputs=(x,) for a single input"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders without defaults
    if not len(required) <= len(example_inputs) <= len(placeholders):
        raise InputError(
            f"the model's forward takes {len(required)} to {len(placeholders)} inputs "
            f"({[n.target for n in placeholders]}), got {len(example_inputs)} example_inputs"
        )
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return _ShapeRecorder(gm).run(*example_inputs)
    finally:
        gm.train(was_training)
