"""Latency-constrained channel pruning on the clock: torchvision resnet18 / resnet50 at 224x224,
ONNX Runtime CPU, pruned to a fraction of the dense model's measured latency, and every result
measured whole against its budget.

    python benchmarks/channel_latency.py                          # resnet18 + resnet50, batch 1 and 8
    python benchmarks/channel_latency.py --models resnet18 --batches 1 --budgets 0.7

For each model and deployment batch: a per-layer latency table is measured at that batch (ORT
CPU, cached in ``results/latency_lut_<model>_b<batch>.json``), the dense model is measured whole,
and each method prunes to each budget (a fraction of that measurement), calibrating the table
against whole-model measurements (``latency_calibrate``, see ``_methods/channels.py``):

- ``iee``: channel IEE (HALP-style knapsack, Taylor importance on BatchNorm), a short run:
  ``--iterations`` iterations with H = J = Q = ``--iterations`` // 4, one update step;
- ``channel-taylor``: one-shot Taylor pruning after ``--iterations`` iterations of scoring.

Importance comes from that short training on sklearn's digits, upsampled to 3x224x224 (any data
will do for the latency question; the models are not trained to accuracy here). Then, in one
interleaved ORT measurement per model and batch (dense and every pruned model, alternating), each
result's latency is compared with its budget; the target is within 10%. Also reported: the gap
between the table's per-layer sum and the whole dense model (``table_gap``).

Writes ``results/channel_latency.json`` (and a markdown table to stdout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

import nmcompile
from nmcompile import SupervisedTrainer, data
from nmcompile._machine import machine_info
from nmcompile.data import TensorLoader
from nmcompile.runtime import export_onnx, ort_latency

RESULTS = Path(__file__).parent / "results"


def _data(size: int, batch: int, seed: int = 0):
    ds = data.load("digits", batch_size=batch, seed=seed)
    x = ds.train.x[: 16 * batch]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    return TensorLoader(x, ds.train.y[: 16 * batch], batch, shuffle=True, drop_last=True, seed=seed)


def _run(args, name: str, batch: int, budget: float, method: str) -> tuple[dict, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    loader = _data(args.size, args.train_batch)
    trainer = SupervisedTrainer(loader, None, lr=0.01, progress=False)
    example = (torch.randn(1, 3, args.size, args.size),)
    common = {
        "latency_budget": budget,
        "latency_backend": "ort",
        "latency_batch": batch,
        "latency_cache": str(RESULTS / f"latency_lut_{name}_{args.size}_b{batch}.json"),
        "channel_step": args.channel_step,
    }
    it = args.iterations
    if method == "iee":
        opts = {**common, "total_iterations": it, "update_period": (max(1, it // 4),) * 3}
    else:
        opts = {
            **common,
            "pretrain_iterations": it,
            "taylor_iterations": it,
            "finetune_iterations": 0,
        }
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(model, method, example_inputs=example, trainer=trainer, **opts)
    d = r.diagnostics
    row = {
        "model": name,
        "batch": batch,
        "budget": budget,
        "method": method,
        "wall_s": time.perf_counter() - t0,
        "dense_ms_in_run": d["latency_full_ms"],
        "budget_ms_in_run": d["latency_budget_ms"],
        "measured_ms_in_run": d["latency_measured_ms"],
        "lut_estimate_ms": d["latency_estimate_ms"],
        "lut_full_ms": d["latency_lut_full_ms"],
        "table_gap": d["latency_calibration"]["table_gap"],
        "calibration_points": d["latency_calibration"]["points"],
        "params": r.shrink.params_after if r.shrink else None,
        "dense_params": r.shrink.params_before if r.shrink else None,
    }
    return row, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default="0.5,0.7")
    ap.add_argument("--methods", default="iee,channel-taylor")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--channel-step", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS / "channel_latency.json"))
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            results = {}
            for budget in (float(b) for b in args.budgets.split(",")):
                for method in args.methods.split(","):
                    row, r = _run(args, name, batch, budget, method)
                    results[(budget, method)] = (row, r)
                    print(
                        f"{name} b{batch} {method} {budget:.0%}: in-run {row['measured_ms_in_run']:.2f}"
                        f" ms vs budget {row['budget_ms_in_run']:.2f} ({row['wall_s']:.0f} s)",
                        flush=True,
                    )
            # one interleaved measurement: dense and every pruned model, alternating
            x = torch.randn(batch, 3, args.size, args.size)
            with tempfile.TemporaryDirectory() as tmp:
                files = {
                    "dense": export_onnx(
                        getattr(torchvision.models, name)(weights=None).eval(),
                        (x,),
                        Path(tmp) / "dense.onnx",
                        verify=False,
                    ).path
                }
                for (budget, method), (_, r) in results.items():
                    files[f"{method}@{budget}"] = r.export_onnx(
                        Path(tmp) / f"{method}_{budget}.onnx", example_inputs=(x,)
                    ).path
                lat = ort_latency(files, (x,), warmup=5, repeat=args.repeat)
            dense = lat["dense"].median_ms
            for (budget, method), (row, _) in results.items():
                ms = lat[f"{method}@{budget}"].median_ms
                row.update(
                    dense_ms=dense,
                    pruned_ms=ms,
                    pruned_p90_ms=lat[f"{method}@{budget}"].p90_ms,
                    dense_p90_ms=lat["dense"].p90_ms,
                    fraction=ms / dense,
                    vs_budget=ms / (budget * dense),
                    within_10pct=abs(ms / (budget * dense) - 1) <= 0.10,
                )
                rows.append(row)
    lines = [
        "| model | batch | budget | method | dense ms | pruned ms | fraction | vs budget | within 10% "
        "| table gap | params (dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['budget']:.0%} | {r['method']} | "
            f"{r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['fraction']:.3f} | "
            f"{r['vs_budget']:.3f} | {'yes' if r['within_10pct'] else 'no'} | "
            f"{r['table_gap']:.2f} | {r['params'] / 1e6:.2f}M ({r['dense_params'] / 1e6:.2f}M) |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(
        json.dumps(
            {"machine": machine_info(), "args": vars(args), "rows": rows, "table": table}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
