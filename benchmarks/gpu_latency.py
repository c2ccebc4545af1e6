"""2:4 latency on an NVIDIA GPU (H100 / H200): cuSPARSELt 2:4 kernels vs dense, as CUDA graphs.

Parts (``--parts``, run in this order):

- ``linear``: single linear layers, weight ``[out, in]``, ``tokens`` rows of input. Candidates:
  dense ``F.linear``; torch's own ``to_sparse_semi_structured`` weight (the ceiling: what torch's
  API gives on this shape); nmcompile's ``SemiStructuredLinear`` (our path, 3-D input).
- ``bert`` (a BERT-base-sized encoder, 12 x 768 / 3072, seq 128), ``vit`` (torchvision vit_b_16,
  224x224, the packed qkv projections included), ``resnet50`` (channels-last; only its 1x1 convs
  and the classifier have 2:4 kernels in torch). Candidates: ``dense`` (the untraced model),
  ``masked`` (nmcompile's compiled graph with the 2:4 weights on dense kernels: the same graph as
  the sparse one), ``sparse`` (that graph with every eligible weight on 2:4 kernels), and
  ``torch_sparse`` (the untraced model with torch's ``to_sparse_semi_structured`` on its
  ``nn.Linear`` weights: the ceiling our path is compared to).
- ``trt``: TensorRT engines of the BERT encoder and resnet50 (when ``tensorrt`` is installed).

Timing. Every candidate is captured as a ``torch.cuda.CUDAGraph`` after warm-up and its replays
timed with CUDA events: eager calls of a 2:4 linear cost tens of microseconds of host work
(tensor-subclass dispatch, cuSPARSELt plan setup) against a few microseconds of GPU work, so eager
timing measures the host. Eager calls are timed too and reported labelled ("eager": what users
running the module as-is get). All candidates and both modes of one row are timed interleaved
(median, p90, p99 of ``--repeat``), after checking each sparse output against the dense one.
A capture that fails falls back to eager and says so in the row. The headline ``speedup`` of a
model row is ``masked / sparse`` (the same graph, dense vs 2:4 kernels); ``speedup_vs_untraced``
(``dense / sparse``) is beside it.

Before the first row (the preflight, in the run's first seconds): cuSPARSELt availability (and
whether CUTLASS could stand in: SM8x only), a second of large GEMMs to bring the clocks up, the
output layout of a converted linear (must be row-major: a column-major activation sends attention
to SDPA's math path and makes norms copy), and one CUDA-graph capture of a 2:4 linear.

Device time is scarce: the JSON (and a Markdown table beside it) is rewritten atomically after
every row, a SIGTERM writes what was measured and why it stopped, and ``--budget-s`` (default 360
under ``--quick``) is checked before every row.

``--dry-run`` runs every part on CPU (bf16, small shapes) through torch's real semi-structured
classes with CPU stand-in kernels (``nmcompile.runtime.semi_structured_standin``): it checks the
script, not the speed; its timings are CPU numbers and labelled so. A test runs a reduced dry run.

On a GPU host without network access: ``bash benchmarks/gpu_run.sh`` (installs nmcompile without
its dependencies and runs this with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results"
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("linear", "bert", "vit", "resnet50", "trt")

# (name, zoo model, input shape) per part; the dry run shrinks them (see _settings)
MODELS = {
    "bert": ("bert_base", (128, 768)),
    "vit": ("vit_b_16", (3, 224, 224)),
    "resnet50": ("resnet50", (3, 224, 224)),
}


class Budget(Exception):
    """The time budget ran out before this row."""


# -- the run: device, rows, budget, JSON ------------------------------------------------------------
class Run:
    """Where rows go: the JSON and Markdown are rewritten atomically after every row."""

    def __init__(self, args: argparse.Namespace, info: dict[str, Any]) -> None:
        self.args, self.info = args, info
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.rows: list[dict[str, Any]] = []
        self.parts: dict[str, str] = {}
        self.preflight: dict[str, Any] = {}
        self.current = ""
        self.stopped: str | None = None  # why the run ended early (kept by every later save)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def check_budget(self, what: str) -> None:
        if self.args.budget_s is not None and self.elapsed() > self.args.budget_s:
            raise Budget(f"{what}: not started, {self.elapsed():.0f} s > --budget-s")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({**row, "dry_run": self.dry})
        self.save()

    def save(self, stopped: str | None = None) -> None:
        from nmcompile._io import atomic_write_json, atomic_write_text

        self.stopped = stopped or self.stopped
        body = {
            "machine": self.info,
            "dry_run": self.dry,
            "args": vars(self.args),
            "preflight": self.preflight,
            "parts": self.parts,
            "stopped": self.stopped,
            "rows": self.rows,
            "seconds": round(self.elapsed(), 1),
        }
        atomic_write_json(self.out, body)
        atomic_write_text(self.out.with_suffix(".md"), markdown(body))

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def empty_cache(self) -> None:
        if not self.dry:
            torch.cuda.empty_cache()


def _on_sigterm(run: Run) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        run.parts.setdefault(run.current, "interrupted")
        run.save(stopped=f"SIGTERM during {run.current or 'start-up'} after {run.elapsed():.0f} s")
        print(f"SIGTERM: wrote {run.out} ({len(run.rows)} rows)", flush=True)
        sys.exit(143)

    return handler


# -- timing -------------------------------------------------------------------------------------
def time_row(run: Run, fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each candidate as a CUDA-graph replay and as eager calls, all interleaved.

    Returns ``graph_ms`` / ``eager_ms`` (medians), the full stats, and which candidates fell back
    to eager (with why). In the dry run the graph column is the eager call on CPU, labelled.
    """
    from nmcompile.runtime.latency import Captured, capture_cuda_graph, time_adaptive

    captured: dict[str, Captured] = {}
    for name, fn in fns.items():
        if run.dry:
            captured[name] = Captured(fn, False, "dry run on CPU: eager call, no CUDA graph")
        else:
            captured[name] = capture_cuda_graph(fn, warmup=3)
    timed = {f"{n}/graph": c.fn for n, c in captured.items()}
    timed |= {f"{n}/eager": fn for n, fn in fns.items()}
    stats, k = time_adaptive(
        timed,
        warmup=run.args.warmup,
        repeat=run.args.repeat,
        cuda_events=not run.dry,
        sample_ms=1.0,
        max_calls=100,
    )
    out: dict[str, Any] = {
        "graph_ms": {n: stats[f"{n}/graph"].median_ms for n in fns},
        "eager_ms": {n: stats[f"{n}/eager"].median_ms for n in fns},
        "graph_p90_ms": {n: stats[f"{n}/graph"].p90_ms for n in fns},
        "calls_per_sample": k,
        "cuda_graph": {n: c.graph for n, c in captured.items()},
        "stats": {key: s.to_json() for key, s in stats.items()},
    }
    fallbacks = {n: c.note for n, c in captured.items() if not c.graph}
    if fallbacks:
        out["graph_fallback"] = fallbacks
    del captured, timed
    return out


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


