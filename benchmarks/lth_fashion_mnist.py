"""Lottery tickets for N:M on Fashion-MNIST: dense, asp, eb, mimp, mimp-high, mimp-rand, lmimp.

A table shaped like Table 1 of the mIMP paper: top-1 accuracy (mean ± std over seeds) and
training FLOPs per method and pattern. The claims tested: lmimp within 0.5 point of mimp at
>= 8x fewer training FLOPs; mimp >= asp; rewinding (mimp) beats re-initialisation (mimp-rand).

Every finished run is appended to a JSON-lines file at once, so an interrupted benchmark resumes
where it stopped (runs already in the file are skipped).

    python benchmarks/lth_fashion_mnist.py                 # resnet20 on Fashion-MNIST (hours on CPU)
    python benchmarks/lth_fashion_mnist.py --quick         # small CNN on digits (minutes)

Budgets: every method trains rounds of ``--iterations`` iterations (batch ``--batch-size``);
asp = one dense round + one fine-tuning round, eb = one dense round cut short by its detector +
one round, dense = two rounds, the mIMP family rounds until the losing-ticket pool is cleared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _runlog import RunLog, result_row  # benchmarks/_runlog.py (scripts run from this folder)

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "asp", "eb", "mimp", "mimp-high", "mimp-rand", "lmimp")


def _one_run(args: argparse.Namespace, pattern: str, seed: int, method: str) -> dict[str, Any]:
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    trainer = SupervisedTrainer(
        ds.train, ds.val, lr=args.lr, milestones=(0.5, 0.75), progress=False
    )
    it = args.iterations
    t0 = time.perf_counter()
    if method == "dense":
        samples = 0

        def count(info) -> None:
            nonlocal samples
            samples += info.batch_size

        trainer.train(model, 2 * it, count)
        acc = trainer.evaluate(model)
        # dense FLOPs from the same counter the methods use
        gm_flops = nmcompile.compile(
            model, "asp", pattern, example_inputs=(ds.example_input(1),), finetune_iterations=0
        ).flops
        return {
            "accuracy": acc,
            "train_flops": samples * gm_flops.train_step(),
            "rounds": 2,  # rounds of --iterations, as for the methods
            "wall_s": time.perf_counter() - t0,
            "sparsity": 0.0,
        }
    options: dict[str, Any] = {"seed": seed}
    if method == "asp":
        options.update(pretrain_iterations=it, finetune_iterations=it)
    elif method == "eb":
        options.update(iterations_per_round=it, eb_interval=max(1, it // 10))
    else:
        options.update(iterations_per_round=it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model,
            method,
            pattern,
            example_inputs=(ds.example_input(1),),
            trainer=trainer,
            **options,
        )
    return result_row(r, t0)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(
    runs: list[dict[str, Any]], patterns: list[str], seeds: list[int]
) -> tuple[str, dict]:
    lines, claims = [], {}
    for pattern in patterns:
        rows = []
        stats: dict[str, dict[str, float]] = {}
        for method in METHODS:
            got = [
                r
                for r in runs
                if r["pattern"] == pattern and r["method"] == method and r["seed"] in seeds
            ]
            if not got:
                continue
            acc_m, acc_s = _mean_std([100 * r["accuracy"] for r in got])
            fl_m, _ = _mean_std([r["train_flops"] for r in got])
            rounds = statistics.mean(r["rounds"] for r in got)
            stats[method] = {"acc": acc_m, "flops": fl_m}
            rows.append(
                f"| {method} | {acc_m:.2f} ± {acc_s:.2f} | {fl_m / 1e12:.2f} | "
                f"{rounds:.1f} | {len(got)} |"
            )
        # The paper's "L-mIMP Improvement" row: L-mIMP against the average of the other sparse
        # methods, accuracy difference and how many times fewer training FLOPs.
        others = [m for m in stats if m not in ("dense", "lmimp")]
        if "lmimp" in stats and others:
            acc_avg = statistics.mean(stats[m]["acc"] for m in others)
            fl_avg = statistics.mean(stats[m]["flops"] for m in others)
            rows.append(
                f"| L-mIMP improvement (vs the average of {', '.join(others)}) | "
                f"{stats['lmimp']['acc'] - acc_avg:+.2f} | "
                f"{fl_avg / stats['lmimp']['flops']:.2f}x fewer | | |"
            )
        lines += [
            f"**{pattern}**",
            "",
            "| method | top-1 % (mean ± std) | training FLOPs (10^12) | rounds | seeds |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
        c: dict[str, Any] = {}
        if {"lmimp", "mimp"} <= set(stats):
            gap = stats["mimp"]["acc"] - stats["lmimp"]["acc"]
            ratio = stats["mimp"]["flops"] / stats["lmimp"]["flops"]
            c["lmimp_within_0.5_of_mimp"] = gap <= 0.5
            c["lmimp_flops_ratio"] = ratio
            c["lmimp_8x_fewer_flops"] = ratio >= 8
            c["mimp_minus_lmimp_points"] = gap
        if {"mimp", "asp"} <= set(stats):
            c["mimp_ge_asp"] = stats["mimp"]["acc"] >= stats["asp"]["acc"]
            c["mimp_minus_asp_points"] = stats["mimp"]["acc"] - stats["asp"]["acc"]
        if {"mimp", "mimp-rand"} <= set(stats):
            c["rewind_beats_rand"] = stats["mimp"]["acc"] > stats["mimp-rand"]["acc"]
            c["mimp_minus_rand_points"] = stats["mimp"]["acc"] - stats["mimp-rand"]["acc"]
        claims[pattern] = c
    return "\n".join(lines), claims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CNN on digits, short rounds")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--patterns", default="2:4,1:4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iterations", type=int, default=None, help="iterations per round")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=None, help="JSON-lines file of finished runs")
    args = ap.parse_args()
    quick = args.quick
    args.model = args.model or ("cnn" if quick else "resnet20")
    args.dataset = args.dataset or ("digits" if quick else "fashion-mnist")
    args.iterations = args.iterations or (40 if quick else 100)
    args.batch_size = args.batch_size or (64 if quick else 128)
    tag = "lth_quick" if quick else "lth_fashion_mnist"
    out = Path(args.out or RESULTS / f"{tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    patterns = args.patterns.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    setting = {
        "model": args.model,
        "dataset": args.dataset,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }

    log = RunLog(out, setting)
    done = log.done(lambda r: (r["pattern"], r["seed"], r["method"]))
    for pattern in patterns:
        for seed in seeds:
            for method in methods:
                if (pattern, seed, method) in done:
                    continue
                res = _one_run(args, pattern, seed, method)
                log.append({"pattern": pattern, "seed": seed, "method": method, **res})
                print(
                    f"{pattern} seed {seed} {method:9s} acc {100 * res['accuracy']:.2f}% "
                    f"flops {res['train_flops'] / 1e12:.3f}e12 rounds {res['rounds']} "
                    f"({res['wall_s']:.0f} s)",
                    flush=True,
                )
    table, claims = summarise(log.runs, patterns, seeds)
    summary = {"machine": machine_info(), "setting": setting, "claims": claims, "table": table}
    Path(str(out).replace(".jsonl", ".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(json.dumps(claims, indent=2))


if __name__ == "__main__":
    main()
