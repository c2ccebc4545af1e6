"""IEE vs RigL vs SET vs static on Fashion-MNIST, plus latency-constrained channels.

Weights: 80% and 90% unstructured sparsity with uniform and ERK layer budgets, and 2:4; every
method trains ``--iterations`` from a sparse start at the budget; accuracy (mean ± std over
seeds) and training FLOPs (nmcompile's counter). Channels: IEE with a latency budget vs one-shot
Taylor pruning (``channel-taylor``) at the same budget of measured latency (ONNX Runtime CPU
lookup table); both shrunk models are timed on ONNX Runtime CPU.

Claim tested: IEE > RigL > static at equal training FLOPs. IEE's exploration steps cost more
than a sparse step, so besides the runs at equal iterations, RigL and static are run again for as
many iterations as bring their training FLOPs to IEE's (``rigl =FLOPs``, ``static =FLOPs``), and
the claim is judged on those. FLOPs here are the counter's, as computed (an exploration step's
dense forward and activation gradient included; the appendix convention charges less, see
``_methods/_iee.py``); the converged regime, with IEE shortened as the paper does, is
``dst_converged.py``. Finished runs are appended to a JSON-lines file; the sweep resumes
where it stopped.

    python benchmarks/iee_fashion_mnist.py              # resnet20, Fashion-MNIST (hours on CPU)
    python benchmarks/iee_fashion_mnist.py --quick      # small CNN on digits (minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _runlog import RunLog  # benchmarks/_runlog.py (scripts run from this folder)

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile._machine import machine_info
from nmcompile.runtime import export_onnx, ort_latency

RESULTS = Path(__file__).parent / "results"
METHODS = ("iee", "rigl", "set", "static")
EQUAL_FLOPS = ("rigl", "static")  # re-run with IEE's training FLOPs


def _eq(method: str) -> str:
    return f"{method} =FLOPs"


SETTINGS = (
    ("80% uniform", 0.8, "uniform"),
    ("80% ERK", 0.8, "erk"),
    ("90% uniform", 0.9, "uniform"),
    ("90% ERK", 0.9, "erk"),
    ("2:4", None, "uniform"),
)


def _setup(args, seed: int):
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    if args.device != "cpu":
        ds.to(args.device)  # batches sliced on the GPU, same order
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    trainer = SupervisedTrainer(
        ds.train, ds.val, lr=args.lr, milestones=(0.5, 0.75), progress=False, device=args.device
    )
    return ds, model, trainer


def _weights_run(
    args, seed: int, method: str, sparsity: float | None, budget: str, iterations: int | None = None
) -> dict:
    ds, model, trainer = _setup(args, seed)
    p = args.period
    opts: dict[str, Any] = {
        "seed": seed,
        "total_iterations": iterations or args.iterations,
        "layer_budget": budget,
    }
    if sparsity is not None:
        opts["target_sparsity"] = sparsity
    if method == "iee":
        opts["update_period"] = (p, p, p)
    elif method in ("rigl", "set"):
        opts["update_interval"] = 3 * p
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model, method, "2:4", example_inputs=(ds.example_input(1),), trainer=trainer, **opts
        )
    d = r.diagnostics
    return {
        "accuracy": r.history[-1]["accuracy"],
        "train_flops": r.history[-1]["train_flops"],
        "iterations": iterations or args.iterations,
        "sparsity": r.sparsity,
        "wall_s": time.perf_counter() - t0,
        "survival": statistics.mean(d["grown_survival"]) if d.get("grown_survival") else None,
        "iou_grow_last": d["iou_after_grow"][-1] if d.get("iou_after_grow") else None,
    }


def _channel_run(args, seed: int, method: str) -> dict:
    ds, model, trainer = _setup(args, seed)
    lut = str(RESULTS / f"latency_lut_{args.model}_{args.dataset}.json")
    common = {
        "seed": seed,
        "latency_budget": args.latency_budget,
        "latency_backend": "ort",
        "latency_cache": lut,
    }
    if method == "iee":
        opts = {**common, "total_iterations": args.iterations, "update_period": (args.period,) * 3}
    else:
        half = args.iterations // 2
        opts = {
            **common,
            "pretrain_iterations": half,
            "finetune_iterations": args.iterations - half,
            "taylor_iterations": min(50, half),
        }
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model, method, example_inputs=(ds.example_input(1),), trainer=trainer, **opts
        )
    x = ds.example_input(args.latency_batch)
    with tempfile.TemporaryDirectory() as tmp:
        dense = export_onnx(model.eval(), (x,), Path(tmp) / "dense.onnx", verify=False)
        small = r.export_onnx(Path(tmp) / "pruned.onnx", example_inputs=(x,))
        lat = ort_latency(
            {"dense": dense.path, "pruned": small.path}, (x,), warmup=5, repeat=args.latency_repeat
        )
    return {
        "accuracy": r.history[-1]["accuracy"],
        "train_flops": r.history[-1]["train_flops"],
        "params": r.shrink.params_after if r.shrink else None,
        "dense_params": r.shrink.params_before if r.shrink else None,
        "latency_ms": lat["pruned"].median_ms,
        "dense_latency_ms": lat["dense"].median_ms,
        "lut_estimate_ms": r.diagnostics["latency_estimate_ms"],
        "lut_full_ms": r.diagnostics["latency_full_ms"],
        "wall_s": time.perf_counter() - t0,
    }


def _summary(runs: list[dict]) -> tuple[str, dict]:
    lines = [
        "| setting | method | top-1 % (mean ± std) | training FLOPs (10^12) | grown survival | seeds |",
        "|---|---|---|---|---|---|",
    ]
    acc: dict[tuple[str, str], float] = {}
    for label, _, _ in SETTINGS:
        for m in (*METHODS, *(_eq(x) for x in EQUAL_FLOPS)):
            got = [r for r in runs if r.get("setting_label") == label and r["method"] == m]
            if not got:
                continue
            a = [100 * r["accuracy"] for r in got]
            acc[(label, m)] = statistics.mean(a)
            surv = [r["survival"] for r in got if r.get("survival") is not None]
            surv_text = f"{statistics.mean(surv):.2f}" if surv else "-"
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            flops = statistics.mean(r["train_flops"] for r in got) / 1e12
            lines.append(
                f"| {label} | {m} | {statistics.mean(a):.2f} ± {sd:.2f} | {flops:.3f} | "
                f"{surv_text} | {len(got)} |"
            )
    ch = [r for r in runs if r.get("channels")]
    if ch:
        lines += [
            "",
            "| channels | top-1 % | params (dense) | ORT CPU ms (dense) | LUT estimate / full ms | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for m in ("iee", "channel-taylor"):
            got = [r for r in ch if r["method"] == m]
            if got:
                lines.append(
                    f"| {m} | {statistics.mean(100 * r['accuracy'] for r in got):.2f} | "
                    f"{statistics.mean(r['params'] for r in got):,.0f} "
                    f"({got[0]['dense_params']:,}) | {statistics.mean(r['latency_ms'] for r in got):.2f} "
                    f"({statistics.mean(r['dense_latency_ms'] for r in got):.2f}) | "
                    f"{statistics.mean(r['lut_estimate_ms'] for r in got):.2f} / "
                    f"{got[0]['lut_full_ms']:.2f} | {len(got)} |"
                )
    claims = {}
    for label, _, _ in SETTINGS:
        rigl, static = _eq("rigl"), _eq("static")
        if all((label, m) in acc for m in ("iee", rigl, static)):
            claims[label] = {  # at equal training FLOPs
                "iee_gt_rigl": acc[(label, "iee")] > acc[(label, rigl)],
                "rigl_gt_static": acc[(label, rigl)] > acc[(label, static)],
                "iee_minus_rigl": acc[(label, "iee")] - acc[(label, rigl)],
                "rigl_minus_static": acc[(label, rigl)] - acc[(label, static)],
            }
    return "\n".join(lines), claims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--period", type=int, default=None, help="H = J = Q")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--latency-budget", type=float, default=0.5)
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--latency-repeat", type=int, default=30)
    ap.add_argument("--no-channels", action="store_true")
    ap.add_argument(
        "--settings",
        default=",".join(label for label, _, _ in SETTINGS),
        help="comma-separated subset of the weight settings, e.g. '80%% uniform,2:4'",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training; latency stays ORT CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.model = args.model or ("cnn" if args.quick else "resnet20")
    args.dataset = args.dataset or ("digits" if args.quick else "fashion-mnist")
    args.iterations = args.iterations or (240 if args.quick else 300)
    args.period = args.period or (20 if args.quick else 25)
    args.batch_size = args.batch_size or (64 if args.quick else 128)
    tag = "iee_quick" if args.quick else "iee_fashion_mnist"
    out = Path(args.out or RESULTS / f"{tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = {
        "model": args.model,
        "dataset": args.dataset,
        "iterations": args.iterations,
        "period": args.period,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    log = RunLog(out, setting)
    runs = log.runs
    done = log.done(
        lambda r: (r["seed"], r["method"], r.get("setting_label"), r.get("channels", False))
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    record = log.append
    wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
    known = [label for label, _, _ in SETTINGS]
    if unknown := [w for w in wanted if w not in known]:
        ap.error(f"--settings: unknown {unknown}; valid: {known}")
    settings = [s for s in SETTINGS if s[0] in wanted]

    for seed in seeds:
        for label, sparsity, budget in settings:
            for m in METHODS:
                if (seed, m, label, False) in done:
                    continue
                res = _weights_run(args, seed, m, sparsity, budget)
                record({"seed": seed, "method": m, "setting_label": label, **res})
                print(
                    f"seed {seed} {label:11s} {m:6s} acc {100 * res['accuracy']:.2f}% flops "
                    f"{res['train_flops'] / 1e12:.3f}e12 ({res['wall_s']:.0f} s)",
                    flush=True,
                )
            # RigL and static again, for as many iterations as cost IEE's training FLOPs
            by = {
                r["method"]: r
                for r in runs
                if r["seed"] == seed and r.get("setting_label") == label
            }
            for m in EQUAL_FLOPS:
                if (seed, _eq(m), label, False) in done or "iee" not in by or m not in by:
                    continue
                its = round(args.iterations * by["iee"]["train_flops"] / by[m]["train_flops"])
                res = _weights_run(args, seed, m, sparsity, budget, iterations=its)
                record({"seed": seed, "method": _eq(m), "setting_label": label, **res})
                print(
                    f"seed {seed} {label:11s} {_eq(m)} ({its} it) acc {100 * res['accuracy']:.2f}% "
                    f"flops {res['train_flops'] / 1e12:.3f}e12 ({res['wall_s']:.0f} s)",
                    flush=True,
                )
        if not args.no_channels:
            for m in ("iee", "channel-taylor"):
                if (seed, m, None, True) in done:
                    continue
                res = _channel_run(args, seed, m)
                record(
                    {
                        "seed": seed,
                        "method": m,
                        "setting_label": None,
                        "channels": True,
                        **res,
                    }
                )
                print(
                    f"seed {seed} channels {m:14s} acc {100 * res['accuracy']:.2f}% ORT "
                    f"{res['latency_ms']:.2f} ms (dense {res['dense_latency_ms']:.2f}) params "
                    f"{res['params']:,} ({res['wall_s']:.0f} s)",
                    flush=True,
                )
    table, claims = _summary(runs)
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