# -- preflight ------------------------------------------------------------------------------------
def preflight(run: Run) -> dict[str, Any]:
    """Kernels available, clocks up, row-major outputs, one CUDA graph: before any row."""
    from nmcompile import NMPattern
    from nmcompile.runtime.latency import capture_cuda_graph
    from nmcompile.runtime.semi_structured import to_semi_structured

    pf: dict[str, Any] = {"ok": True}
    dt = DT[run.args.dtypes.split(",")[0]]
    if run.dry:
        pf["kernels"] = "dry run: CPU stand-in kernels for cuSPARSELt"
        pf["backend"] = "cusparselt"
    else:
        cusparselt = getattr(torch.backends, "cusparselt", None)
        available = bool(cusparselt is not None and cusparselt.is_available())
        major = torch.cuda.get_device_capability()[0]
        pf["cusparselt_available"] = available
        pf["cusparselt_version"] = cusparselt.version() if available else None
        if available:
            pf["backend"] = "cusparselt"
        elif major == 8:
            pf["backend"] = "cutlass"
            print("cuSPARSELt is not available in this torch: using CUTLASS 2:4 kernels (SM8x)")
        else:
            pf["ok"] = False
            pf["backend"] = None
            pf["error"] = (
                f"no 2:4 kernels: torch.backends.cusparselt.is_available() is False and CUTLASS's "
                f"sparse kernels need SM8x (this GPU is SM{major}x); install a torch build with "
                "cuSPARSELt"
            )
            return pf
        # bring the clocks up: about a second of large GEMMs before the first timed call
        a = torch.randn(8192, 8192, device="cuda", dtype=dt)
        t = time.time()
        n = 0
        while time.time() - t < 1.5:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            n += 10
        pf["warmup_gemms"] = n
        del a
    # layout: a converted linear must give a row-major output, 2-D and 3-D
    lin = nn.Linear(1024, 1024, device=run.device, dtype=dt).eval()
    with torch.no_grad():
        lin.weight.mul_(NMPattern(2, 4).mask(lin.weight.abs().float()).to(dt))
    x = torch.randn(4, 64, 1024, device=run.device, dtype=dt)
    conv = to_semi_structured(lin, example_inputs=(x,), rtol=5e-2, backend=pf["backend"])
    with torch.inference_mode():
        y3 = conv.module(x)
        y2 = conv.module(x[0])
        raw = F.linear(x[0], conv.module.weight)  # torch's own call, no nmcompile guard
    pf["rel_err"] = conv.max_rel_error
    pf["output_row_major"] = bool(y3.is_contiguous() and y2.is_contiguous())
    pf["torch_linear_row_major"] = bool(raw.is_contiguous())
    if not pf["output_row_major"]:
        pf["ok"] = False
        pf["error"] = (
            f"converted linear gives a non-row-major output (strides {y3.stride()}): every "
            "number would include layout copies"
        )
        return pf
    if not run.dry:
        cap = capture_cuda_graph(lambda: _infer(conv.module, x))
        pf["cuda_graph_capture"] = cap.graph
        if not cap.graph:
            pf["cuda_graph_note"] = cap.note
            print(f"WARNING: {cap.note}; every row falls back to eager timing", flush=True)
        del cap
    return pf


