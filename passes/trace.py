"""``trace``: nn.Module -> torch.fx GraphModule, and ``propagate_shapes`` over example inputs.

Tracing is ``torch.fx.symbolic_trace`` with configurable leaf modules (kept as one opaque
``call_module``; their weights stay dense). When tracing fails and example inputs are given,
``torch.export`` is tried next: it runs the model on the inputs, so Python control flow on shapes
and other static values is specialised away (a warning says so). Its ATen graph is raised back to
the form every pass expects: each ``aten.conv*`` / ``aten.linear`` / ``aten.batch_norm`` /
``aten.dropout`` call that is exactly one ``nn.Module``'s forward becomes a ``call_module`` of that
module again, so sites, masks, FLOPs and BatchNorm folding work unchanged. When both fail, the
error names the innermost module being traced and the fixes: mark it as a leaf, or make its
``forward`` free of Python control flow on tensor values.

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
    example_inputs: Sequence[Any] | None = None,
) -> PassResult:
    """Symbolically trace ``model`` into a GraphModule.

    ``leaf_modules``: module paths (``"layer3.0"``) or classes that stay opaque calls. The model is
    deep-copied first unless ``copy_model=False``, so the caller's module is never mutated by later
    passes. ``expand_attention`` first swaps ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``
    (``Layer``) for traceable equivalents with the same parameters (``passes/attention.py``), so
    their projections can be pruned. ``example_inputs``: enables the ``torch.export`` fallback.
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
        exported = None
        export_error = ""
        if example_inputs is not None and not leaf_names and not leaf_types:
            try:
                exported = _trace_by_export(root, tuple(example_inputs))
            except Exception as exp_exc:  # report both failures below
                export_error = f" torch.export failed too: {type(exp_exc).__name__}: {exp_exc}"
                export_error = export_error[:600]
        if exported is not None:
            import warnings

            warnings.warn(
                f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
                f"{str(exc)[:200]}); traced it with torch.export instead. Python control flow "
                "was specialised to the example inputs' shapes and values, so the compiled "
                "model follows the branches those inputs took",
                stacklevel=2,
            )
            return PassResult(exported, True)
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
            + export_error
        ) from exc
    name = type(root).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(root.training)
    return PassResult(gm, True)


_ATEN_MODULE_OPS: dict[str, tuple[type, ...]] = {
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "linear": (nn.Linear,),
    "batch_norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "dropout": (nn.Dropout,),
}


def _trace_by_export(root: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """``torch.export`` the model and give its graph back its module calls (see module doc)."""
    ep = torch.export.export(root, inputs, strict=False)
    g = ep.module()
    # a copy owned by no module, so call_module nodes can name the original modules
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(g.graph._codegen)  # flattens inputs / outputs as exported
    graph.output(graph.graph_copy(g.graph, {}))
    modules = dict(root.named_modules())

    def owner(node: fx.Node) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        # "L__self__c1" style keys carry the path in the value: ("c1", "torch.nn...Conv2d")
        return path if path in modules else None

    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node) if not node.users else None
            continue
        if node.op != "call_function":
            continue
        op = getattr(node.target, "_overloadpacket", None)
        name = getattr(op, "__name__", "")
        path = owner(node)
        if (
            name == "add_"
            and path is not None
            and isinstance(modules[path], nn.modules.batchnorm._BatchNorm)
        ):
            # num_batches_tracked += 1: the BatchNorm module does it itself once called
            if not node.users:
                graph.erase_node(node)
            continue
        types = _ATEN_MODULE_OPS.get(name)
        if types is None or path is None or not isinstance(modules[path], types):
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if name == "dropout" or (
            isinstance(weight, fx.Node)
            and weight.op == "get_attr"
            and weight.target == f"{path}.weight"
        ):
            with graph.inserting_before(node):
                new = graph.call_module(path, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:  # weights now read by their modules
            graph.erase_node(node)
    gm = fx.GraphModule(root, graph, type(root).__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.train(root.training)
    return gm


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
