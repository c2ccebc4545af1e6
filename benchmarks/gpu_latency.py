"""2:4 latency on an NVIDIA GPU (H100 / H200): torch semi-structured (cuSPARSELt) vs dense.

(a) single linear layers: weight [out, in] for out, in in 1024..16384 and 256..16384 tokens;
(b) a BERT-base-sized encoder (12 layers, 768 / 3072, seq 128) at batch 1 / 8 / 32 / 128 with
    2:4 on every linear;
(c) vit_b_16 (224x224), the packed qkv projections included;
(d) resnet50 (its 3x3 convs stay dense in torch: only the 1x1 convs, run as channels-last
    linears, and the classifier can use 2:4 kernels; models and inputs are channels-last);
fp16 and bf16. Dense and sparse are timed interleaved in one process with CUDA events (median,
p90, p99 of ``--repeat`` after ``--warmup``) on the same inputs, after checking the sparse output
against the masked dense one. Small workloads queue several calls per timed sample, so the number
is device time, not one launch plus a synchronisation. TensorRT engines are added for (b) and (d)
when ``tensorrt`` is installed.

Device time is scarce: parts run in the order given, each one in its own try (a failure is
recorded, not fatal), the JSON is rewritten after every part, and ``--budget-s`` skips what would
start after the budget. ``--quick`` is a sweep that fits a few minutes.

On a GPU host without network access, install nmcompile without its dependencies first:

    pip install --no-deps --no-build-isolation -e . && \\
        python benchmarks/gpu_latency.py --quick --out $OUT/gpu_latency.json

Writes the JSON (default benchmarks/results/gpu_latency.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _time(fns: dict, args) -> dict[str, dict[str, Any]]:
    """Interleaved CUDA-event timing, several calls per sample for short work; each
    candidate's stats (median / p90 / p99)."""
    from nmcompile.runtime.latency import time_adaptive

    stats, k = time_adaptive(fns, warmup=args.warmup, repeat=args.repeat, cuda_events=True)
    return {n: {**s.to_json(), "calls_per_sample": k} for n, s in stats.items()}