def _infer(module: Callable[..., Any], *inputs: Any) -> Any:
    with torch.inference_mode():
        return module(*inputs)


# -- parts ---------------------------------------------------------------------------------------
def linear_part(run: Run, s: dict[str, Any]) -> None:
    from torch.sparse import to_sparse_semi_structured

    from nmcompile import NMPattern
    from nmcompile.runtime.semi_structured import to_semi_structured

    for dtype in run.args.dtypes.split(","):
        dt = DT[dtype]
        for n_out, n_in in s["shapes"]:
            w = torch.randn(n_out, n_in, device=run.device, dtype=dt)
            w = w * NMPattern(2, 4).mask(w.abs().float()).to(dt)
            with _fused_transpose():
                ws = to_sparse_semi_structured(w)
            lin = nn.Linear(n_in, n_out, bias=False, device=run.device, dtype=dt).eval()
            with torch.no_grad():
                lin.weight.copy_(w)
            ours = to_semi_structured(lin, backend=run.preflight["backend"]).module
            for t in s["tokens"]:
                run.check_budget(f"linear {n_out}x{n_in} tokens {t}")
                run.current = f"linear {dtype} {n_out}x{n_in} tokens {t}"
                x = torch.randn(t, n_in, device=run.device, dtype=dt)
                x3 = x.view(8, t // 8, n_in) if t % 8 == 0 else x.unsqueeze(0)
                with torch.inference_mode():
                    ref = F.linear(x, w)
                    err = max(
                        _rel_err(F.linear(x, ws), ref), _rel_err(ours(x3).reshape(ref.shape), ref)
                    )
                tm = time_row(
                    run,
                    {
                        "dense": lambda x=x, w=w: _infer(F.linear, x, w),
                        "torch_sparse": lambda x=x, ws=ws: _infer(F.linear, x, ws),
                        "sparse": lambda x3=x3, m=ours: _infer(m, x3),
                    },
                )
                g, e = tm["graph_ms"], tm["eager_ms"]
                row = {
                    "part": "linear",
                    "dtype": dtype,
                    "out": n_out,
                    "in": n_in,
                    "tokens": t,
                    **tm,
                    "speedup": g["dense"] / g["sparse"],
                    "speedup_torch": g["dense"] / g["torch_sparse"],
                    "speedup_eager": e["dense"] / e["sparse"],
                    "dense_tflops": 2 * t * n_in * n_out / (g["dense"] * 1e-3) / 1e12,
                    "rel_err": err,
                }
                run.add(row)
                print(
                    f"linear {dtype} {n_out:5d}x{n_in:5d} tokens {t:5d}: dense {g['dense']:.4f} "
                    f"ms ({row['dense_tflops']:.1f} TFLOP/s), 2:4 {g['sparse']:.4f} ms "
                    f"(torch {g['torch_sparse']:.4f}), {row['speedup']:.2f}x graph, "
                    f"{row['speedup_eager']:.2f}x eager",
                    flush=True,
                )
                del x, x3
                run.empty_cache()
            del w, ws, lin, ours


def _torch_ceiling(model: nn.Module, dt: torch.dtype) -> tuple[nn.Module, int]:
    """The model with torch's own ``to_sparse_semi_structured`` on each qualifying
    ``nn.Linear`` weight (torch's documented recipe); how many it converted."""
    from torch.sparse import to_sparse_semi_structured

    from nmcompile.runtime.semi_structured import plan_semi_structured

    n = 0
    with _fused_transpose():
        for d in plan_semi_structured(model, dtype=dt):
            mod = model.get_submodule(d.name) if d.kind == "linear" else None
            if d.convert and isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), False)
                n += 1
    return model, n


