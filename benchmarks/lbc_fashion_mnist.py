"""LBC vs SR-STE vs STE vs ASP on Fashion-MNIST for 2:4, 1:4, 2:8 and 1:16, plus a small vision
transformer (attention in_proj / out_proj and MLP linears all N:M).

Every method gets the same number of training iterations (ASP: half dense, then prune and
fine-tune for the other half); accuracy (mean ± std over seeds) and training FLOPs relative to
dense training, twice: nmcompile's counter (what the computation needs) and the paper's Table 1
convention (SR-STE zeta_P + 2 zeta_D, LBC 2 zeta_P + zeta_D). The ViT prunes every linear
including the head, as the paper does for DeiT. Claim tested: LBC >= SR-STE at fewer training
FLOPs. Finished runs are appended to a JSON-lines file; the sweep resumes where it stopped.

    python benchmarks/lbc_fashion_mnist.py              # resnet20 + a small ViT, Fashion-MNIST
    python benchmarks/lbc_fashion_mnist.py --quick      # small CNN on digits (minutes)
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
import torchvision
from _runlog import RunLog  # benchmarks/_runlog.py (scripts run from this folder)
from torch import nn

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"
METHODS = ("lbc", "sr-ste", "ste", "asp")


def _vit(in_channels: int, image: int, classes: int) -> nn.Module:
    patch = 4 if image % 4 == 0 else 2
    m = torchvision.models.VisionTransformer(
        image_size=image,
        patch_size=patch,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=classes,
    )
    m.conv_proj = nn.Conv2d(in_channels, 64, patch, patch)
    return m


def _run(args, model_name: str, seed: int, method: str, pattern: str) -> dict[str, Any]:
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    if args.device != "cpu":
        ds.to(args.device)  # batches sliced on the GPU, same order
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = (
        _vit(c, h, ds.num_classes)
        if model_name == "vit"
        else zoo.create(model_name, num_classes=ds.num_classes, in_channels=c, image_size=h)
    )
    trainer = SupervisedTrainer(
        ds.train,
        ds.val,
        lr=args.lr if model_name != "vit" else args.vit_lr,
        schedule="cosine",  # the paper's; a step drop at 1/2 would coincide with t_f
        progress=False,
        device=args.device,
    )
    it = args.iterations
    opts: dict[str, Any] = {"seed": seed}
    if method == "asp":
        opts.update(pretrain_iterations=it // 2, finetune_iterations=it - it // 2)
    else:
        opts["total_iterations"] = it
    if model_name == "vit":
        opts["prune_classifier"] = True  # DeiT: every linear, the head included
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model, method, pattern, example_inputs=(ds.example_input(1),), trainer=trainer, **opts
        )
    table1 = r.diagnostics.get("flops_table1_per_sample")
    return {
        "accuracy": r.history[-1]["accuracy"],
        "train_flops": r.history[-1]["train_flops"],
        "table1_rel": table1 / r.flops.train_step() if table1 else None,
        "dense_step_flops": r.flops.train_step(),
        "sites": len(r.sites),
        "samples": r.history[-1]["samples"],
        "wall_s": time.perf_counter() - t0,
    }


def _table(runs: list[dict]) -> tuple[str, dict]:
    lines = [
        "| model | pattern | method | top-1 % (mean ± std) | training FLOPs (x dense), counter "
        "| Table 1 convention | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    acc, flops = {}, {}
    for model in sorted({r["model"] for r in runs}):
        for pattern in ("2:4", "1:4", "2:8", "1:16"):
            for m in METHODS:
                got = [
                    r
                    for r in runs
                    if (r["model"], r["pattern"], r["method"]) == (model, pattern, m)
                ]
                if not got:
                    continue
                a = [100 * r["accuracy"] for r in got]
                # relative to dense training for the same number of samples
                rel = statistics.mean(
                    r["train_flops"] / (r["dense_step_flops"] * r["samples"]) for r in got
                )
                acc[(model, pattern, m)], flops[(model, pattern, m)] = statistics.mean(a), rel
                t1 = [r["table1_rel"] for r in got if r.get("table1_rel") is not None]
                lines.append(
                    f"| {model} | {pattern} | {m} | {statistics.mean(a):.2f} ± "
                    f"{statistics.stdev(a) if len(a) > 1 else 0.0:.2f} | {rel:.3f}x | "
                    f"{f'{statistics.mean(t1):.3f}x' if t1 else '-'} | {len(got)} |"
                )
    claims = {}
    for (model, pattern, m), a in acc.items():
        if m == "lbc" and (model, pattern, "sr-ste") in acc:
            claims[f"{model} {pattern}"] = {
                "lbc_ge_sr_ste": a >= acc[(model, pattern, "sr-ste")],
                "lbc_minus_sr_ste": a - acc[(model, pattern, "sr-ste")],
                "lbc_fewer_flops": flops[(model, pattern, m)] < flops[(model, pattern, "sr-ste")],
                "flops_lbc_over_sr_ste": flops[(model, pattern, m)]
                / flops[(model, pattern, "sr-ste")],
            }
    return "\n".join(lines), claims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--patterns", default="2:4,1:4,2:8,1:16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--vit-lr", type=float, default=0.02)
    ap.add_argument(
        "--vit-patterns", default="2:4", help="patterns for the small ViT run ('' none)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training; latency stays ORT CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.model = args.model or ("cnn" if args.quick else "resnet20")
    args.dataset = args.dataset or ("digits" if args.quick else "fashion-mnist")
    args.iterations = args.iterations or (200 if args.quick else 300)
    args.batch_size = args.batch_size or (64 if args.quick else 128)
    tag = "lbc_quick" if args.quick else "lbc_fashion_mnist"
    out = Path(args.out or RESULTS / f"{tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = {
        "model": args.model,
        "dataset": args.dataset,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": "cosine",  # rows logged before this key existed used steps at 1/2 and 3/4
    }
    log = RunLog(out, setting)
    runs = log.runs
    done = log.done(lambda r: (r["model"], r["seed"], r["method"], r["pattern"]))
    jobs = [
        (args.model, s, m, p)
        for s in map(int, args.seeds.split(","))
        for p in args.patterns.split(",")
        for m in METHODS
    ]
    jobs += [
        ("vit", s, m, p)
        for s in map(int, args.seeds.split(","))
        for p in filter(None, args.vit_patterns.split(","))
        for m in ("lbc", "sr-ste")
    ]
    for model, seed, method, pattern in jobs:
        if (model, seed, method, pattern) in done:
            continue
        res = _run(args, model, seed, method, pattern)
        log.append({"model": model, "seed": seed, "method": method, "pattern": pattern, **res})
        print(
            f"{model} {pattern:4s} seed {seed} {method:6s} acc {100 * res['accuracy']:.2f}% "
            f"flops {res['train_flops'] / 1e12:.3f}e12 ({res['wall_s']:.0f} s)",
            flush=True,
        )
    table, claims = _table(runs)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"machine": machine_info(), "setting": setting, "claims": claims, "table": table},
            indent=2,
        )
        + "\n"
    )
    print(table)
    print(json.dumps(claims, indent=2))


if __name__ == "__main__":
    main()
