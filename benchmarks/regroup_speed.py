"""Regroup speed: every eligible conv of torchvision resnet50 at 80% unstructured sparsity.

The masks come from one-shot global magnitude pruning (OMP) of the random-init network; the
timed part is the ``regroup`` pass over all 52 masked convs (row graph, pymetis partition, block
formation), median of ``--repeat`` runs. The last line printed is ``regroup resnet50: X.XX s``.

    python benchmarks/regroup_speed.py      # also writes benchmarks/results/regroup_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

import nmcompile
from nmcompile._machine import machine_info
from nmcompile.passes.regroup import RegroupSettings, regroup

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="pymetis", choices=["pymetis", "kahypar"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    suffix = "" if args.backend == "pymetis" else f"_{args.backend}"
    args.out = args.out or str(RESULTS / f"regroup_speed{suffix}.json")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    r = nmcompile.compile(
        model,
        "omp",
        example_inputs=(torch.randn(1, 3, 224, 224),),
        target_sparsity=args.sparsity,
        finetune_iterations=0,
    )
    settings = RegroupSettings(backend=args.backend)
    times, blocks = [], 0
    for _ in range(args.repeat):
        gm = copy.deepcopy(r.masked)
        t0 = time.perf_counter()
        regroup(gm, settings)
        times.append(time.perf_counter() - t0)
        blocks = sum(len(b) for b in gm.meta["nm_blocks"].values())
    layers = len(r.sites)
    kept_before = sum(int(m.sum()) for m in r.masks.values())
    kept_after = sum(int(b.sum()) for n, b in gm.named_buffers() if n.endswith("weight_mask"))
    total = sum(s.numel for s in r.sites)
    out = {
        "machine": machine_info(),
        "layers": layers,
        "sparsity_in": 1 - kept_before / total,
        "sparsity_out": 1 - kept_after / total,
        "blocks": blocks,
        "seconds": times,
        "median_s": statistics.median(times),
        "settings": settings.__dict__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"{layers} convs, sparsity {out['sparsity_in']:.3f} -> {out['sparsity_out']:.3f} after "
        f"regrouping into {blocks} blocks; runs: {', '.join(f'{t:.2f}' for t in times)} s"
    )
    label = "" if args.backend == "pymetis" else f" ({args.backend})"
    print(f"regroup resnet50{label}: {out['median_s']:.2f} s")


if __name__ == "__main__":
    main()
