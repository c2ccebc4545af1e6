"""``benchmark``: dense vs sparse latency on every backend, same process, same inputs.

Backends:

- ``ort-cpu`` / ``ort-cuda``: ONNX Runtime on the dense and the sparse ONNX files (both exported
  by nmcompile, BatchNorm folded). Its kernels are dense, so this is the baseline ratio (~1.0).
- ``torch``: eager PyTorch, dense vs masked weights (also dense kernels).
- ``torch-2:4``: eager PyTorch with the 2:4 weights compressed by ``to_semi_structured``
  (cuSPARSELt / CUTLASS), vs the dense model. CUDA, fp16 / bf16.
- ``trt``: TensorRT engines from the sparse ONNX file built with and without
  ``SPARSE_WEIGHTS`` (the same weights, so the ratio isolates the sparse kernels).

Each (backend, dtype, batch) pair times dense and sparse interleaved after warm-up: CUDA events
on GPU, synchronous clocks on CPU; median / p90 / p99. On a GPU the torch backends are timed as
CUDA-graph replays (``cuda_graphs=True``, the default): eager, a 2:4 layer's host work (subclass
dispatch, cuSPARSELt plan setup) outlasts its GPU work and the events would time the host; a
capture that fails falls back to eager and the row says so. A backend that cannot run here (no
GPU, no ``tensorrt``, a dtype without kernels) gives a row that says why instead of a number, and
a row that fails (an engine that does not build, CUDA out of memory) gives a row with the error,
not an exception that loses the other rows.

``model`` is a zoo name (random init; the sparse twin is ASP 2:4 without training, which is all
latency needs) or an ``.onnx`` file (dense twin for ONNX Runtime: the zeros of its N:M weights
refilled with small values; for TensorRT: the sparse flag off).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcompile._errors import ConfigError, NMCompileError

from .latency import LatencyStats, speedup, time_interleaved
from .tensorrt import TensorRTNotAvailable

__all__ = ["BACKENDS", "BenchReport", "BenchRow", "benchmark"]

BACKENDS = ("ort-cpu", "ort-cuda", "torch", "torch-2:4", "trt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackendUnavailable(NMCompileError):
    """This backend cannot run here; the message says why."""


@dataclass
class BenchRow:
    backend: str
    dtype: str
    batch: int
    dense: LatencyStats | None = None
    sparse: LatencyStats | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return speedup(self.dense, self.sparse) if self.dense and self.sparse else None

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "dtype": self.dtype,
            "batch": self.batch,
            "dense": self.dense.to_json() if self.dense else None,
            "sparse": self.sparse.to_json() if self.sparse else None,
            "speedup": self.speedup,
            "note": self.note,
            "details": self.details,
        }


@dataclass
class BenchReport:
    model: str
    rows: list[BenchRow]
    settings: dict[str, Any]
    machine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "machine": self.machine,
            "rows": [r.to_json() for r in self.rows],
        }

    def to_markdown(self) -> str:
        from nmcompile._report import md_table

        m = self.machine
        where = f"{m.get('gpu') or m.get('cpu')}; torch {m.get('torch')}"
        body = md_table(
            [
                "backend",
                "dtype",
                "batch",
                "dense median ms (p90)",
                "sparse median ms (p90)",
                "speedup",
                "note",
            ],
            [
                [
                    r.backend,
                    r.dtype,
                    r.batch,
                    f"{r.dense.median_ms:.3f} ({r.dense.p90_ms:.3f})" if r.dense else "-",
                    f"{r.sparse.median_ms:.3f} ({r.sparse.p90_ms:.3f})" if r.sparse else "-",
                    f"{r.speedup:.2f}x" if r.speedup else "-",
                    r.note,
                ]
                for r in self.rows
            ],
        )
        return f"# Latency: {self.model}\n\nMachine: {where}.\n\n{body}\n"

    def plot(self, path: str | os.PathLike) -> Path:
        from nmcompile._report import plot_bars

        measured = [r for r in self.rows if r.speedup]
        labels = [f"{r.backend} {r.dtype} b{r.batch}" for r in measured]
        return plot_bars(
            path,
            labels,
            {
                "dense": [r.dense.median_ms for r in measured],
                "sparse": [r.sparse.median_ms for r in measured],
            },
            title=f"{self.model}: median latency",
            ylabel="ms",
        )

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        from nmcompile._io import atomic_write_json, atomic_write_text, ensure_dir

        folder = ensure_dir(folder)
        out = {
            "json": atomic_write_json(folder / "bench.json", self.to_json()),
            "markdown": atomic_write_text(folder / "bench.md", self.to_markdown()),
        }
        if any(r.speedup for r in self.rows):
            out["png"] = self.plot(folder / "bench.png")
        return out


# -- the two models ------------------------------------------------------------------------------
@dataclass
class _Pair:
    name: str
    dense: nn.Module | None
    sparse: nn.Module | None
    sites: list | None
    input_shape: tuple[int, ...]
    onnx_file: Path | None = None


def _zoo_pair(name: str, input_shape: tuple[int, ...] | None, pattern: str) -> _Pair:
    from nmcompile import compile as nm_compile
    from nmcompile import zoo

    shape = input_shape or zoo.input_shape(name)
    if len(shape) == 3:
        model = zoo.create(
            name,
            num_classes=1000 if shape[-1] >= 224 else 10,
            in_channels=shape[0],
            image_size=shape[-1],
        )
    else:
        model = zoo.create(name, num_classes=2)
    model.eval()
    x = torch.randn(1, *shape)
    # 2:4 on every linear of a transformer (the first one is not a stem there)
    res = nm_compile(
        model,
        "asp",
        pattern,
        example_inputs=(x,),
        finetune_iterations=0,
        prune_stem=len(shape) == 2,
    )
    sparse = res.module.eval()
    return _Pair(name, model, sparse, res.sites, tuple(shape))


def _onnx_input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    return tuple(dims[1:])


def _dense_twin(path: Path, out: Path) -> Path:
    """A copy of ``path`` whose N:M weights have their zeros refilled with small values."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from .onnx_check import check_onnx

    report = check_onnx(path, "2:4")
    names = {e.initializer for e in report.entries if e.ok}
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in names:
            arr = numpy_helper.to_array(init).copy()
            scale = float(np.abs(arr[arr != 0]).mean()) * 1e-3 if (arr != 0).any() else 1e-3
            fill = (rng.standard_normal(arr.shape) * scale).astype(arr.dtype)
            arr = np.where(arr == 0, fill, arr)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(out))
    return out


