"""ONNX export of a sparse model, checked three ways before the file lands at its path.

1. The masks are folded into the weights and BatchNorm into the convs first (``finalize``): a
   ``Mul(weight, mask)`` left in the graph would hide the sparsity from TensorRT.
2. ``onnx.checker`` accepts the file, and ONNX Runtime (CPU) reproduces the fp32 torch output of
   the reference module: per output, ``max |onnx - torch| <= atol + rtol * max |torch|`` (a scale
   set by the output itself, so random-init logits near fp16's subnormal range are compared on
   the absolute ``atol``). Defaults: rtol 1e-3 / atol 1e-6 for fp32, rtol 2e-2 / atol 1e-4 for
   fp16.
3. The N:M checker reads every pruned weight back from the file (the exporter may transpose and
   rename linear weights into MatMul constants; those are matched back by content and renamed to
   the parameter's name so engine reports and checks speak the model's names).

The file is written into a private staging folder beside the destination and moved over it only
when all checks pass; a model over 2 GB keeps its weights in ``<name>.data`` beside the ``.onnx``
(the ONNX external-data layout), staged and moved with it, so a failed export leaves neither file.
A file exported with a pattern carries ``metadata_props`` naming the pattern and the weights that
were pruned (``nmcompile.pattern``, ``nmcompile.sparse_weights``): ``check_onnx`` reads them back,
so ``nmcompile check`` tells dense-by-design layers (stem, classifier) from broken ones.

Reduced precision: parameters and persistent buffers are cast to ``dtype``; non-persistent
floating buffers (tables the model computes once, such as RoPE's ``inv_freq``) stay fp32 where
the model runs that way (it casts them itself), and are cast too where it does not.
``dynamic_shapes`` (torch.export's spec for the inputs, or ``"auto"``: batch and sequence dims)
makes those dims dynamic axes of the file. The exporters' own log lines (onnxscript, torch.export)
are kept out of the console and shown only when the export fails.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from nmcompile._errors import ExportError, NMViolationError, OutputPathError
from nmcompile._io import _umask, ensure_dir, fsync_dir
from nmcompile._pattern import NMPattern
from nmcompile.passes import PrunableSite, finalize, get_sites, trace

__all__ = [
    "META_PATTERN",
    "META_SPARSE_WEIGHTS",
    "ExportResult",
    "ExporterFailure",
    "export_onnx",
]

_TWO_GB = 2**31 - 2**20
META_PATTERN = "nmcompile.pattern"
META_SPARSE_WEIGHTS = "nmcompile.sparse_weights"  # a JSON list of initializer names


class ExporterFailure(ExportError):
    """``torch.onnx.export`` itself failed (before any check of the file): a caller may retry
    another way (fixed shapes, another form of the model)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    dtype: torch.dtype
    max_rel_error: float | None  # ONNX Runtime vs torch (None when verify=False)
    nm_report: Any  # runtime.onnx_check.OnnxNMReport, or None when no pattern was checked

    def __fspath__(self) -> str:
        return str(self.path)


def _prepare(module: nn.Module, fold: bool = True) -> nn.Module:
    """A CPU, eval-mode copy with masks and BatchNorm folded (when the module traces)."""
    module = copy.deepcopy(module).cpu().eval()
    if not fold:
        return module
    if not isinstance(module, fx.GraphModule):
        try:
            module = trace(module, copy_model=False).graph_module
        except Exception:  # an untraceable model still exports as it is
            return module
    finalize(module, fold_bn=True)
    return module


def _cast(module: nn.Module, dtype: torch.dtype, inputs: Sequence[Any]) -> nn.Module:
    """``module`` in ``dtype`` (module docstring): non-persistent float buffers stay fp32 when
    the model runs so, else they are cast too."""
    if dtype == torch.float32:
        return module
    if isinstance(module, fx.GraphModule) and module.meta.get("nm_tracer") == "export":
        _retype_graph(module, dtype)
    keep: list[tuple[nn.Module, str]] = []
    for mod in module.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(name)
            if b is not None and b.is_floating_point():
                keep.append((mod, name))
    saved = {(id(m), n): m._buffers[n] for m, n in keep}
    module = module.to(dtype)
    if not keep:
        return module
    for m, n in keep:
        m._buffers[n] = saved[(id(m), n)]
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception:  # the model mixes them into dtype math without casting: cast them too
        module = module.to(dtype)
    return module


