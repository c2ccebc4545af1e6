"""``trace``: nn.Module -> torch.fx GraphModule, and ``propagate_shapes`` over example inputs.

Two tracers, one graph form:

- ``torch.fx.symbolic_trace`` with configurable leaf modules (kept as one opaque
  ``call_module``; their weights stay dense). Shape-generic: the graph runs at any input size the
  model's code allows.
- ``torch.export`` (when fx fails and example inputs are given, or ``tracer="export"``; Hugging
  Face ``transformers`` models go there directly, since their forwards do not fx-trace). It runs
  the model on the inputs, so Python control flow is specialised to them (a warning says so).
  Batch and sequence dims are kept dynamic (``Dim.AUTO``: integer inputs such as token ids on
  dims 0 and 1, 3-D float inputs on dims 0 and 1, other tensors on dim 0) unless
  ``dynamic_shapes`` says otherwise; a dim torch.export had to fix (a batch of 1 is always
  specialised) is named in a warning. The ATen graph is raised back to the form every pass
  expects: each ``aten.conv*`` / ``aten.linear`` / ``aten.batch_norm`` / ``aten.dropout`` call
  that is exactly one ``nn.Module``'s forward becomes a ``call_module`` again, and
  ``_assert_tensor_metadata`` nodes (dtype pins that would block a cast to fp16) are dropped.
  The result checks each call against what it was traced for (:class:`InputSpec`): keyword
  arguments are bound to the traced positions, and an input at a fixed dim of another size is
  refused with the reason instead of failing deep inside a reshape.

Models with a KV cache (``config.use_cache``, the Hugging Face default for decoders) are traced
with the cache switched off, on the traced copy, with a warning: a cache is generation state,
not something a sparse weight changes, and neither tracer can return it.

When both tracers fail the error names the innermost module being traced and the fixes: mark it
as a leaf, or make its ``forward`` free of Python control flow on tensor values.

``propagate_shapes`` runs the graph node by node on real inputs, records each node's output shape
in ``node.meta["nm_shape"]`` (used for FLOP counting), looks inside opaque calls that receive a
weight (``node.meta["nm_probe"]``, see ``_weight_uses``), and turns a failure into an
``InputError`` that names the layer, its input shapes and what it expected.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from nmcompile._errors import InputError, NMCompileWarning, TraceError

from ._infra import PassResult
from ._weight_uses import WeightProbe

__all__ = [
    "InputSpec",
    "auto_dynamic_shapes",
    "input_spec",
    "install_input_spec",
    "propagate_shapes",
    "trace",
]

TRACERS = ("auto", "fx", "export")


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


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _switch_off_caches(root: nn.Module) -> list[str]:
    """``config.use_cache = False`` on every config in ``root`` (encoder-decoders keep one per
    stack); returns the module paths whose config was changed."""
    changed: list[str] = []
    seen: set[int] = set()
    for name, mod in root.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if getattr(cfg, "use_cache", False) is True:
            cfg.use_cache = False
            changed.append(name or type(root).__name__)
    return changed


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[str | type] = (),
    copy_model: bool = True,
    expand_attention: bool = True,
    example_inputs: Sequence[Any] | None = None,
    tracer: str = "auto",
    dynamic_shapes: Any = "auto",
) -> PassResult:
    """Trace ``model`` into a GraphModule (see the module docstring).

    ``leaf_modules``: module paths (``"layer3.0"``) or classes that stay opaque calls. The model is
    deep-copied first unless ``copy_model=False``, so the caller's module is never mutated by later
    passes. ``expand_attention`` first swaps ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``
    (``Layer``) for traceable equivalents with the same parameters (``passes/attention.py``), so
    their projections can be pruned. ``example_inputs`` (positional, ``None`` for inputs not
    given) enable torch.export. ``tracer``: ``"auto"`` (fx, then torch.export), ``"fx"`` or
    ``"export"``. ``dynamic_shapes``: ``"auto"``, ``None`` (every dim fixed) or torch.export's own
    spec for the inputs.
    """
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model) if copy_model else model
        return PassResult(gm, False)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    if tracer not in TRACERS:
        raise TraceError(f"tracer must be one of {list(TRACERS)}, got {tracer!r}")
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(leaf_names - known)
    if unknown:
        raise TraceError(
            f"leaf_modules names {unknown}, which are not submodules of {type(model).__name__}; "
            f"valid names look like {sorted(known - {''})[:5]}"
        )
    if tracer == "export" and example_inputs is None:
        raise TraceError("tracer='export' needs example_inputs: torch.export runs the model")
    if tracer == "export" and (leaf_names or leaf_types):
        raise TraceError(
            "leaf_modules works with the torch.fx tracer only (torch.export has no opaque "
            "modules); pass tracer='fx' or drop leaf_modules"
        )
    root = copy.deepcopy(model) if copy_model else model
    weight_layers = _weight_layers(root)
    switched = _switch_off_caches(root)
    can_generate = getattr(root, "can_generate", None)
    if switched and (not callable(can_generate) or can_generate()):  # encoders keep no cache
        warnings.warn(
            f"{type(model).__name__}: use_cache switched off for tracing (config.use_cache=False "
            f"in {switched[:3]}{' ...' if len(switched) > 3 else ''}): a KV cache is generation "
            "state that neither tracer can return; the compiled module returns no "
            "past_key_values. "
            + (
                "The caller's model is unchanged (result.eager() generates with its cache)"
                if copy_model
                else "The model was traced in place: its config now says use_cache=False"
            ),
            NMCompileWarning,
            stacklevel=2,
        )
    if expand_attention:
        from .attention import make_traceable

        root = make_traceable(root)
    hf = _is_transformers(model)
    use_fx = tracer == "fx" or (tracer == "auto" and not (hf and example_inputs is not None))
    fx_error: Exception | None = None
    fx_tracer = _Tracer(leaf_types, leaf_names)
    if use_fx:
        try:
            graph = fx_tracer.trace(root, concrete_args=_optional_defaults(root, example_inputs))
        except Exception as exc:
            fx_error = exc
        else:
            gm = fx.GraphModule(fx_tracer.root, graph, type(root).__name__)
            gm.train(root.training)
            gm.meta["nm_weight_layers"] = weight_layers
            gm.meta["nm_tracer"] = "fx"
            return PassResult(gm, True)
    can_export = tracer != "fx" and example_inputs is not None and not leaf_names and not leaf_types
    export_error = ""
    if can_export:
        try:
            gm = _trace_by_export(root, tuple(example_inputs), dynamic_shapes)
        except Exception as exp_exc:  # report both failures below
            if fx_error is None:
                raise TraceError(
                    f"torch.export could not trace {type(model).__name__}: "
                    f"{type(exp_exc).__name__}: {str(exp_exc)[:1500]}"
                    + (
                        " (a transformers model: check that the example inputs are the ones its "
                        "forward takes, e.g. input_ids and, for encoder-decoders, "
                        "decoder_input_ids)"
                        if hf
                        else ""
                    )
                ) from exp_exc
            export_error = f" torch.export failed too: {type(exp_exc).__name__}: {exp_exc}"
            export_error = export_error[:600]
        else:
            gm.meta["nm_weight_layers"] = weight_layers
            how = (
                "transformers models do not trace with torch.fx"
                if fx_error is None
                else f"torch.fx could not trace it ({type(fx_error).__name__}: "
                f"{str(fx_error)[:200]})"
            )
            warnings.warn(
                f"{type(model).__name__} traced with torch.export ({how}). Python control flow "
                "follows the branches the example inputs took; " + gm._nm_inputs.describe(),
                NMCompileWarning,
                stacklevel=2,
            )
            return PassResult(gm, True)
    assert fx_error is not None
    where = fx_tracer.failed_at[-1] if fx_tracer.failed_at else ("", type(model).__name__)
    path, cls = where
    label = f"`{path}` ({cls})" if path else f"the top-level module ({cls})"
    fix = (
        f"pass leaf_modules=[{path!r}] to keep it as one opaque call (its weights then stay "
        "dense), or remove Python control flow on tensor values from its forward"
        if path
        else "remove Python control flow on tensor values from forward(), or wrap the "
        "untraceable part in a submodule and list it in leaf_modules"
    )
    if example_inputs is None:
        fix += "; or pass example_inputs so nmcompile can trace it with torch.export"
    raise TraceError(
        f"torch.fx could not trace {label}: {type(fx_error).__name__}: {fx_error}. Fix: {fix}."
        + export_error
    ) from fx_error


def _weight_layers(root: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{module path: (class name, weight shape)}`` of every conv, linear and transformers
    ``Conv1D`` of ``root``, so ``find_sites`` can account for each, called or not."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, mod in root.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or _is_conv1d(mod):
            out[name] = (type(mod).__name__, tuple(w.shape))
    return out


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer whose weight is stored
    ``[in, out]`` and applied with ``addmm``."""
    return (
        type(mod).__name__ == "Conv1D"
        and getattr(getattr(mod, "weight", None), "dim", lambda: 0)() == 2
    )