@contextlib.contextmanager
def _fused_transpose():
    """torch's own knob for a row-major cuSPARSELt output (a no-op from torch 2.14): the
    ceiling gets the layout our path gets."""
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FUSE_TRANSPOSE
    SparseSemiStructuredTensor._FUSE_TRANSPOSE = True
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FUSE_TRANSPOSE = before


def model_part(run: Run, part: str, s: dict[str, Any]) -> None:
    import nmcompile

    name, shape = s["models"][part]
    run.check_budget(part)  # before minutes of compiling, not only before each row
    image = len(shape) == 3
    torch.manual_seed(0)
    kwargs = {"num_classes": 1000, "in_channels": 3, "image_size": shape[-1]} if image else {}
    model = nmcompile.zoo.create(name, **(kwargs or {"num_classes": 2})).eval()
    t = time.time()
    r = nmcompile.compile(
        model,
        "asp",
        "2:4",
        example_inputs=(torch.randn(1, *shape),),
        finetune_iterations=0,
        prune_stem=not image,  # 2:4 on every linear of a transformer
    )
    compile_s = time.time() - t
    fmt = torch.channels_last if image else torch.contiguous_format
    for dtype in run.args.dtypes.split(","):
        dt = DT[dtype]

        def place(m: nn.Module, dt: torch.dtype = dt) -> nn.Module:
            return m.to(device=run.device, dtype=dt).eval().to(memory_format=fmt)

        dense = place(copy.deepcopy(model))
        masked = place(copy.deepcopy(r.module))
        try:
            ceiling, n_ceiling = _torch_ceiling(place(r.eager()), dt)
            ceiling_note = f"{n_ceiling} nn.Linear weights on torch's 2:4"
        except Exception as exc:  # the ceiling is a comparison, not the product: keep going
            ceiling, ceiling_note = None, f"torch ceiling unavailable: {exc!r}"[:300]
        for b in s["batches"][part]:
            try:
                run.check_budget(f"{part} {dtype} batch {b}")
                run.current = f"{part} {dtype} batch {b}"
                _model_row(run, part, name, dtype, b, shape, fmt, dense, masked, ceiling)
                run.rows[-1].update(compile_s=compile_s, ceiling=ceiling_note)
                run.save()
            except Budget:
                raise
            except Exception as exc:  # e.g. out of memory at the largest batch: keep the rest
                run.add({"part": part, "dtype": dtype, "batch": b, "error": repr(exc)[:500]})
                print(f"{part} {dtype} batch {b} failed: {exc!r}"[:300], flush=True)
            finally:
                run.empty_cache()
        del dense, masked, ceiling


