"""ONNX export of a sparse model, checked three ways before the file lands at its path.

1. The masks are folded into the weights and BatchNorm into the convs first (``finalize``): a
   ``Mul(weight, mask)`` left in the graph would hide the sparsity from TensorRT.
2. ``onnx.checker`` accepts the file, and ONNX Runtime (CPU) reproduces the torch output within
   ``rtol`` (relative L2 error; 1e-3 for fp32, 1e-2 for fp16 against the fp32 reference).
3. The N:M checker reads every pruned weight back from the file (the exporter may transpose and
   rename linear weights into MatMul constants; those are matched back by content and renamed to
   the parameter's name so engine reports and checks speak the model's names).

The file is written into a private staging folder beside the destination and moved over it only
when all checks pass; a model over 2 GB keeps its weights in ``<name>.data`` beside the ``.onnx``
(the ONNX external-data layout), staged and moved with it, so a failed export leaves neither file.
A file exported with a pattern carries ``metadata_props`` naming the pattern and the weights that
were pruned (``nmcompile.pattern``, ``nmcompile.sparse_weights``): ``check_onnx`` reads them back,
so ``nmcompile check`` tells dense-by-design layers (stem, classifier) from broken ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
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

__all__ = ["META_PATTERN", "META_SPARSE_WEIGHTS", "ExportResult", "export_onnx"]

_TWO_GB = 2**31 - 2**20
META_PATTERN = "nmcompile.pattern"
META_SPARSE_WEIGHTS = "nmcompile.sparse_weights"  # a JSON list of initializer names


@dataclass(frozen=True)
class ExportResult:
    path: Path
    dtype: torch.dtype
    max_rel_error: float | None  # ONNX Runtime vs torch (None when verify=False)
    nm_report: Any  # runtime.onnx_check.OnnxNMReport, or None when no pattern was checked

    def __fspath__(self) -> str:
        return str(self.path)


def _prepare(module: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy with masks and BatchNorm folded (when the module traces)."""
    module = copy.deepcopy(module).cpu().eval()
    if not isinstance(module, fx.GraphModule):
        try:
            module = trace(module, copy_model=False).graph_module
        except Exception:  # an untraceable model still exports as it is
            return module
    finalize(module, fold_bn=True)
    return module


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


def _rename_weights(
    model: Any, module: nn.Module, sites: Sequence[PrunableSite], base_dir: str
) -> None:
    """Give constant-folded (transposed) site weights back their parameter names (external data,
    when the model has it, is read from ``base_dir`` and never loaded whole)."""
    import numpy as np
    from onnx import numpy_helper

    names = {init.name for init in model.graph.initializer}
    missing = [s for s in sites if s.param not in names]
    if not missing:
        return
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for init in model.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    renames: dict[str, str] = {}
    for site in missing:
        w = module.get_parameter(site.param).detach().cpu()
        if w.dim() != 2:
            continue
        wt = w.t().contiguous().numpy()
        for init in by_shape.get(tuple(wt.shape), []):
            if init.name in renames or init.name in {s.param for s in sites}:
                continue
            if np.array_equal(numpy_helper.to_array(init, base_dir=base_dir), wt):
                renames[init.name] = site.param
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
) -> ExportResult:
    """Export ``module`` to ``path`` (see the module docstring); returns what was checked.

    ``pattern``/``sites``: the N:M pattern every site weight must satisfy in the file (``sites``
    defaults to those recorded on a GraphModule by ``find_sites``).
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ExportError(f"export dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if sites is None and isinstance(module, fx.GraphModule):
        sites = get_sites(module)
    pattern = NMPattern.parse(pattern) if pattern is not None else None
    prepared = _prepare(module)
    ref_inputs = _cast_inputs(example_inputs, torch.float32)
    with torch.no_grad():
        reference = _flatten(prepared(*ref_inputs)) if verify else []
    prepared = prepared.to(dtype)
    inputs = _cast_inputs(example_inputs, dtype)
    nbytes = sum(p.numel() * p.element_size() for p in prepared.state_dict().values())

    import onnx

    with _staged(Path(path)) as tmp:
        try:
            sink = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    prepared,
                    inputs,
                    str(tmp),
                    dynamo=True,
                    verbose=False,
                    opset_version=opset,
                    external_data=nbytes > _TWO_GB,
                )
        except Exception as exc:
            raise ExportError(
                f"torch.onnx.export failed for {type(module).__name__}: {type(exc).__name__}: "
                f"{str(exc)[:2000]}"
            ) from exc
        # Only the graph is loaded: external weights stay in their file, read one by one.
        model = onnx.load(str(tmp), load_external_data=False)
        if sites:
            _rename_weights(model, prepared, sites, str(tmp.parent))
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
            max_err = _verify_ort(tmp, inputs, reference, dtype, rtol)
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


def _set_metadata(model: Any, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _verify_ort(
    path: Path,
    inputs: Sequence[Any],
    reference: list[torch.Tensor],
    dtype: torch.dtype,
    rtol: float | None,
) -> float | None:
    if dtype == torch.bfloat16:
        return None  # ONNX Runtime's CPU provider has no bf16 kernels for most ops
    from .ort import ort_session

    sess = ort_session(path)
    feeds = {
        i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs) if isinstance(x, torch.Tensor)
    }
    outs = sess.run(None, feeds)
    tol = rtol if rtol is not None else (1e-3 if dtype == torch.float32 else 1e-2)
    worst = 0.0
    for got, ref in zip(outs, reference):
        got_t = torch.from_numpy(got).float()
        ref_t = ref.float()
        if got_t.shape != ref_t.shape:
            raise ExportError(
                f"ONNX Runtime output shape {tuple(got_t.shape)} != torch {tuple(ref_t.shape)}"
            )
        err = float((got_t - ref_t).norm() / ref_t.norm().clamp_min(1e-12))
        worst = max(worst, err)
    if not worst <= tol:
        raise ExportError(
            f"ONNX Runtime output differs from torch: relative error {worst:.3g} > {tol:g} "
            f"({str(dtype).removeprefix('torch.')} export)"
        )
    return worst