# -- backends ------------------------------------------------------------------------------------
def _cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable("needs a CUDA GPU; none is visible to torch")


class _Ctx:
    def __init__(self, pair: _Pair, workdir: Path, warmup: int, repeat: int, cuda_graphs: bool):
        self.pair, self.workdir = pair, workdir
        self.warmup, self.repeat, self.cuda_graphs = warmup, repeat, cuda_graphs
        self._onnx: dict[tuple, tuple[Path, Path]] = {}

    def onnx_files(self, dtype: str, batch: int) -> tuple[Path, Path]:
        """(dense, sparse) ONNX files for this dtype and batch, exported once."""
        key = (dtype, batch)
        if key in self._onnx:
            return self._onnx[key]
        from .onnx_export import export_onnx

        p = self.pair
        if p.onnx_file is not None:
            if dtype != "fp32" and dtype != _file_dtype(p.onnx_file):
                raise BackendUnavailable(
                    f"the ONNX file is {_file_dtype(p.onnx_file)}; re-export "
                    f"it in {dtype} to time {dtype}"
                )
            dense = self.workdir / "dense_twin.onnx"
            if not dense.exists():
                _dense_twin(p.onnx_file, dense)
            self._onnx[key] = (dense, p.onnx_file)
            return self._onnx[key]
        x = (torch.randn(batch, *p.input_shape),)
        d = self.workdir / f"{p.name}_dense_{dtype}_b{batch}.onnx"
        s = self.workdir / f"{p.name}_sparse_{dtype}_b{batch}.onnx"
        export_onnx(p.dense, x, d, dtype=DTYPES[dtype], verify=False)
        export_onnx(p.sparse, x, s, dtype=DTYPES[dtype], verify=False, pattern="2:4", sites=p.sites)
        self._onnx[key] = (d, s)
        return d, s


def _file_dtype(path: Path) -> str:
    from .tensorrt import _onnx_float_dtype

    return _onnx_float_dtype(path)


