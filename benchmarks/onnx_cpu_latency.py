"""ONNX Runtime CPU latency: dense vs 2:4 (asp) or channel-removed (imp-refill) torchvision models.

Both models are exported by nmcompile (BatchNorm folded into the convs in both, so they differ
only in the zeros of the pruned weights) and timed in one process on the same input, interleaved.
ONNX Runtime's CPU kernels are dense GEMMs, so the expected ratio is 1.0: this benchmark is the
baseline that shows why 2:4 needs sparse tensor cores (or channel removal) to pay off.

With ``--method imp-refill`` the sparse side is IMP-Refill at ``--target`` sparsity, physically
shrunk (emptied channels removed), which is what can make CPU inference faster. Latency does not
depend on the weights' values, so no training is done (masks from the initial magnitudes; the
channel counts are those a trained run at that sparsity would have only approximately).

    python benchmarks/onnx_cpu_latency.py      # writes benchmarks/results/onnx_cpu_latency.json
    python benchmarks/onnx_cpu_latency.py --method imp-refill --target 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

import nmcompile
from nmcompile._machine import machine_info
from nmcompile.runtime import export_onnx, ort_latency, speedup

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--method", default="asp", choices=["asp", "imp-refill"])
    ap.add_argument("--target", type=float, default=0.5, help="imp-refill target sparsity")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    suffix = "" if args.method == "asp" else f"_{args.method}"
    args.out = args.out or str(RESULTS / f"onnx_cpu_latency{suffix}.json")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(num_classes=1000).eval()
            size = args.image_size
            example = (torch.randn(1, 3, size, size),)
            if args.method == "asp":
                result = nmcompile.compile(
                    model, "asp", "2:4", example_inputs=example, finetune_iterations=0
                )
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "no trainer: skipping training"
                    result = nmcompile.compile(
                        model, "imp-refill", example_inputs=example, target_sparsity=args.target
                    )
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, size, size)
                dense = export_onnx(model, (x,), Path(tmp) / f"{name}_dense_b{batch}.onnx")
                sparse = result.export_onnx(
                    Path(tmp) / f"{name}_24_b{batch}.onnx", example_inputs=(x,)
                )
                stats = ort_latency(
                    {"dense": dense.path, "sparse": sparse.path},
                    (x,),
                    threads=args.threads,
                    warmup=5,
                    repeat=args.repeat,
                )
                row = {
                    "model": name,
                    "batch": batch,
                    "image_size": size,
                    "pruned_layers": len(result.sites),
                    "method": args.method,
                    "sparsity": result.sparsity,
                    "params_dense": sum(p.numel() for p in model.parameters()),
                    "params_sparse": sum(p.numel() for p in result.module.parameters()),
                    # forward FLOPs per sample of the deployed model over the dense one
                    "flops_ratio": (
                        result.deployed_flops.dense / result.flops.dense
                        if result.deployed_flops is not None
                        else None
                    ),
                    "dense": stats["dense"].to_json(),
                    "sparse": stats["sparse"].to_json(),
                    "speedup": speedup(stats["dense"], stats["sparse"]),
                }
                rows.append(row)
                print(
                    f"{name:9s} batch {batch:3d}: dense {row['dense']['median_ms']:8.2f} ms "
                    f"(p90 {row['dense']['p90_ms']:.2f})   {args.method} "
                    f"{row['sparse']['median_ms']:8.2f} ms "
                    f"(p90 {row['sparse']['p90_ms']:.2f})   speedup {row['speedup']:.3f}x",
                    flush=True,
                )
    out = {"machine": machine_info(), "repeat": args.repeat, "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