def _model_row(run, part, name, dtype, b, shape, fmt, dense, masked, ceiling) -> None:
    from nmcompile.runtime.semi_structured import to_semi_structured

    x = torch.randn(b, *shape, device=run.device, dtype=DT[dtype])
    if len(shape) == 3:
        x = x.contiguous(memory_format=fmt)
    # converted per row: the check runs at this batch; the weights are shared with ``masked``
    conv = to_semi_structured(
        masked, example_inputs=(x,), rtol=5e-2, backend=run.preflight["backend"]
    )
    fns = {
        "dense": lambda: _infer(dense, x),
        "masked": lambda: _infer(masked, x),
        "sparse": lambda: _infer(conv.module, x),
    }
    ceiling_err = None
    if ceiling is not None:
        try:
            with torch.inference_mode():
                ceiling_err = _rel_err(ceiling(x), masked(x))
            fns["torch_sparse"] = lambda: _infer(ceiling, x)
        except Exception as exc:
            ceiling_err = f"torch ceiling failed at batch {b}: {exc!r}"[:300]
    tm = time_row(run, fns)
    g, e = tm["graph_ms"], tm["eager_ms"]
    row = {
        "part": part,
        "model": name,
        "dtype": dtype,
        "batch": b,
        "input_shape": list(shape),
        **tm,
        "speedup": g["masked"] / g["sparse"],
        "speedup_vs_untraced": g["dense"] / g["sparse"],
        "speedup_eager": e["masked"] / e["sparse"],
        "speedup_torch": g["masked"] / g["torch_sparse"] if "torch_sparse" in g else None,
        "converted": len(conv.converted),
        "layers": len(conv.decisions),
        "dense_layers": {d.name: d.reason for d in conv.decisions if not d.convert},
        "rel_err": conv.max_rel_error,
        "torch_sparse_rel_err": ceiling_err,
    }
    run.add(row)
    ts = f", torch 2:4 {g['torch_sparse']:.3f}" if "torch_sparse" in g else ""
    print(
        f"{part} {dtype} batch {b:4d}: dense {g['dense']:.3f} ms, masked {g['masked']:.3f}, "
        f"2:4 {g['sparse']:.3f}{ts} (graph); {row['speedup']:.2f}x vs same graph, "
        f"{row['speedup_eager']:.2f}x eager ({row['converted']}/{row['layers']} layers 2:4)",
        flush=True,
    )


def trt_part(run: Run, s: dict[str, Any]) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        run.parts["trt"] = "skipped: tensorrt is not installed"
        return
    import nmcompile

    for part in ("bert", "resnet50"):
        run.check_budget(f"trt {part}")
        run.current = f"trt {part}"
        name, shape = s["models"][part]
        rep = nmcompile.benchmark(
            name,
            backends=["trt"],
            dtypes=["fp16"],
            batch_sizes=[32],
            input_shape=shape,
            warmup=run.args.warmup,
            repeat=run.args.repeat,
        )
        for row in rep.rows:
            run.add({"part": f"trt {part}", **row.to_json()})


