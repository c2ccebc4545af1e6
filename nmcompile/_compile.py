"""``compile``: the one call. Trace, find sites, insert masks, run the method, finalize.

::

    nn.Module --trace--> GraphModule --find_sites--> --insert_masks--> masked GraphModule
        (method rounds: trainer.train -> scores -> masks rewritten in place)
      --finalize--> GraphModule with N:M-zeroed weights (CompileResult.module)

The caller's model is never mutated: tracing works on a deep copy. The run's randomness (dropout,
the trainer's shuffling when it uses the global RNG) is seeded from the method's ``seed`` inside a
forked RNG, so the caller's RNG state is left as it was.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import _dist, _resume
from ._config import MethodConfig
from ._errors import ConfigError, ExportError, InputError, NMCompileWarning
from ._flops import FlopModel, _batch_size, count_total
from ._pattern import NMPattern
from ._registry import get_method
from ._session import Session
from ._trainer import Trainer
from .passes import (
    ExcludedLayer,
    PrunableSite,
    check_nm,
    finalize,
    find_sites,
    get_excluded,
    get_masks,
    get_sites,
    insert_masks,
    nm_invariant,
    propagate_shapes,
    run_passes,
    shrink_channels,
    trace,
)
from .passes.trace import TRACERS
from .runtime.onnx_export import ExporterFailure

__all__ = ["CompileOptions", "CompileResult", "compile"]


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Options of ``compile`` that are not the method's own."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    prune_stem: bool = False
    prune_classifier: bool = False
    leaf_modules: tuple[str | type, ...] = ()
    debug: bool = False
    tracer: str = "auto"  # "auto" (torch.fx, then torch.export), "fx" or "export"
    # torch.export only: "auto" (batch / sequence dims dynamic), None (fixed shapes), or
    # torch.export's own dynamic_shapes spec for the inputs
    dynamic_shapes: Any = "auto"

    def __post_init__(self) -> None:
        for name in ("prune_stem", "prune_classifier", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compile option {name} must be True or False")
        if self.tracer not in TRACERS:
            raise ConfigError(
                f"compile option tracer must be one of {list(TRACERS)}, got {self.tracer!r}"
            )
        d = self.dynamic_shapes
        if not (d is None or d is False or d == "auto" or isinstance(d, (tuple, list, dict))):
            raise ConfigError(
                "compile option dynamic_shapes must be 'auto', None (fixed shapes) or "
                f"torch.export's dynamic_shapes for the inputs (a tuple or dict), got {d!r}"
            )


_GENERAL = tuple(f for f in CompileOptions.__dataclass_fields__)


def _tuple(value: Any, name: str) -> tuple:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise ConfigError(
            f"compile option {name} must be a list of names, not the string {value!r}"
        )
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(
            f"compile option {name} must be a list, got {type(value).__name__}"
        ) from None


@dataclass
class CompileResult:
    """What ``compile`` returns.

    ``module``: the sparse model, masks folded into the weights (BatchNorm kept, so it can still be
    trained or evaluated as the original). ``masked``: the same with mask nodes, for further
    training with the masks enforced. ``masks``: ``{parameter fqn: bool tensor}``. ``history``:
    one dict per round with at least ``round``, ``sparsity``, ``accuracy`` (top-1 in [0, 1], None
    without validation data) and ``train_flops`` (cumulative).
    """

    module: fx.GraphModule
    masked: fx.GraphModule
    masks: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    method: str
    config: MethodConfig
    pattern: NMPattern | None
    sites: list[PrunableSite]
    excluded: list[ExcludedLayer]
    flops: FlopModel
    example_inputs: tuple[Any, ...] = field(repr=False)
    model_name: str = "model"
    diagnostics: dict[str, Any] = field(default_factory=dict)
    shrink: Any = None  # passes.ShrinkReport when the method removed channels
    deployed_flops: FlopModel | None = None  # FLOPs of ``module`` after channel removal
    # the caller's model (not a copy): a torch.export-traced result is exported to ONNX from a
    # copy of it that carries this result's weights, so dtype casts follow the model's own code
    source: nn.Module | None = field(default=None, repr=False)

    @property
    def tracer(self) -> str:
        """``"fx"`` or ``"export"``: how the model was traced."""
        return self.module.meta.get("nm_tracer", "fx")

    @property
    def input_spec(self) -> Any:
        """The inputs a torch.export-traced result takes (names, shapes, dynamic dims; see
        ``passes.trace.InputSpec``), or None for an fx graph, which runs at any shape."""
        from .passes.trace import input_spec

        return input_spec(self.module)

    def eager(self) -> nn.Module:
        """A copy of the caller's model carrying this result's (pruned) weights, in eval mode on
        the CPU: the model's own code, for what a traced graph cannot do (fp16 export of a
        torch.export-traced model, generation with a KV cache: the model's config is kept as the
        caller had it)."""
        if self.source is None:
            raise ConfigError("this result keeps no reference to the model it was compiled from")
        from .passes.attention import make_traceable

        eager = make_traceable(copy.deepcopy(self.source).cpu().eval())
        state = self.module.state_dict()
        known = eager.state_dict()
        lost = [s.param for s in self.sites if s.param not in known]
        if lost:
            raise ConfigError(
                f"the compiled weights {lost[:3]} have no place in {type(self.source).__name__} "
                "(was the model changed after compile?)"
            )
        resized = [k for k, v in state.items() if k in known and known[k].shape != v.shape]
        if resized:
            raise ConfigError(
                f"the compiled weights {resized[:3]} changed shape (channels were removed), so "
                f"{type(self.source).__name__} cannot hold them: use result.module"
            )
        eager.load_state_dict({k: v for k, v in state.items() if k in known}, strict=False)
        return eager

    @property
    def sparsity(self) -> float:
        """Pruned fraction of the pruned layers' original weights (removed channels count as
        pruned)."""
        total = sum(s.numel for s in self.sites)
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layers(self) -> list[dict[str, Any]]:
        """Per-site table rows: name, kind, shape, density, N:M ok, dense / sparse forward FLOPs."""
        nm = (
            {e.param: e for e in check_nm(self.masked, self.pattern).entries}
            if self.pattern
            else {}
        )
        rows = []
        deployed = self.deployed_flops or self.flops
        for s in self.sites:
            mask = self.masks[s.param]
            rows.append(
                {
                    "layer": s.name,
                    "param": s.param,
                    "kind": s.kind,
                    "shape": list(mask.shape),  # after channel removal, when the method shrinks
                    "density": float(mask.sum()) / s.numel,  # of the original weight
                    "nm_ok": nm[s.param].ok if s.param in nm else None,
                    "forward_flops_dense": self.flops.sites.get(s.param, 0.0),
                    "forward_flops_sparse": deployed.sites.get(s.param, 0.0)
                    * float(mask.float().mean()),
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        deployed = self.deployed_flops or self.flops
        # density within each (possibly shrunk) deployed layer
        densities = {s.param: float(self.masks[s.param].float().mean()) for s in self.sites}
        return {
            "method": self.method,
            "pattern": str(self.pattern) if self.pattern else "unstructured",
            "sites": len(self.sites),
            "excluded": len(self.excluded),
            "sparsity": self.sparsity,
            "accuracy": last.get("accuracy"),
            "train_flops": last.get("train_flops", 0.0),
            "forward_flops_dense": self.flops.dense,
            "forward_flops_sparse": deployed.forward(densities),
            "config": self.config.to_json(),
            **(
                {
                    "params_before_shrink": self.shrink.params_before,
                    "params_after_shrink": self.shrink.params_after,
                }
                if self.shrink
                else {}
            ),
        }

    def report(self, *, level: int = 1) -> str:
        """A Markdown report: summary, rounds, per-layer table, excluded layers."""
        from ._report import render_markdown

        return render_markdown(self, level=level)

    def _model_code(self, eager_attention: bool = False) -> nn.Module:
        """:meth:`eager` as export takes it: caches off, optionally transformers' plain softmax
        attention; a model whose weights it cannot hold is a failed form, not an error."""
        from .passes.trace import _switch_off_caches

        try:
            eager = self.eager()
        except ConfigError as exc:
            raise ExporterFailure(str(exc)) from exc
        _switch_off_caches(eager)
        if eager_attention:
            eager.set_attn_implementation("eager")
        return eager

    def export_onnx(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        *,
        example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
        opset: int | None = None,
        verify: bool = True,
        rtol: float | None = None,
        atol: float | None = None,
        dynamic_shapes: Any = "traced",
    ):
        """Export to ONNX (masks and BatchNorm folded), checked by onnx, ONNX Runtime and the N:M
        checker before the file lands at ``path``. Returns a ``runtime.ExportResult``.

        ``dynamic_shapes="traced"``: a torch.export-traced result keeps the dims it was traced
        with dynamic as dynamic axes of the file (an fx-traced one is exported at the example's
        shapes); ``None`` fixes every dim; ``"auto"`` or torch.export's spec choose. A
        torch.export-traced result is exported from :meth:`eager` (the model's own code with
        these weights), so casts to fp16 keep what the model keeps in fp32, and ONNX Runtime
        must reproduce the compiled graph's fp32 output within ``rtol`` / ``atol``.
        """
        from .passes.trace import input_spec
        from .runtime import export_onnx

        inputs = (
            _normalise_inputs(example_inputs, self.source)
            if example_inputs is not None
            else self.example_inputs
        )
        spec = input_spec(self.module)
        if dynamic_shapes == "traced":
            dynamic_shapes = spec.dynamic_shapes if spec is not None else None
        # The ways to try, best first: the model's own code with these weights (a
        # torch.export-traced result), then the compiled graph; dynamic axes, then fixed shapes.
        # Only a failure of the exporter itself moves on; a file that fails a check does not.
        forms: list[tuple[str, Any, Any, bool]] = [("graph", self.module, None, True)]
        if spec is not None and self.source is not None:
            forms[:0] = [("model code", self._model_code, self.module, False)]
            if hasattr(self.source, "set_attn_implementation"):
                # transformers' plain softmax attention: the same function, and what an ONNX
                # file holds anyway (torch.onnx decomposes sdpa, and for some models, T5, gets
                # the decomposed output's strides wrong)
                forms.insert(
                    0,
                    (
                        "model code with eager attention",
                        lambda: self._model_code(eager_attention=True),
                        self.module,
                        False,
                    ),
                )
        shapes = [dynamic_shapes, None] if dynamic_shapes is not None else [None]
        failures: list[str] = []
        for dyn in shapes:  # a file with dynamic axes first, whatever form gives it
            for form, module, reference, fold in forms:
                try:
                    out = export_onnx(
                        module()
                        if callable(module) and not isinstance(module, nn.Module)
                        else module,
                        inputs,
                        path,
                        dtype=dtype,
                        pattern=self.pattern,
                        sites=self.sites,
                        opset=opset,
                        verify=verify,
                        rtol=rtol,
                        atol=atol,
                        dynamic_shapes=dyn,
                        reference=reference,
                        fold=fold,
                    )
                except ExporterFailure as exc:
                    failures.append(
                        f"{form}, {'dynamic' if dyn is not None else 'fixed'} shapes: {exc}"
                    )
                    continue
                if failures:
                    warnings.warn(
                        f"ONNX export of {self.model_name} succeeded from the "
                        f"{'compiled graph' if form == 'graph' else form} with "
                        f"{'dynamic' if dyn is not None else 'fixed (example) shapes'} after "
                        f"{len(failures)} failed attempt(s): "
                        + " | ".join(f[:300] for f in failures),
                        NMCompileWarning,
                        stacklevel=2,
                    )
                return out
        raise ExportError(
            f"ONNX export of {self.model_name} failed every way tried: " + " | ".join(failures)
        )

    def build_engine(
        self,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float16,
        sparse: bool = True,
        workspace: int | None = None,
        timing_cache: str | os.PathLike | None = None,
    ):
        """Export ONNX in ``dtype`` (``path`` with suffix ``.onnx``) and build a TensorRT plan at
        ``path`` with sparse weights; returns a ``runtime.tensorrt.EngineBuild`` whose
        ``report()`` says per layer whether it was eligible for 2:4 and ran a sparse tactic."""
        from pathlib import Path

        from .runtime.tensorrt import _import_trt, build_engine

        _import_trt()  # fail before exporting when TensorRT is missing
        onnx_path = Path(path).with_suffix(".onnx")
        # fixed shapes: an engine is built for the example's shapes (no optimization profile)
        self.export_onnx(onnx_path, dtype=dtype, dynamic_shapes=None)
        return build_engine(
            onnx_path,
            path,
            sparse=sparse,
            workspace=workspace,
            timing_cache=timing_cache,
            pattern=str(self.pattern) if self.pattern else "2:4",
        )


def _normalise_inputs(example_inputs: Any, model: Any = None) -> tuple[Any, ...]:
    """Positional example inputs. A mapping (keyword inputs, e.g. a tokenizer's output) is bound
    to the forward's parameters: ``{"input_ids": x, "decoder_input_ids": y}`` for
    ``forward(input_ids, attention_mask=None, decoder_input_ids=None)`` becomes
    ``(x, None, y)``; the compiled module takes the same keywords back."""
    if example_inputs is None:
        raise InputError(
            "compile needs example_inputs to trace and count FLOPs: pass "
            "example_inputs=(x,) with a batch the model accepts, e.g. (torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return _bind_keywords(dict(example_inputs), model)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tuple of inputs or a dict of keyword inputs, got "
            f"{type(example_inputs).__name__}; write example_inputs=(x,) for one input"
        )
    return tuple(example_inputs)


def _bind_keywords(kwargs: dict[str, Any], model: Any) -> tuple[Any, ...]:
    import inspect

    from .passes.trace import place_keywords

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        raise InputError(
            "example_inputs is a dict, but the model's forward signature cannot be read to "
            "place the keywords; pass a tuple of positional inputs"
        ) from None
    return place_keywords(
        kwargs,
        [
            (p.name, p.default)
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ],
        "example_inputs",
        f"{type(model).__name__}.forward",
        "; keywords that only reach **kwargs cannot be traced as inputs",
    )


def compile(
    model: nn.Module,
    method: str = "asp",
    pattern: str | NMPattern = "2:4",
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    trainer: Trainer | None = None,
    calibration: Iterable[Any] | None = None,
    **options: Any,
) -> CompileResult:
    """Make ``model`` sparse with ``method`` and return a :class:`CompileResult`.

    ``calibration``: input batches (tensors, tuples of positional inputs or dicts of keyword
    inputs) for the methods that prune from calibration data (``wanda``, ``sparsegpt``).

    ``options`` are the method's config fields (see ``nmcompile.methods()`` and each config) plus
    the general ones: ``include`` / ``exclude`` (module-path patterns), ``prune_stem``,
    ``prune_classifier``, ``leaf_modules``, ``debug`` (check every pass's claims and the N:M
    invariant).

    >>> import torch, nmcompile
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
    ...                           torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> r = nmcompile.compile(net, "asp", "2:4", example_inputs=(torch.randn(4, 8),))
    >>> sorted(r.masks), round(r.sparsity, 2)
    (['2.weight'], 0.5)
    """
    spec = get_method(method)
    if calibration is not None and "calibration_samples" not in spec.config_cls.options():
        raise ConfigError(
            "calibration= is read by the methods that prune from calibration data (wanda, "
            f"sparsegpt); {spec.name!r} does not use it: drop it"
        )
    general = {k: options.pop(k) for k in list(options) if k in _GENERAL}
    config = spec.config_cls.from_options(options, extra_valid=_GENERAL)
    for key in ("include", "exclude", "leaf_modules"):
        if key in general:
            general[key] = _tuple(general[key], key)
    if general.get("exclude") is None:
        general.pop("exclude", None)
    if general.get("dynamic_shapes") is False:
        general["dynamic_shapes"] = None
    opts = CompileOptions(**general)
    nm = NMPattern.parse(pattern)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _normalise_inputs(example_inputs, model)
    if trainer is not None and not (hasattr(trainer, "train") and hasattr(trainer, "evaluate")):
        raise ConfigError(
            f"trainer must implement train(model, iterations, on_step) and evaluate(model); got "
            f"{type(trainer).__name__}"
        )
    site_pattern = nm if spec.is_structured(config) else None

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        gm = trace(
            model,
            leaf_modules=opts.leaf_modules,
            example_inputs=inputs,
            tracer=opts.tracer,
            dynamic_shapes=opts.dynamic_shapes,
        ).graph_module
        # one forward: shapes, dense FLOPs, and what opaque calls do with weights (find_sites)
        total_flops = count_total(gm, inputs)

        def find_sites_(g: fx.GraphModule):
            return find_sites(
                g,
                site_pattern,
                include=opts.include,
                exclude=opts.exclude,
                prune_stem=opts.prune_stem,
                prune_classifier=opts.prune_classifier,
            )

        gm = run_passes(gm, [find_sites_], check_modified=opts.debug).graph_module
        sites = get_sites(gm)
        if not sites:
            reasons = "; ".join(f"{e.name}: {e.reason}" for e in get_excluded(gm)) or "none found"
            raise ConfigError(
                f"no prunable layer in {type(model).__name__}: every conv/linear was excluded "
                f"({reasons}). Use prune_stem=True / prune_classifier=True, or include=[...]"
            )
        flops = FlopModel.from_shapes(gm, total_flops, _batch_size(inputs))
        factory = spec.masker(config, site_pattern) if spec.masker is not None else None

        def insert_masks_(g: fx.GraphModule):
            return insert_masks(g, mask_module=factory)

        insert_masks_.__name__ = "insert_masks"
        gm = run_passes(gm, [insert_masks_], check_modified=opts.debug).graph_module
        if _dist.maybe_init(getattr(trainer, "device", None)):
            _dist.broadcast_module_(gm)  # every rank starts from rank 0's weights and masks
        session = Session(
            gm,
            sites,
            pattern=site_pattern,
            trainer=trainer,
            flops=flops,
            fallback_batch=_batch_size(inputs),
            example_inputs=inputs,
        )
        session.calibration = calibration
        session.check_finite(f"in the {type(model).__name__} given to compile")
        checkpoints = _resume.setup(session, config)
        spec.run(session, config)
        _resume.report(session, config, checkpoints)

    if opts.debug and site_pattern is not None:
        nm_invariant(site_pattern)(gm)
    module = copy.deepcopy(gm)
    shrink = deployed = None
    if spec.shrink:
        # remove the channels the method emptied; masks shrink with their weights
        device = next(module.parameters()).device
        propagate_shapes(
            module, tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        )
        shrink_channels(module)
        shrink = module.meta["nm_shrink"]
        deployed = FlopModel.build(
            module, tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        )
    masks = {p: m.detach().cpu() for p, m in get_masks(module).items()}
    run_passes(module, [finalize], check_modified=opts.debug)
    return CompileResult(
        module=module,
        masked=gm,
        masks=masks,
        history=session.history,
        method=spec.name,
        config=config,
        pattern=site_pattern,
        sites=sites,
        excluded=get_excluded(gm),
        flops=flops,
        example_inputs=inputs,
        model_name=type(model).__name__,
        diagnostics=session.diagnostics,
        shrink=shrink,
        deployed_flops=deployed,
        source=model,
    )
