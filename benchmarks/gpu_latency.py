"""2:4 latency on an NVIDIA GPU (H100 / H200): torch semi-structured (cuSPARSELt) vs dense.

(a) single linear layers: weight [out, in] for out, in in 1024..16384 and 256..16384 tokens;
(b) a BERT-base-sized encoder (12 layers, 768 / 3072, seq 128) at batch 1 / 8 / 32 / 128 with
    2:4 on every linear;
(c) vit_b_16 (224x224) and (d) resnet50 (its 3x3 convs stay dense in torch: only the 1x1 convs,
    run as channels-last linears, and the classifier can use 2:4 kernels);
fp16 and bf16. Dense and sparse are timed interleaved in one process with CUDA events (median of
``--repeat`` after ``--warmup``), on fresh random inputs, after checking the sparse output against
the dense masked one. TensorRT engines are added for (b)-(d) when ``tensorrt`` is installed.

On a GPU host without network access, install nmcompile without its dependencies first:

    pip install --no-deps --no-build-isolation -e . && python benchmarks/gpu_latency.py

Writes benchmarks/results/gpu_latency.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _events(fns: dict, warmup: int, repeat: int) -> dict[str, float]:
    from nmcompile.runtime.latency import time_interleaved

    stats = time_interleaved(fns, warmup=warmup, repeat=repeat, cuda_events=True)
    return {k: v.median_ms for k, v in stats.items()}


def linear_sweep(args) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    from nmcompile import NMPattern

    rows = []
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
                    ref = F.linear(x, w)
                    err = float((F.linear(x, ws) - ref).float().norm() / ref.float().norm())
                    ms = _events(
                        {
                            "dense": lambda x=x, w=w: F.linear(x, w),
                            "sparse": lambda x=x, ws=ws: F.linear(x, ws),
                        },
                        args.warmup,
                        args.repeat,
                    )
                    tflops = 2 * t * n_in * n_out / (ms["dense"] * 1e-3) / 1e12
                    row = {
                        "part": "linear",
                        "dtype": dtype,
                        "out": n_out,
                        "in": n_in,
                        "tokens": t,
                        "dense_ms": ms["dense"],
                        "sparse_ms": ms["sparse"],
                        "speedup": ms["dense"] / ms["sparse"],
                        "dense_tflops": tflops,
                        "rel_err": err,
                    }
                    rows.append(row)
                    print(
                        f"linear {dtype} {n_out:5d}x{n_in:5d} tokens {t:5d}: dense "
                        f"{ms['dense']:.4f} ms ({tflops:.0f} TFLOP/s), 2:4 {ms['sparse']:.4f} ms, "
                        f"{row['speedup']:.2f}x",
                        flush=True,
                    )
                del w, ws
    return rows


def model_rows(args, name: str, batches: list[int], shape: tuple[int, ...]) -> list[dict]:
    import nmcompile
    from nmcompile.runtime.semi_structured import to_semi_structured

    rows = []
    torch.manual_seed(0)
    model = nmcompile.zoo.create(
        name,
        num_classes=1000 if len(shape) == 3 else 2,
        in_channels=shape[0] if len(shape) == 3 else 3,
        image_size=shape[-1] if len(shape) == 3 else 32,
    ).eval()
    r = nmcompile.compile(
        model,
        "asp",
        "2:4",
        example_inputs=(torch.randn(1, *shape),),
        finetune_iterations=0,
        prune_stem=len(shape) == 2,
    )
    for dtype in args.dtypes.split(","):
        dt = DT[dtype]
        dense = copy.deepcopy(model).cuda().to(dt).eval()
        sparse = r.module.cuda().to(dt).eval()
        for b in batches:
            x = torch.randn(b, *shape, device="cuda", dtype=dt)
            conv = to_semi_structured(sparse, example_inputs=(x,), rtol=5e-2)
            with torch.inference_mode():
                fns = {
                    "dense": lambda m=dense, x=x: m(x),
                    "masked": lambda m=sparse, x=x: m(x),
                    "sparse": lambda m=conv.module, x=x: m(x),
                }
                ms = _events(fns, args.warmup, args.repeat)
            row = {
                "part": name,
                "dtype": dtype,
                "batch": b,
                "dense_ms": ms["dense"],
                "masked_ms": ms["masked"],
                "sparse_ms": ms["sparse"],
                "speedup": ms["dense"] / ms["sparse"],
                "converted": len(conv.converted),
                "layers": len(conv.decisions),
                "rel_err": conv.max_rel_error,
            }
            rows.append(row)
            print(
                f"{name} {dtype} batch {b:4d}: dense {ms['dense']:.3f} ms, 2:4 {ms['sparse']:.3f} "
                f"ms, {row['speedup']:.2f}x ({row['converted']}/{row['layers']} layers 2:4)",
                flush=True,
            )
            del conv
    return rows


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="linear,bert,vit,resnet50,trt")
    ap.add_argument("--sizes", default="1024,4096,8192,16384")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "gpu_latency.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_latency.py needs a CUDA GPU")
    from nmcompile.cli import machine_info

    info = machine_info()
    info["cusparselt"] = getattr(torch.backends.cusparselt, "version", lambda: None)()
    info["capability"] = list(torch.cuda.get_device_capability())
    print(json.dumps(info), flush=True)
    t0 = time.time()
    parts = args.parts.split(",")
    rows: list[dict] = []
    if "linear" in parts:
        rows += linear_sweep(args)
    if "bert" in parts:
        rows += model_rows(args, "bert_base", [1, 8, 32, 128], (128, 768))
    if "vit" in parts:
        rows += model_rows(args, "vit_b_16", [1, 8, 32], (3, 224, 224))
    if "resnet50" in parts:
        rows += model_rows(args, "resnet50", [1, 8, 32], (3, 224, 224))
    if "trt" in parts:
        rows += trt_rows(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"machine": info, "args": vars(args), "rows": rows, "seconds": time.time() - t0},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