# -- report --------------------------------------------------------------------------------------
def _crossover(lin: list[dict[str, Any]]) -> list[str]:
    """Per dtype and shape: the fewest tokens at which 2:4 (CUDA graph) beats dense."""
    out = []
    keys = sorted({(r["dtype"], r["out"], r["in"]) for r in lin})
    for dtype, n_out, n_in in keys:
        rs = sorted(
            (r for r in lin if (r["dtype"], r["out"], r["in"]) == (dtype, n_out, n_in)),
            key=lambda r: r["tokens"],
        )
        wins = [r["tokens"] for r in rs if r["speedup"] > 1.0]
        where = f"2:4 faster from {wins[0]} tokens" if wins else "dense faster at every size"
        out.append(f"- {dtype} {n_out}x{n_in}: {where} (measured {[r['tokens'] for r in rs]})")
    return out


def markdown(body: dict[str, Any]) -> str:
    """The tables RESULTS.md takes: linear speedups by shape, models by batch."""
    m = body["machine"]
    rows = body["rows"]
    device = m.get("gpu") or f"CPU dry run ({m.get('cpu')})"
    lines = [
        f"Device: {device}; torch {m.get('torch')}, cuSPARSELt {m.get('cusparselt')}.",
        "Times are medians of CUDA-graph replays (ms) unless marked eager; speedups are dense / "
        "2:4.",
        "",
    ]
    if body.get("dry_run"):
        lines[1:1] = ["**Dry run on CPU with stand-in kernels: these numbers say nothing about "
                      "GPU speed.**"]  # fmt: skip
    if body.get("stopped"):
        lines.append(f"Stopped early: {body['stopped']}.\n")
    lin = [r for r in rows if r.get("part") == "linear" and "speedup" in r]
    if lin:
        lines += [
            "| dtype | out x in | tokens | dense | torch 2:4 | ours 2:4 | speedup | eager "
            "speedup | dense TFLOP/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lin:
            g = r["graph_ms"]
            lines.append(
                f"| {r['dtype']} | {r['out']}x{r['in']} | {r['tokens']} | {g['dense']:.4f} | "
                f"{g['torch_sparse']:.4f} | {g['sparse']:.4f} | {r['speedup']:.2f}x | "
                f"{r['speedup_eager']:.2f}x | {r['dense_tflops']:.1f} |"
            )
        lines += ["", "Crossover:", *_crossover(lin), ""]
    models = [r for r in rows if r.get("part") in MODELS and "speedup" in r]
    if models:
        lines += [
            "| model | dtype | batch | untraced dense | same graph dense | 2:4 (p90) | torch 2:4 "
            "ceiling | speedup vs same graph | vs untraced | eager speedup | layers 2:4 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            g, p90 = r["graph_ms"], r["graph_p90_ms"]
            ceil = f"{g['torch_sparse']:.3f}" if "torch_sparse" in g else "-"
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['batch']} | {g['dense']:.3f} | "
                f"{g['masked']:.3f} | {g['sparse']:.3f} ({p90['sparse']:.3f}) | {ceil} | "
                f"**{r['speedup']:.2f}x** | {r['speedup_vs_untraced']:.2f}x | "
                f"{r['speedup_eager']:.2f}x | {r['converted']}/{r['layers']} |"
            )
        lines.append("")
    fell_back = sorted({n for r in rows for n in r.get("graph_fallback", {})})
    if fell_back and not body.get("dry_run"):
        lines.append(f"Eager fallback (CUDA graph capture failed) for: {', '.join(fell_back)}.\n")
    errors = [r for r in rows if "error" in r]
    lines += [
        f"- {r['part']} {r.get('dtype')} batch {r.get('batch')}: {r['error']}" for r in errors
    ]
    return "\n".join(lines) + "\n"


