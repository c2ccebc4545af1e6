"""Where L-mIMP loses accuracy against mIMP: early-bird round stopping vs proactive local pruning.

Same setting as ``lth_fashion_mnist.py --quick`` (small CNN on digits, 40 iterations per round,
batch 64, lr 0.05, milestones at 50/75% of a round), 3 seeds, 2:4 and 1:4. Variants: ``lmimp``,
``lmimp-no-eb`` (early-bird stopping off: ``eb_start_round`` past the last round),
``lmimp-no-plp`` (PLP off: ``plp_start_round`` past the last round, early-bird from round 2), and
``mimp`` (neither).

    python benchmarks/lmimp_ablation.py      # writes benchmarks/results/lmimp_ablation.json(l)
    python benchmarks/lmimp_ablation.py --model resnet20 --dataset fashion-mnist \
        --iterations 100 --batch-size 128 --patterns 2:4 --variants lmimp-no-eb
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
from _runlog import RunLog

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"
NEVER = 10_000  # a round index no run reaches
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lmimp": ("lmimp", {}),
    "lmimp-no-eb": ("lmimp", {"eb_start_round": NEVER}),
    # eb_start_round defaults to plp_start_round: keep early-bird on from round 2
    "lmimp-no-plp": ("lmimp", {"plp_start_round": NEVER, "eb_start_round": 2}),
    "mimp": ("mimp", {}),
}


def _run(args, pattern: str, seed: int, variant: str) -> dict[str, Any]:
    method, extra = VARIANTS[variant]
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    trainer = SupervisedTrainer(
        ds.train, ds.val, lr=args.lr, milestones=(0.5, 0.75), progress=False
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model,
            method,
            pattern,
            example_inputs=(ds.example_input(1),),
            trainer=trainer,
            iterations_per_round=args.iterations,
            seed=seed,
            **extra,
        )
    hist = r.history
    return {
        "accuracy": hist[-1]["accuracy"],
        "train_flops": hist[-1]["train_flops"],
        "rounds": len(hist),
        "stopped_early": sum(bool(x.get("stopped_early")) for x in hist),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--patterns", default="2:4,1:4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    quick = args.model == "cnn" and args.dataset == "digits"
    args.out = args.out or str(
        RESULTS / ("lmimp_ablation.jsonl" if quick else f"lmimp_ablation_{args.model}.jsonl")
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    setting = {k: getattr(args, k) for k in ("model", "dataset", "iterations", "batch_size", "lr")}
    log = RunLog(args.out, setting)
    done = log.done(lambda r: (r["pattern"], r["seed"], r["variant"]))
    patterns = args.patterns.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for pattern in patterns:
        for seed in seeds:
            for variant in variants:
                if (pattern, seed, variant) in done:
                    continue
                res = _run(args, pattern, seed, variant)
                log.append({"pattern": pattern, "seed": seed, "variant": variant, **res})
                print(
                    f"{pattern} seed {seed} {variant:22s} acc {100 * res['accuracy']:.2f}% "
                    f"flops {res['train_flops'] / 1e12:.3f}e12 rounds {res['rounds']} "
                    f"stopped early {res['stopped_early']} ({res['wall_s']:.0f} s)",
                    flush=True,
                )
    lines = [
        "| pattern | variant | top-1 % (mean ± std) | training FLOPs (10^12) | rounds | "
        "rounds stopped early |",
        "|---|---|---|---|---|---|",
    ]
    for pattern in patterns:
        for variant in VARIANTS:
            got = [r for r in log.runs if r["pattern"] == pattern and r["variant"] == variant]
            if not got:
                continue
            acc = [100 * r["accuracy"] for r in got]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            lines.append(
                f"| {pattern} | {variant} | {statistics.mean(acc):.2f} ± {sd:.2f} | "
                f"{statistics.mean(r['train_flops'] for r in got) / 1e12:.3f} | "
                f"{statistics.mean(r['rounds'] for r in got):.1f} | "
                f"{statistics.mean(r['stopped_early'] for r in got):.1f} |"
            )
    table = "\n".join(lines)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"machine": machine_info(), "setting": setting, "table": table}, indent=2) + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
