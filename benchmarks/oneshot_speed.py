"""Speed of the calibrated one-shot methods and of the channel permutation search.

    python benchmarks/oneshot_speed.py          # writes benchmarks/results/oneshot_speed.json

1. SparseGPT on one 4096x4096 linear, calibrated on 128 sequences x 2048 tokens (262,144 tokens,
   the paper's calibration set): the input Hessian accumulated in chunks of 8,192 tokens
   (``X^T X``, 8.8 TFLOP in fp32), then the pruning solve at 2:4 (Cholesky, the block loop of
   Alg. 1 with blocks of 128 columns, the lazy updates as matrix products). Wanda's statistics
   (column norms) and mask on the same layer.
2. The channel permutation pass on torchvision resnet50 (random weights: the search's cost
   depends on the shapes and on how many swap rounds it runs): time per channel space, its
   width and rows, and the magnitude 2:4 keeps before and after.

Run it on an otherwise idle machine: both parts are compute-bound.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nmcompile import NMPattern
from nmcompile._machine import machine_info
from nmcompile._methods.calibrated import sparsegpt_prune, wanda_mask

RESULTS = Path(__file__).parent / "results"


def sparsegpt_linear(width: int, sequences: int, tokens: int, chunk: int = 8192) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(width, width, generator=g) / width**0.5
    mix = torch.randn(width, width, generator=g) / width**0.5  # correlated features
    h = torch.zeros(width, width)
    sq = torch.zeros(width)
    total = sequences * tokens
    t_gen = t_acc = 0.0
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t0 = time.perf_counter()
        x = torch.randn(n, width, generator=g) @ mix
        t1 = time.perf_counter()
        h.addmm_(x.T, x)
        sq += x.pow(2).sum(0)
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_acc += t2 - t1
    h /= total
    t0 = time.perf_counter()
    _, keep, facts = sparsegpt_prune(w, h, n=2, m=4, blocksize=128)
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = wanda_mask(w, sq / total, NMPattern(2, 4), None)
    t_wanda = time.perf_counter() - t0
    assert bool((keep.reshape(width, -1, 4).sum(-1) == 2).all())
    assert bool((mask.reshape(width, -1, 4).sum(-1) == 2).all())
    return {
        "layer": f"linear {width}x{width}",
        "calibration_tokens": total,
        "hessian_accumulate_s": t_acc,
        "hessian_tflop": 2 * total * width * width / 1e12,
        "hessian_gflops": 2 * total * width * width / t_acc / 1e9,
        "sparsegpt_solve_s": t_solve,
        "sparsegpt_output_error": facts["output_error"],
        "wanda_mask_s": t_wanda,
        "input_generation_s_untimed": t_gen,
    }


def permutation_resnet50(max_iterations: int) -> dict:
    import torchvision

    import nmcompile

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    t0 = time.perf_counter()
    r = nmcompile.compile(model, "asp", "2:4", example_inputs=(x,), permute=True)
    total = time.perf_counter() - t0
    rep = r.diagnostics["permutation"]
    rows = []
    for s in rep["spaces"]:
        rows.append(
            {
                "producers": s["producers"],
                "readers": s["readers"],
                "seconds": s["seconds"],
                "iterations": s["iterations"],
                "swaps": s["swaps"],
                "retained_before": s["retained_before"],
                "retained_after": s["retained_after"],
            }
        )
    return {
        "model": "torchvision resnet50 (random weights)",
        "spaces_permuted": len(rows),
        "spaces_skipped": rep["skipped"],
        "search_s": rep["seconds"],
        "compile_with_permute_s": total,
        "max_abs_diff": rep["max_abs_diff"],
        "per_space": rows,
        "slowest_space_s": max(r["seconds"] for r in rows) if rows else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--max-iterations", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "oneshot_speed.json")
    args = ap.parse_args()
    sgpt = sparsegpt_linear(args.width, args.sequences, args.tokens)
    print(
        f"{sgpt['layer']}, {sgpt['calibration_tokens']} tokens: Hessian {sgpt['hessian_accumulate_s']:.1f} s"
        f" ({sgpt['hessian_gflops']:.0f} GFLOP/s), SparseGPT 2:4 solve {sgpt['sparsegpt_solve_s']:.2f} s"
        f" (output error {sgpt['sparsegpt_output_error']:.4f}), Wanda mask {sgpt['wanda_mask_s']:.3f} s",
        flush=True,
    )
    perm = permutation_resnet50(args.max_iterations)
    print(
        f"resnet50 permutation: {perm['spaces_permuted']} spaces in {perm['search_s']:.1f} s "
        f"(slowest {perm['slowest_space_s']:.1f} s), max |diff| {perm['max_abs_diff']:.2e}",
        flush=True,
    )
    for s in perm["per_space"]:
        print(
            f"  {','.join(s['producers'])[:40]:40s} {s['seconds']:6.2f} s "
            f"{100 * s['retained_before']:.2f}% -> {100 * s['retained_after']:.2f}%"
        )
    args.out.write_text(
        json.dumps({"machine": machine_info(), "sparsegpt": sgpt, "permutation": perm}, indent=2)
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