# -- settings ------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Shapes, tokens, models and batches for the full sweep, ``--quick`` or ``--dry-run``."""
    if args.dry_run:
        return {
            "shapes": [(256, 256), (512, 128)],
            "tokens": [64, 256],
            "models": {
                "bert": ("bert_tiny", (32, 128)),
                "vit": ("vit_b_16", (3, 32, 32)),
                "resnet50": ("resnet50", (3, 32, 32)),
            },
            "batches": {"bert": [2, 8], "vit": [2], "resnet50": [2]},
        }
    square = [int(v) for v in args.sizes.split(",")]
    shapes = [(n, n) for n in square] + [(3072, 768), (768, 3072)]  # BERT-base's MLP
    if args.all_shapes:
        shapes = [(o, i) for o in square for i in square] + shapes[len(square) :]
    quick = args.quick
    return {
        "shapes": shapes,
        "tokens": [int(t) for t in args.tokens.split(",")],
        "models": MODELS,
        "batches": {
            "bert": [8, 32, 128] if quick else [1, 8, 32, 128],
            "vit": [32] if quick else [1, 8, 32],
            "resnet50": [32] if quick else [1, 8, 32],
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="square linear sizes")
    ap.add_argument("--all-shapes", action="store_true", help="every out x in of --sizes")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=None, help="skip rows starting later")
    ap.add_argument("--quick", action="store_true", help="fp16, fewer shapes and batches")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, bf16, small shapes, stand-in 2:4 kernels"
    )
    ap.add_argument("--out", default=str(RESULTS / "gpu_latency.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.tokens, args.dtypes, args.repeat = (
            "2048,4096,8192,16384",
            "256,1024,4096,16384",
            "fp16",
            30,
        )
        args.budget_s = 360.0 if args.budget_s is None else args.budget_s
    if args.dry_run:
        args.dtypes, args.warmup, args.repeat = "bf16", 1, 3  # CPU fp16 GEMMs crawl; bf16 does not
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; parts: {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU; --dry-run checks the script on CPU")
    from nmcompile._machine import machine_info
    from nmcompile.runtime.semi_structured_standin import cpu_semi_structured

    run = Run(args, machine_info())
    print(json.dumps(run.info), flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm(run))
    settings = _settings(args)
    jobs: dict[str, Callable[[], None]] = {
        "linear": lambda: linear_part(run, settings),
        "bert": lambda: model_part(run, "bert", settings),
        "vit": lambda: model_part(run, "vit", settings),
        "resnet50": lambda: model_part(run, "resnet50", settings),
        "trt": lambda: trt_part(run, settings),
    }
    standin = cpu_semi_structured() if args.dry_run else contextlib.nullcontext()
    with standin:
        run.current = "preflight"
        run.preflight = preflight(run)
        run.save()
        print("preflight:", json.dumps(run.preflight), flush=True)
        if not run.preflight["ok"]:
            print(f"preflight failed: {run.preflight['error']}", flush=True)
            run.save(stopped="preflight failed")
            return 2
        for part in args.parts.split(","):
            run.current = part
            t_part = time.time()
            try:
                jobs[part]()
                run.parts.setdefault(part, f"ok ({time.time() - t_part:.0f} s)")
            except Budget as exc:
                run.parts[part] = f"stopped: {exc}"
                print(run.parts[part], flush=True)
            except Exception:
                run.parts[part] = "failed: " + traceback.format_exc(limit=6)[-3000:]
                print(f"{part} failed:\n{run.parts[part]}", flush=True)
            finally:
                run.empty_cache()
                run.save()
    run.current = ""
    run.save()
    print(json.dumps(run.parts, indent=2))
    print(f"wrote {run.out} and {run.out.with_suffix('.md')} ({run.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