def _bench_ort(ctx: _Ctx, dtype: str, batch: int, provider: str) -> BenchRow:
    from .latency import ort_latency
    from .ort import available_providers

    if provider == "cuda" and "CUDAExecutionProvider" not in available_providers():
        raise BackendUnavailable("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu)")
    if dtype == "bf16":
        raise BackendUnavailable("ONNX Runtime has no bf16 kernels for these ops")
    dense, sparse = ctx.onnx_files(dtype, batch)
    x = torch.randn(batch, *ctx.pair.input_shape)
    stats = ort_latency(
        {"dense": dense, "sparse": sparse},
        (x,),
        provider=provider,
        warmup=ctx.warmup,
        repeat=ctx.repeat,
    )
    return BenchRow(
        f"ort-{provider}",
        dtype,
        batch,
        stats["dense"],
        stats["sparse"],
        note="dense kernels: no 2:4 speedup expected",
    )


def _torch_fns(
    models: dict[str, nn.Module], x: torch.Tensor, graphs: bool
) -> tuple[dict[str, Callable], dict[str, str]]:
    """One callable per model: a CUDA-graph replay where asked and capture works (eager host work
    would otherwise be what is timed), else the eager call; the reasons for any eager fallback."""
    from .latency import capture_cuda_graph

    fns, fallbacks = {}, {}
    for name, m in models.items():

        def run(m=m):
            with torch.inference_mode():
                return m(x)

        if graphs and x.is_cuda:
            cap = capture_cuda_graph(run)
            fns[name] = cap.fn
            if not cap.graph:
                fallbacks[name] = cap.note
        else:
            fns[name] = run
    return fns, fallbacks


