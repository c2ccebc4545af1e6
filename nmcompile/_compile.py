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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import _dist
from ._config import MethodConfig
from ._errors import ConfigError, InputError
from ._flops import FlopModel, _batch_size
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

    def __post_init__(self) -> None:
        for name in ("prune_stem", "prune_classifier", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compile option {name} must be True or False")


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

    def export_onnx(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        *,
        example_inputs: Sequence[Any] | None = None,
        opset: int | None = None,
        verify: bool = True,
    ):
        """Export to ONNX (masks and BatchNorm folded), checked by onnx, ONNX Runtime and the N:M
        checker before the file lands at ``path``. Returns a ``runtime.ExportResult``."""
        from .runtime import export_onnx

        return export_onnx(
            self.module,
            tuple(example_inputs) if example_inputs is not None else self.example_inputs,
            path,
            dtype=dtype,
            pattern=self.pattern,
            sites=self.sites,
            opset=opset,
            verify=verify,
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
        self.export_onnx(onnx_path, dtype=dtype)
        return build_engine(
            onnx_path,
            path,
            sparse=sparse,
            workspace=workspace,
            timing_cache=timing_cache,
            pattern=str(self.pattern) if self.pattern else "2:4",
        )


def _normalise_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        raise InputError(
            "compile needs example_inputs to trace and count FLOPs: pass "
            "example_inputs=(x,) with a batch the model accepts, e.g. (torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; "
            "write example_inputs=(x,) for one input"
        )
    return tuple(example_inputs)


def compile(
    model: nn.Module,
    method: str = "asp",
    pattern: str | NMPattern = "2:4",
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    trainer: Trainer | None = None,
    **options: Any,
) -> CompileResult:
    """Make ``model`` sparse with ``method`` and return a :class:`CompileResult`.

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
    general = {k: options.pop(k) for k in list(options) if k in _GENERAL}
    config = spec.config_cls.from_options(options, extra_valid=_GENERAL)
    for key in ("include", "exclude", "leaf_modules"):
        if key in general:
            general[key] = _tuple(general[key], key)
    if general.get("exclude") is None:
        general.pop("exclude", None)
    opts = CompileOptions(**general)
    nm = NMPattern.parse(pattern)
    inputs = _normalise_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile expects a torch.nn.Module, got {type(model).__name__}")
    if trainer is not None and not (hasattr(trainer, "train") and hasattr(trainer, "evaluate")):
        raise ConfigError(
            f"trainer must implement train(model, iterations, on_step) and evaluate(model); got "
            f"{type(trainer).__name__}"
        )
    site_pattern = nm if spec.is_structured(config) else None

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        gm = trace(model, leaf_modules=opts.leaf_modules, example_inputs=inputs).graph_module

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
        flops = FlopModel.build(gm, inputs)
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
        session.check_finite(f"in the {type(model).__name__} given to compile")
        spec.run(session, config)

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
    )