def linear_sweep(args, rows: list[dict]) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    from nmcompile import NMPattern

    sizes = [int(s) for s in args.sizes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    for dtype in args.dtypes.split(","):
        dt = DT[dtype]
        for n_out in sizes:
            for n_in in sizes:
                w = torch.randn(n_out, n_in, device="cuda", dtype=dt)
                w = w * NMPattern(2, 4).mask(w.abs())
                ws = to_sparse_semi_structured(w)
                for t in tokens:
                    x = torch.randn(t, n_in, device="cuda", dtype=dt)
                    with torch.inference_mode():
                        ref = F.linear(x, w)
                        err = float((F.linear(x, ws) - ref).float().norm() / ref.float().norm())
                        st = _time(
                            {
                                "dense": lambda x=x, w=w: F.linear(x, w),
                                "sparse": lambda x=x, ws=ws: F.linear(x, ws),
                            },
                            args,
                        )
                    d, s = st["dense"]["median_ms"], st["sparse"]["median_ms"]
                    row = {
                        "part": "linear",
                        "dtype": dtype,
                        "out": n_out,
                        "in": n_in,
                        "tokens": t,
                        "dense_ms": d,
                        "sparse_ms": s,
                        "speedup": d / s,
                        "dense_tflops": 2 * t * n_in * n_out / (d * 1e-3) / 1e12,
                        "rel_err": err,
                        "stats": st,
                    }
                    rows.append(row)
                    print(
                        f"linear {dtype} {n_out:5d}x{n_in:5d} tokens {t:5d}: dense {d:.4f} ms "
                        f"({row['dense_tflops']:.0f} TFLOP/s), 2:4 {s:.4f} ms, "
                        f"{row['speedup']:.2f}x",
                        flush=True,
                    )
                del w, ws
    return rows


def model_rows(
    args, name: str, batches: list[int], shape: tuple[int, ...], rows: list[dict]
) -> list[dict]:
    import nmcompile

    image = len(shape) == 3
    torch.manual_seed(0)
    model = nmcompile.zoo.create(
        name,
        num_classes=1000 if image else 2,
        in_channels=shape[0] if image else 3,
        image_size=shape[-1] if image else 32,
    ).eval()
    r = nmcompile.compile(
        model,
        "asp",
        "2:4",
        example_inputs=(torch.randn(1, *shape),),
        finetune_iterations=0,
        prune_stem=not image,
    )
    # convnets run channels-last: cuDNN's fast fp16 path, and the 1x1 convs' linear view is free
    fmt = torch.channels_last if image else torch.contiguous_format
    for dtype in args.dtypes.split(","):
        dt = DT[dtype]
        dense = copy.deepcopy(model).cuda().to(dt).eval().to(memory_format=fmt)
        sparse = copy.deepcopy(r.module).cuda().to(dt).eval().to(memory_format=fmt)
        for b in batches:
            try:
                _model_row(args, name, dtype, b, shape, dense, sparse, fmt, rows)
            except Exception as exc:  # e.g. out of memory at the largest batch: keep the rest
                rows.append({"part": name, "dtype": dtype, "batch": b, "error": repr(exc)[:500]})
                print(f"{name} {dtype} batch {b} failed: {exc!r}"[:300], flush=True)
                torch.cuda.empty_cache()
    return rows


def _model_row(args, name, dtype, b, shape, dense, sparse, fmt, rows) -> None:
    """One batch size: dense (the zoo model), masked (the compiled graph, dense kernels) and 2:4
    semi-structured, timed interleaved; ``speedup`` is against dense, ``speedup_vs_masked``
    against the same compiled graph with dense kernels."""
    from nmcompile.runtime.semi_structured import to_semi_structured

    x = torch.randn(b, *shape, device="cuda", dtype=DT[dtype])
    if len(shape) == 3:
        x = x.contiguous(memory_format=fmt)
    conv = to_semi_structured(sparse, example_inputs=(x,), rtol=5e-2)
    with torch.inference_mode():
        st = _time(
            {
                "dense": lambda m=dense, x=x: m(x),
                "masked": lambda m=sparse, x=x: m(x),
                "sparse": lambda m=conv.module, x=x: m(x),
            },
            args,
        )
    d, s, m = (st[k]["median_ms"] for k in ("dense", "sparse", "masked"))
    row = {
        "part": name,
        "dtype": dtype,
        "batch": b,
        "dense_ms": d,
        "masked_ms": m,
        "sparse_ms": s,
        "speedup": d / s,
        "speedup_vs_masked": m / s,
        "converted": len(conv.converted),
        "layers": len(conv.decisions),
        "dense_layers": {x.name: x.reason for x in conv.decisions if not x.convert},
        "rel_err": conv.max_rel_error,
        "stats": st,
    }
    rows.append(row)
    print(
        f"{name} {dtype} batch {b:4d}: dense {d:.3f} ms, masked {m:.3f} ms, 2:4 {s:.3f} ms, "
        f"{row['speedup']:.2f}x ({row['converted']}/{row['layers']} layers 2:4)",
        flush=True,
    )


def trt_rows(args) -> list[dict]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("tensorrt not installed: TensorRT rows skipped", flush=True)
        return []
    import nmcompile

    out = []
    for name, shape, batches in (
        ("bert_base", (128, 768), [32]),
        ("resnet50", (3, 224, 224), [32]),
    ):
        rep = nmcompile.benchmark(
            name,
            backends=["trt"],
            dtypes=["fp16"],
            batch_sizes=batches,
            input_shape=shape,
            warmup=args.warmup,
            repeat=args.repeat,
        )
        out += [{"part": f"trt {name}", **row.to_json()} for row in rep.rows]
    return out


def markdown(rows: list[dict], device: str | None) -> str:
    """The tables RESULTS.md takes: linear speedups by shape, models by batch."""
    lines = [f"Device: {device}", ""]
    lin = [r for r in rows if r.get("part") == "linear"]
    if lin:
        lines += [
            "| dtype | out x in | tokens | dense ms | 2:4 ms | speedup | dense TFLOP/s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['dtype']} | {r['out']}x{r['in']} | {r['tokens']} | {r['dense_ms']:.4f} | "
            f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {r['dense_tflops']:.0f} |"
            for r in lin
        ]
        lines.append("")
    models = [r for r in rows if "batch" in r and r.get("part") != "linear" and "dense_ms" in r]
    if models:
        lines += [
            "| model | dtype | batch | dense ms (p90) | 2:4 ms (p90) | speedup | vs masked graph "
            "| layers 2:4 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            st = r["stats"]
            lines.append(
                f"| {r['part']} | {r['dtype']} | {r['batch']} | {r['dense_ms']:.3f} "
                f"({st['dense']['p90_ms']:.3f}) | {r['sparse_ms']:.3f} "
                f"({st['sparse']['p90_ms']:.3f}) | {r['speedup']:.2f}x | "
                f"{r.get('speedup_vs_masked', float('nan')):.2f}x | {r['converted']}/{r['layers']} |"
            )
    return "\n".join(lines) + "\n"


PARTS = ("linear", "bert", "vit", "resnet50", "trt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--sizes", default="1024,4096,8192,16384")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=None, help="skip parts starting later")
    ap.add_argument("--quick", action="store_true", help="fp16, fewer shapes and batches")
    ap.add_argument("--out", default=str(RESULTS / "gpu_latency.json"))
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.tokens, args.dtypes, args.repeat = (
            "4096,8192,16384",
            "1024,16384",
            "fp16",
            30,
        )
    bert_b, vit_b, r50_b = (
        ([8, 32, 128], [32], [32]) if args.quick else ([1, 8, 32, 128], [1, 8, 32], [1, 8, 32])
    )
    if not torch.cuda.is_available():
        raise SystemExit("gpu_latency.py needs a CUDA GPU")
    from nmcompile.cli import machine_info

    info = machine_info()
    info["cusparselt"] = getattr(torch.backends.cusparselt, "version", lambda: None)()
    info["capability"] = list(torch.cuda.get_device_capability())
    print(json.dumps(info), flush=True)
    t0 = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = {
        # parts append to ``rows`` as they go, so a part that fails keeps what it measured
        "linear": lambda: linear_sweep(args, rows),
        "bert": lambda: model_rows(args, "bert_base", bert_b, (128, 768), rows),
        "vit": lambda: model_rows(args, "vit_b_16", vit_b, (3, 224, 224), rows),
        "resnet50": lambda: model_rows(args, "resnet50", r50_b, (3, 224, 224), rows),
        "trt": lambda: rows.extend(trt_rows(args)),
    }
    rows: list[dict] = []
    status: dict[str, str] = {}
    for part in args.parts.split(","):
        if part not in jobs:
            raise SystemExit(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            status[part] = "skipped: over --budget-s"
            continue
        t_part = time.time()
        try:
            jobs[part]()
            status[part] = f"ok ({time.time() - t_part:.0f} s)"
        except Exception:
            status[part] = "failed: " + traceback.format_exc(limit=6)[-3000:]
            print(f"{part} failed:\n{status[part]}", flush=True)
        finally:
            torch.cuda.empty_cache()
        body = {
            "machine": info,
            "args": vars(args),
            "parts": status,
            "rows": rows,
            "seconds": time.time() - t0,
        }
        out.write_text(json.dumps(body, indent=2) + "\n")  # after every part: nothing lost
        out.with_suffix(".md").write_text(markdown(rows, info.get("gpu")))
    print(json.dumps(status, indent=2))
    print(f"wrote {out} and {out.with_suffix('.md')} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