def _bench_torch(ctx: _Ctx, dtype: str, batch: int, semi: bool) -> BenchRow:
    p = ctx.pair
    if p.dense is None:
        raise BackendUnavailable("needs a torch model: give a zoo name, not an .onnx file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if semi:
        _cuda()
        if dtype == "fp32":
            raise BackendUnavailable("2:4 semi-structured kernels here take fp16 / bf16")
    elif device == "cpu" and dtype != "fp32":
        raise BackendUnavailable(f"{dtype} eager on CPU is not a deployment path; use fp32")
    dt = DTYPES[dtype]
    dense = copy.deepcopy(p.dense).to(device=device, dtype=dt).eval()
    sparse = copy.deepcopy(p.sparse).to(device=device, dtype=dt).eval()
    x = torch.randn(batch, *p.input_shape, device=device, dtype=dt)
    if x.dim() == 4 and device == "cuda":
        # convnets on the GPU run channels-last (cuDNN's fast fp16 layout; free 1x1-conv GEMMs)
        dense = dense.to(memory_format=torch.channels_last)
        sparse = sparse.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    details: dict[str, Any] = {"device": device}
    if semi:
        from .semi_structured import to_semi_structured

        conv = to_semi_structured(sparse, example_inputs=(x,))
        sparse = conv.module
        details.update(
            converted=len(conv.converted),
            layers=len(conv.decisions),
            max_rel_error=conv.max_rel_error,
            dense_reasons=sorted({d.reason for d in conv.decisions if not d.convert}),
        )
        if not conv.converted:
            raise BackendUnavailable("no layer qualifies for 2:4 kernels: " + conv.summary())
    fns, fallbacks = _torch_fns({"dense": dense, "sparse": sparse}, x, ctx.cuda_graphs)
    stats = time_interleaved(
        fns, warmup=ctx.warmup, repeat=ctx.repeat, cuda_events=device == "cuda"
    )
    note = "" if semi else "masked weights, dense kernels"
    if semi:
        note = f"{details['converted']}/{details['layers']} layers 2:4"
    if device == "cuda":
        details["timing"] = "eager" if not ctx.cuda_graphs or fallbacks else "cuda-graph"
        note += f"; {details['timing']}" if note else details["timing"]
    if fallbacks:
        details["graph_fallback"] = fallbacks
    return BenchRow(
        "torch-2:4" if semi else "torch",
        dtype,
        batch,
        stats["dense"],
        stats["sparse"],
        note=note,
        details=details,
    )


def _bench_trt(ctx: _Ctx, dtype: str, batch: int) -> BenchRow:
    from .tensorrt import TrtRunner, _import_trt, build_engine

    _import_trt()
    _cuda()
    _, sparse_onnx = ctx.onnx_files(dtype, batch)
    plans = {}
    builds = {}
    for label, flag in (("dense", False), ("sparse", True)):
        plan = ctx.workdir / f"{sparse_onnx.stem}_{label}.plan"
        builds[label] = build_engine(
            sparse_onnx, plan, sparse=flag, timing_cache=ctx.workdir / "timing.cache"
        )
        plans[label] = TrtRunner(plan)
    # in the engine's own input dtype, so no cast runs inside the timed calls
    first = plans["dense"]
    x = torch.randn(batch, *ctx.pair.input_shape, device="cuda").to(first.input_dtype(0))
    fns = {k: (lambda r=r: r(x)) for k, r in plans.items()}
    stats = time_interleaved(fns, warmup=ctx.warmup, repeat=ctx.repeat, cuda_events=True)
    rows = builds["sparse"].rows
    picked = sum(1 for r in rows if r["eligible_2_4"] and r["sparse_picked"])
    eligible = sum(1 for r in rows if r["eligible_2_4"])
    return BenchRow(
        "trt",
        dtype,
        batch,
        stats["dense"],
        stats["sparse"],
        note=f"{picked}/{eligible} eligible layers picked sparse tactics",
        details={"engine": builds["sparse"].to_json(), "command": builds["sparse"].command},
    )


def _failed_row(backend: str, dtype: str, batch: int, exc: Exception) -> BenchRow:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what an out-of-memory row held, before the next row
    message = " ".join(str(exc).split())[:400]
    return BenchRow(
        backend,
        dtype,
        batch,
        note=f"failed: {type(exc).__name__}: {message}",
        details={"error": type(exc).__name__, "message": str(exc)[:2000]},
    )


def benchmark(
    model: str | os.PathLike,
    *,
    backends: Sequence[str] = ("ort-cpu", "torch"),
    dtypes: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1,),
    input_shape: Sequence[int] | None = None,
    pattern: str = "2:4",
    warmup: int = 10,
    repeat: int = 50,
    cuda_graphs: bool = True,
    workdir: str | os.PathLike | None = None,
) -> BenchReport:
    """Time dense vs sparse ``model`` on each backend, dtype and batch size (module docstring)."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown backends {unknown}; valid backends: {list(BACKENDS)}")
    bad = sorted(set(dtypes) - set(DTYPES))
    if bad:
        raise ConfigError(f"unknown dtypes {bad}; valid dtypes: {list(DTYPES)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    path = Path(str(model))
    if path.suffix == ".onnx" or path.is_file():
        from .onnx_check import check_onnx

        check_onnx(path, pattern)  # a clear error for a file that is not ONNX
        shape = tuple(input_shape) if input_shape else _onnx_input_shape(path)
        pair = _Pair(path.stem, None, None, None, shape, onnx_file=path)
    else:
        pair = _zoo_pair(str(model), tuple(input_shape) if input_shape else None, pattern)
    from nmcompile._machine import machine_info

    rows: list[BenchRow] = []
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nmcompile-bench-"))
        wd = Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        ctx = _Ctx(pair, wd, warmup, repeat, cuda_graphs)
        for dtype in dtypes:
            for batch in batch_sizes:
                for backend in backends:
                    try:
                        if backend in ("ort-cpu", "ort-cuda"):
                            row = _bench_ort(ctx, dtype, int(batch), backend.split("-")[1])
                        elif backend in ("torch", "torch-2:4"):
                            row = _bench_torch(ctx, dtype, int(batch), backend == "torch-2:4")
                        else:
                            row = _bench_trt(ctx, dtype, int(batch))
                    except BackendUnavailable as exc:
                        row = BenchRow(backend, dtype, int(batch), note=f"skipped: {exc}")
                    except TensorRTNotAvailable:
                        row = BenchRow(
                            backend,
                            dtype,
                            int(batch),
                            note="skipped: the tensorrt package is not installed",
                        )
                    except Exception as exc:
                        # one row failing (an engine that does not build, CUDA out of memory at
                        # the largest batch, an export error) must not lose the others
                        row = _failed_row(backend, dtype, int(batch), exc)
                    rows.append(row)
    settings = {
        "backends": list(backends),
        "dtypes": list(dtypes),
        "batch_sizes": [int(b) for b in batch_sizes],
        "input_shape": list(pair.input_shape),
        "pattern": pattern,
        "warmup": warmup,
        "repeat": repeat,
        "cuda_graphs": cuda_graphs,
    }
    return BenchReport(pair.name, rows, settings, machine_info())