_ATEN_MODULE_OPS: dict[str, tuple[type, ...]] = {
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "linear": (nn.Linear,),
    "batch_norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "dropout": (nn.Dropout,),
}


def auto_dynamic_shapes(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """The automatic torch.export spec (module docstring): per top-level tensor input, the dims
    that are batch or sequence dims by convention, as ``Dim.AUTO``."""
    auto = torch.export.Dim.AUTO
    spec: list[Any] = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            spec.append(None)
            continue
        dims = {0: auto}
        if x.dim() >= 2 and (not x.is_floating_point() or x.dim() == 3):
            dims[1] = auto
        spec.append(dims)
    return tuple(spec)


@dataclass(frozen=True)
class InputSpec:
    """What a traced module was traced for. ``names``: the forward's parameters in positional
    order (as many as were traced); ``shapes``: per input, its shape with ``None`` for a dynamic
    dim (``None`` for a non-tensor input); ``constants``: the non-tensor values traced (baked
    into the graph); ``dynamic_shapes``: the torch.export spec used."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...] | None, ...]
    given: tuple[bool, ...]  # a tensor (True) or None / a constant (False) at each position
    constants: tuple[Any, ...] = ()
    dynamic_shapes: Any = None

    def describe(self) -> str:
        dyn = [
            f"{n}{[i for i, d in enumerate(s) if d is None]}"
            for n, s in zip(self.names, self.shapes)
            if s is not None and None in s
        ]
        fixed = [
            f"{n}[{', '.join('*' if d is None else str(d) for d in s)}]"
            for n, s in zip(self.names, self.shapes)
            if s is not None
        ]
        if not dyn:
            return (
                f"every input dim is fixed to the example's ({', '.join(fixed)}): a call at "
                "another shape is refused (pass dynamic_shapes=..., or example inputs with a "
                "batch of 2 or more, to keep dims dynamic)"
            )
        return f"dynamic dims: {', '.join(dyn)} (shapes traced: {', '.join(fixed)})"

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Positional inputs in traced order from a call's ``args`` / ``kwargs``, checked."""
        if len(args) > len(self.names):
            raise InputError(
                f"the compiled module takes {len(self.names)} inputs ({list(self.names)}), got "
                f"{len(args)} positional arguments"
            )
        twice = sorted(set(kwargs) & set(self.names[: len(args)]))
        if twice:
            raise InputError(f"{twice} given both by position and by keyword")
        bound = list(args)
        constants = self.constants or (None,) * len(self.names)
        for name, const in zip(self.names[len(args) :], constants[len(args) :]):
            bound.append(kwargs.pop(name, const))
        if kwargs:
            raise InputError(
                f"{sorted(kwargs)} {'is not an input' if len(kwargs) == 1 else 'are not inputs'} "
                f"the module was compiled with (inputs: {list(self.names)}); compile with "
                "example_inputs that include every input you will pass"
            )
        for name, value, given, shape, const in zip(
            self.names, bound, self.given, self.shapes, constants
        ):
            if given and not isinstance(value, torch.Tensor):
                raise InputError(
                    f"input `{name}` is missing: the module was compiled with a tensor there"
                )
            if not given and isinstance(value, torch.Tensor):
                raise InputError(
                    f"input `{name}` was not given when the module was compiled, so the traced "
                    f"graph has no place for it; compile with example_inputs that include `{name}`"
                )
            if not given and _differs(value, const):
                raise InputError(
                    f"input `{name}`={value!r}, but the module was traced with {const!r} there "
                    "and the graph has that value built in; compile with example_inputs that "
                    f"pass {name}={value!r}"
                )
            if shape is not None and isinstance(value, torch.Tensor):
                self._check_shape(name, tuple(value.shape), shape)
        return tuple(bound)

    def _check_shape(self, name: str, got: tuple[int, ...], traced: tuple[int | None, ...]) -> None:
        bad = len(got) != len(traced) or any(t is not None and g != t for g, t in zip(got, traced))
        if not bad:
            return
        if len(got) != len(traced):
            raise InputError(
                f"input `{name}` has {len(got)} dims, the module was traced for {len(traced)}"
            )
        fixed = [i for i, (g, t) in enumerate(zip(got, traced)) if t is not None and g != t]
        raise InputError(
            f"input `{name}` has shape {list(got)}, but the module was traced by torch.export "
            f"for shape {['*' if t is None else t for t in traced]} (* = dynamic): dims {fixed} "
            "are fixed to the example input's sizes (torch.export fixes a dim when the example "
            "has size 0 or 1 there, when dynamic_shapes did not make it dynamic, or when the "
            "model's own code ties it to a constant). Compile "
            "with example inputs of this shape, or pass dynamic_shapes=... to compile"
        )


def placeholder_params(gm: fx.GraphModule) -> list[tuple[str, Any]]:
    """``(name, default)`` of an fx graph's inputs: placeholder targets are the traced forward's
    parameter names, and a placeholder's argument is its default (``inspect.Parameter.empty``
    for a required input)."""
    return [
        (n.target, n.args[0] if n.args else inspect.Parameter.empty)
        for n in gm.graph.nodes
        if n.op == "placeholder"
    ]


def place_keywords(
    kwargs: dict[str, Any],
    params: Sequence[tuple[str, Any]],
    what: str,
    owner: str,
    hint: str = "",
) -> tuple[Any, ...]:
    """``kwargs`` as positional inputs in the order of ``params`` (``(name, default)``, with
    ``inspect.Parameter.empty`` for a required one), up to the last one given; defaults fill
    the gaps. ``what`` / ``owner`` name the caller's inputs and the callee in errors."""
    names = [n for n, _ in params]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise InputError(
            f"{what} names {unknown}, which {owner} does not take as parameters (it takes "
            f"{names}){hint}"
        )
    last = max((names.index(k) for k in kwargs), default=-1)
    out = []
    for name, default in params[: last + 1]:
        if name in kwargs:
            out.append(kwargs[name])
        elif default is not inspect.Parameter.empty:
            out.append(default)
        else:
            raise InputError(f"{what} has no value for `{name}`, a required input of {owner}")
    return tuple(out)


def _differs(value: Any, traced: Any) -> bool:
    """Whether a non-tensor input differs from the value traced (plain values only; anything
    else cannot be compared and is let through)."""
    plain = (type(None), bool, int, float, str)
    if not isinstance(value, plain) or not isinstance(traced, plain):
        return False
    return type(value) is not type(traced) or value != traced


def _check_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """Forward pre-hook of torch.export-traced modules (see :class:`InputSpec`)."""
    spec: InputSpec = module._nm_inputs
    return spec.bind(tuple(args), dict(kwargs)), {}


def input_spec(gm: nn.Module) -> InputSpec | None:
    """The :class:`InputSpec` a torch.export-traced module checks its calls against."""
    return getattr(gm, "_nm_inputs", None)


def _positional_names(root: nn.Module, n: int) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return tuple(f"input_{i}" for i in range(n))
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names += [f"input_{i}" for i in range(len(names), n)]
    return tuple(names[:n])


class AttentionDropout(nn.Module):
    """``scaled_dot_product_attention`` with the dropout probability it was traced with while
    training and none in eval mode (torch.export bakes ``dropout_p`` into the call)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, self.p if self.training else 0.0, is_causal, **kw
        )


def _attention_dropout(node: fx.Node) -> float:
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    return float(p) if isinstance(p, (int, float)) else 0.0


def _trace_by_export(
    root: nn.Module, inputs: tuple[Any, ...], dynamic_shapes: Any = "auto"
) -> fx.GraphModule:
    """``torch.export`` the model and give its graph back its module calls (see module doc)."""
    spec = auto_dynamic_shapes(inputs) if isinstance(dynamic_shapes, str) else dynamic_shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(root, inputs, strict=False, dynamic_shapes=spec)
        except Exception:
            if not isinstance(dynamic_shapes, str) or not any(spec):
                raise
            # the automatic dims are a convenience: a model that cannot keep them dynamic is
            # traced at fixed shapes (InputSpec.describe says so in the tracing warning)
            spec = None
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

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_sdpa = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node) if not node.users else None
            continue
        if node.op != "call_function":
            continue
        op = getattr(node.target, "_overloadpacket", None)
        name = getattr(op, "__name__", "")
        if name == "_assert_tensor_metadata" and not node.users:
            # pins the traced dtype (float32): a cast of the graph to fp16 would trip it
            graph.erase_node(node)
            continue
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
        if name == "scaled_dot_product_attention" and _attention_dropout(node) > 0:
            # traced in training mode, the dropout probability is a constant of the call: give
            # it a module of its own, so eval() switches it off as it does nn.Dropout
            target = f"nm_attention_dropout_{n_sdpa}"
            n_sdpa += 1
            root.add_module(target, AttentionDropout(_attention_dropout(node)))
            with graph.inserting_before(node):
                new = graph.call_module(target, node.args, node.kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
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
    for node in graph.nodes:
        # constants torch.export lifted out of forward (``lifted_tensor_0``) live on its module
        if node.op == "get_attr" and not _has_attr(root, node.target):
            value = _get_attr(g, node.target)
            owner, _, attr = node.target.rpartition(".")
            if owner and not _has_attr(root, owner):
                owner, node.target = "", node.target.replace(".", "_")
                attr = node.target
            holder = root.get_submodule(owner) if owner else root
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                holder.register_buffer(attr, value, persistent=False)  # follows .to(device)
            else:
                setattr(holder, attr, value)
    gm = fx.GraphModule(root, graph, type(root).__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.train(root.training)

    # what each positional input was traced as: tensors take the placeholders in order
    shapes: list[tuple[int | None, ...] | None] = []
    given: list[bool] = []
    flat_ok = all(x is None or isinstance(x, (torch.Tensor, int, float, bool)) for x in inputs)
    # None inputs keep a placeholder of their own in some torch versions and not in others;
    # every other flat input (tensors, and ints / floats / bools) has one
    one_each = len(placeholders) == len(inputs)
    it = iter(placeholders)
    for x in inputs:
        ph = next(it, None) if one_each or x is not None else None
        if isinstance(x, torch.Tensor) and flat_ok:
            val = ph.meta.get("val") if ph is not None else None
            dims = tuple(
                int(d) if isinstance(d, int) else None
                for d in (val.shape if val is not None else x.shape)
            )
            shapes.append(dims)
        else:
            shapes.append(None)
        given.append(isinstance(x, torch.Tensor))
    install_input_spec(
        gm,
        InputSpec(
            names=_positional_names(root, len(inputs)),
            shapes=tuple(shapes),
            given=tuple(given),
            constants=tuple(None if isinstance(x, torch.Tensor) else x for x in inputs),
            dynamic_shapes=spec,
        ),
    )
    gm.meta["nm_tracer"] = "export"
    return gm


def _get_attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_attr(obj: Any, path: str) -> bool:
    try:
        _get_attr(obj, path)
    except AttributeError:
        return False
    return True


def install_input_spec(gm: fx.GraphModule, spec: InputSpec) -> None:
    """Make ``gm`` check its calls against ``spec``; kept through ``copy.deepcopy``."""
    gm.meta.setdefault("_user_preserved_attributes", {})["_nm_inputs"] = spec
    gm._nm_inputs = spec
    _register_check(gm)
    if hasattr(gm, "_deepcopy_hooks"):  # a deepcopy drops forward hooks: put it back
        gm._deepcopy_hooks.append(_register_check)


def _register_check(gm: fx.GraphModule) -> None:
    gm.register_forward_pre_hook(_check_call, with_kwargs=True)


def _optional_defaults(
    root: nn.Module, example_inputs: Sequence[Any] | None = None
) -> dict[str, Any] | None:
    """Forward arguments defaulting to None / a bool are baked in at their defaults: options
    like ``mask=None`` or ``is_causal=False`` would otherwise become graph inputs that Python
    control flow inside the model cannot branch on. An argument the example inputs give a value
    stays an input."""
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    given = {i for i, x in enumerate(example_inputs or ()) if x is not None}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    baked = {
        p.name: p.default
        for i, p in enumerate(positional)
        if i > 0 and i not in given and (p.default is None or isinstance(p.default, bool))
    }
    return baked or None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


_PLAIN_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _opaque_weight_args(gm: fx.GraphModule, n: fx.Node) -> dict[str, fx.Node]:
    """2-D parameters that ``n`` hands to a function the graph does not show (an fx-wrapped
    helper), by argument node name; empty for torch's own ops."""
    if n.op != "call_function":
        return {}
    module = getattr(n.target, "__module__", None) or ""
    if module.split(".")[0] in _PLAIN_MODULES:
        return {}
    out = {}
    for a in [*n.args, *n.kwargs.values()]:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            try:
                p = gm.get_parameter(a.target)
            except AttributeError:
                continue
            if p.dim() == 2:
                out[a.name] = a
    return out


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            probe_args = _opaque_weight_args(self.module, n)
            if probe_args:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                env = {id(self.env[a]): name for name, a in probe_args.items()}
                with WeightProbe(env) as probe:
                    out = n.target(*args, **kwargs)
                n.meta["nm_probe"] = probe.uses
            else:
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
    spec = input_spec(gm)
    if spec is not None:  # torch.export-traced: inputs are flattened by the graph's codegen
        example_inputs = spec.bind(tuple(example_inputs), {})
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders without defaults
    if spec is None and not len(required) <= len(example_inputs) <= len(placeholders):
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