def _retype_graph(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """A torch.export graph traced in fp32 names float32 in its casts and factories (``to``,
    ``full``, ``arange``); run it in ``dtype``, every float32 becomes ``dtype``. The model code
    (``CompileResult.eager``) is the better source for reduced precision: this keeps no upcast
    the model meant (a norm's variance), and is the fallback when that code does not export."""

    def swap(a: Any) -> Any:
        if a is torch.float32:
            return dtype
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return a

    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            node.args = swap(node.args)
            node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    gm.recompile()


_EXPORT_LOGGERS = (
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch.utils._sympy",
)


@contextlib.contextmanager
def _quiet_export() -> Iterator[io.StringIO]:
    """Capture the exporters' stdout and log records (shown only with a failure)."""
    import logging

    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    saved = []
    for name in _EXPORT_LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate, list(log.handlers)))
        log.handlers = [handler]
        log.propagate = False
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for log, level, propagate, handlers in saved:
            log.setLevel(level)
            log.propagate = propagate
            log.handlers = handlers


def _cast_inputs(inputs: Sequence[Any], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(
        x.detach().cpu().to(dtype)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else (x.detach().cpu() if isinstance(x, torch.Tensor) else x)
        for x in inputs
    )


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """Yield ``<stage>/<dest.name>`` in a private folder beside ``dest``; on success move every
    file of the stage (the model and its external-data file) beside ``dest``, the model last."""
    if dest.is_dir():
        raise OutputPathError(f"the ONNX file {str(dest)!r} is a folder; give a file path")
    folder = ensure_dir(dest.parent if str(dest.parent) else ".", what="folder of the ONNX file")
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        staged = stage / dest.name
        yield staged
        files = sorted(stage.iterdir(), key=lambda f: f == staged)
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())  # mkdtemp's files are private; the usual mode
        for f in files:
            os.replace(f, folder / f.name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _as_numpy(init: Any, base_dir: str, dtype: Any) -> Any:
    """An initializer's values as numpy in ``dtype`` (bf16, which onnx returns as raw uint16 or
    as ml_dtypes' bfloat16 by version, through fp32)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    arr = numpy_helper.to_array(init, base_dir=base_dir)
    if init.data_type == TensorProto.BFLOAT16 and arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _rename_weights(
    model: Any, module: nn.Module, sites: Sequence[PrunableSite], base_dir: str
) -> None:
    """Give constant-folded (transposed) site weights back their parameter names (external data,
    when the model has it, is read from ``base_dir`` and never loaded whole)."""
    import numpy as np

    names = {init.name for init in model.graph.initializer}
    # every 2-D parameter, pruned or not: a dense LM head is named too, not left as ``val_55``
    named = dict(module.named_parameters(remove_duplicate=False))
    params: dict[str, torch.Tensor] = {s.param: named[s.param] for s in sites if s.param in named}
    seen = {id(p) for p in params.values()}
    for name, p in module.named_parameters():
        if p.dim() == 2 and id(p) not in seen:
            params[name] = p
            seen.add(id(p))
    missing = [n for n in params if n not in names]
    if not missing:
        return

    def key(arr: Any) -> tuple[Any, ...]:  # shape and leading values: a cheap fingerprint
        return (arr.shape, arr.reshape(-1)[:64].astype(np.float32).tobytes())

    # every unnamed 2-D initializer read once (external data included) and bucketed by its
    # fingerprint; only a fingerprint's candidates are read again, to compare in full
    buckets: dict[tuple[Any, ...], list[Any]] = {}
    shapes = {tuple(p.shape) for n, p in params.items() if n in missing and p.dim() == 2}
    shapes |= {s[::-1] for s in shapes}
    for init in model.graph.initializer:
        if init.name not in params and tuple(init.dims) in shapes:
            buckets.setdefault(key(_as_numpy(init, base_dir, np.float32)), []).append(init)
    renames: dict[str, str] = {}
    for param in missing:
        w = params[param].detach().cpu()
        if w.dim() != 2:
            continue
        w = w.float()  # compare in fp32: exact for fp16 / bf16 values, and numpy has no bf16
        # a linear weight reaches MatMul transposed; a [in, out] weight (Conv1D) as it is
        for cand in (w.t().contiguous().numpy(), w.contiguous().numpy()):
            hit = next(
                (
                    init
                    for init in buckets.get(key(cand), [])
                    if init.name not in renames
                    and np.array_equal(_as_numpy(init, base_dir, np.float32), cand)
                ),
                None,
            )
            if hit is not None:
                renames[hit.name] = param
                break
    if not renames:
        return
    for init in model.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in model.graph.value_info:
        if vi.name in renames:
            vi.name = renames[vi.name]


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[Any],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    pattern: NMPattern | str | None = None,
    sites: Sequence[PrunableSite] | None = None,
    opset: int | None = None,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic_shapes: Any = None,
    reference: nn.Module | None = None,
    fold: bool = True,
) -> ExportResult:
    """Export ``module`` to ``path`` (see the module docstring); returns what was checked.

    ``pattern``/``sites``: the N:M pattern every site weight must satisfy in the file (``sites``
    defaults to those recorded on a GraphModule by ``find_sites``). ``dynamic_shapes``: None
    (fixed shapes), ``"auto"`` or torch.export's spec. ``reference``: the module whose fp32
    output ONNX Runtime must reproduce (default: ``module`` itself), e.g. the compiled graph when
    ``module`` is the eager model carrying its weights. ``fold=False`` exports ``module`` as it
    is (no tracing, no BatchNorm folding).
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ExportError(f"export dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if sites is None and isinstance(module, fx.GraphModule):
        sites = get_sites(module)
    pattern = NMPattern.parse(pattern) if pattern is not None else None
    prepared = _prepare(module, fold)
    ref_inputs = _cast_inputs(example_inputs, torch.float32)
    with torch.no_grad():
        ref_module = prepared if reference is None else copy.deepcopy(reference).cpu().eval()
        reference_out = _flatten(ref_module(*ref_inputs)) if verify else []
    inputs = _cast_inputs(example_inputs, dtype)
    prepared = _cast(prepared, dtype, inputs)
    nbytes = sum(p.numel() * p.element_size() for p in prepared.state_dict().values())
    if isinstance(dynamic_shapes, str):
        from nmcompile.passes.trace import auto_dynamic_shapes

        dynamic_shapes = auto_dynamic_shapes(inputs)

    import onnx

    with _staged(Path(path)) as tmp:
        with _quiet_export() as log:
            try:
                torch.onnx.export(
                    prepared,
                    inputs,
                    str(tmp),
                    dynamo=True,
                    verbose=False,
                    opset_version=opset,
                    external_data=nbytes > _TWO_GB,
                    dynamic_shapes=dynamic_shapes,
                )
            except Exception as exc:
                logged = log.getvalue().strip()
                raise ExporterFailure(
                    f"torch.onnx.export failed for {type(module).__name__}: "
                    f"{type(exc).__name__}: {_summary(exc)}"
                    + (f"\nexporter log (last lines):\n{logged[-1500:]}" if logged else "")
                ) from exc
        # Only the graph is loaded: external weights stay in their file, read one by one.
        model = onnx.load(str(tmp), load_external_data=False)
        _rename_weights(model, prepared, sites or (), str(tmp.parent))
        if pattern is not None and sites:
            _set_metadata(
                model,
                {
                    META_PATTERN: str(pattern),
                    META_SPARSE_WEIGHTS: json.dumps([s.param for s in sites]),
                },
            )
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc

        max_err = None
        if verify:
            max_err = _verify_ort(tmp, inputs, reference_out, dtype, rtol, atol)
        report = None
        if pattern is not None:
            from .onnx_check import check_onnx

            report = check_onnx(tmp, pattern)
            if sites:
                by_name = {e.initializer: e for e in report.entries}
                missing = [s.param for s in sites if s.param not in by_name]
                bad = [s.param for s in sites if s.param in by_name and not by_name[s.param].ok]
                if bad:
                    raise NMViolationError(
                        f"after export, {len(bad)} pruned weight(s) break {pattern}: {bad[:5]}; "
                        f"{report.summary()}"
                    )
                if missing:
                    raise ExportError(
                        f"pruned weights {missing[:5]} were not found as constants in the exported "
                        "ONNX graph, so their N:M sparsity cannot be verified"
                    )
    if report is not None:
        report = dataclasses.replace(report, path=str(path))
    return ExportResult(Path(path), dtype, max_err, report)


def _summary(exc: BaseException) -> str:
    """The informative part of an exporter error: torch's message carries a generic how-to and
    a dump of the whole graph; keep its first line and the underlying exception's."""
    text = str(exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        first = (str(cause).splitlines() or [""])[0]
        head += f" (cause: {type(cause).__name__}: {first[:500]})"
    return re.sub(r"\x1b\[[0-9;]*m", "", head)[:1500]  # torch colours its messages


def _set_metadata(model: Any, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


_TOLERANCES = {torch.float32: (1e-3, 1e-6), torch.float16: (2e-2, 1e-4)}


def _verify_ort(
    path: Path,
    inputs: Sequence[Any],
    reference: list[torch.Tensor],
    dtype: torch.dtype,
    rtol: float | None,
    atol: float | None,
) -> float | None:
    """Run the file in ONNX Runtime; return the worst ``max|diff| / max|ref|`` over the outputs
    (the module docstring gives the pass rule)."""
    if dtype == torch.bfloat16:
        return None  # ONNX Runtime's CPU provider has no bf16 kernels for most ops
    from .ort import ort_session

    sess = ort_session(path)
    feeds = {
        i.name: x.numpy()
        for i, x in zip(sess.get_inputs(), [x for x in inputs if isinstance(x, torch.Tensor)])
    }
    outs = sess.run(None, feeds)
    d_rtol, d_atol = _TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    what = str(dtype).removeprefix("torch.")
    if len(outs) != len(reference):
        raise ExportError(
            f"ONNX Runtime returned {len(outs)} outputs, the torch reference {len(reference)}"
        )
    worst = 0.0
    for i, (got, ref) in enumerate(zip(outs, reference)):
        got_t = torch.from_numpy(got)
        if got_t.shape != ref.shape:
            raise ExportError(
                f"ONNX Runtime output {i} has shape {tuple(got_t.shape)}, torch "
                f"{tuple(ref.shape)} ({what} export)"
            )
        if not ref.is_floating_point():
            if not torch.equal(got_t.to(ref.dtype), ref):
                raise ExportError(f"ONNX Runtime output {i} ({ref.dtype}) differs from torch")
            continue
        ref_t, got_t = ref.double(), got_t.double()
        finite = torch.isfinite(ref_t)
        if not torch.equal(finite, torch.isfinite(got_t)):
            raise ExportError(
                f"ONNX Runtime output {i} has non-finite values where the torch reference has "
                f"finite ones, or the other way round ({what} export)"
            )
        scale = float(ref_t[finite].abs().max()) if finite.any() else 0.0
        err = float((got_t - ref_t)[finite].abs().max()) if finite.any() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
        if not err <= atol + rtol * scale:
            raise ExportError(
                f"ONNX Runtime output {i} (shape {list(ref.shape)}) differs from the fp32 torch "
                f"output of the compiled module: max |difference| {err:.3g} > atol {atol:g} + "
                f"rtol {rtol:g} x max |reference| {scale:.3g} ({what} export). Pass "
                "export_onnx(..., rtol=, atol=) to accept a larger difference"
            )
    return worst
