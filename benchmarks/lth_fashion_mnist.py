"""Lottery tickets for N:M on Fashion-MNIST: dense, asp, eb, mimp, mimp-high, mimp-rand, lmimp.

A table shaped like Table 1 of the mIMP paper: top-1 accuracy and training FLOPs per method and
pattern, and the paper's claims judged on paired seeds (``benchmarks/claims.py``): mIMP >= ASP;
rewinding (mimp) beats re-initialisation (mimp-rand); L-mIMP within 0.5 point of mIMP at the
paper's training-FLOPs saving, and against the mean of the other methods (the table's
"L-mIMP Improvement" row).

Regimes:

    python benchmarks/lth_fashion_mnist.py --regime converged   # LeNet-300-100, every round converged
    python benchmarks/lth_fashion_mnist.py                      # resnet20, 100-iteration rounds (short)
    python benchmarks/lth_fashion_mnist.py --quick              # small CNN on digits (minutes)

``--regime converged`` trains LeNet-300-100 (784-300-100-10, the classic lottery-ticket MLP,
``prune_stem=True``) with rounds long enough to converge, and measures that they are: ``dense-1r``
trains one round's iterations, ``dense`` two; the claims count as converged only when the second
gains less than 0.5 point (full 10k test set). Seeds are paired: within a seed every method starts
from the same initialisation (``torch.manual_seed(seed)`` before the model is built) and draws
the same batches (the loader's own seed). ``--device cuda`` trains on a GPU.

Every finished run is appended to a JSON-lines file at once, so an interrupted benchmark resumes
where it stopped (runs already in the file are skipped), and the sweep can be run in parts
(``--patterns``, ``--seeds``, ``--methods``).

Budgets: every method trains rounds of ``--iterations`` iterations (batch ``--batch-size``);
asp = one dense round + one fine-tuning round, eb = one dense round cut short by its detector +
one round, dense = two rounds, dense-1r = one, the mIMP family rounds until the losing-ticket
pool is cleared.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import claims as claimlib  # benchmarks/claims.py
import torch
from _runlog import RunLog, result_row  # benchmarks/_runlog.py (scripts run from this folder)

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "asp", "eb", "mimp", "mimp-high", "mimp-rand", "lmimp")
# benchmark method -> (nmcompile method, options beyond the schedule)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "asp": ("asp", {}),
    "eb": ("eb", {}),
    "mimp": ("mimp", {}),
    "mimp-high": ("mimp-high", {}),
    "mimp-rand": ("mimp-rand", {}),
    # A.3's schedule: early-bird checks from round R_t = 2, Algorithm 2's layer-mean distance
    "lmimp": ("lmimp", {}),
    # every round may stop early (Algorithm 2 as printed gates only PLP on R_t)
    "lmimp-eb0": ("lmimp", {"eb_start_round": 0}),
    # the pool-normalised distance: beta is the fraction of the pruning decision that changed
    "lmimp-pool": ("lmimp", {"eb_distance": "pool"}),
}
CONVERGED = {
    "model": "lenet300",
    "dataset": "fashion-mnist",
    # doubling the dense run from 3000 gained +0.43 / +0.54 (seeds 0, 1), from 4000 +0.91 / +0.76,
    # from 8000 +0.30 (seed 0): rounds of 8000 (17 epochs), checked per seed by dense-1r vs dense
    "iterations": 8000,
    "batch_size": 128,
    "seeds": "0,1,2",
    "methods": "dense-1r,dense,asp,mimp,mimp-rand,lmimp,lmimp-eb0,lmimp-pool",
}


def _one_run(args: argparse.Namespace, pattern: str, seed: int, method: str) -> dict[str, Any]:
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    if args.device != "cpu":
        ds.to(args.device)  # batches sliced on the GPU, same order
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    trainer = SupervisedTrainer(
        ds.train, ds.val, lr=args.lr, milestones=(0.5, 0.75), progress=False, device=args.device
    )
    it = args.iterations
    t0 = time.perf_counter()
    if method in ("dense", "dense-1r"):
        samples = 0

        def count(info) -> None:
            nonlocal samples
            samples += info.batch_size

        rounds = 2 if method == "dense" else 1
        trainer.train(model, rounds * it, count)
        acc = trainer.evaluate(model)
        # dense FLOPs from the same counter the methods use
        gm_flops = nmcompile.compile(
            model.cpu(),
            "asp",
            pattern,
            example_inputs=(ds.example_input(1),),
            finetune_iterations=0,
        ).flops
        return {
            "accuracy": acc,
            "train_flops": samples * gm_flops.train_step(),
            "rounds": rounds,  # rounds of --iterations, as for the methods
            "wall_s": time.perf_counter() - t0,
            "sparsity": 0.0,
        }
    base, extra = VARIANTS[method]
    options: dict[str, Any] = {"seed": seed, "prune_stem": args.prune_stem, **extra}
    method = base
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


def print_bounds(args: argparse.Namespace, patterns: list[str], methods: list[str]) -> None:
    """Before any run: the most training FLOPs each L-mIMP variant can save over mIMP under its
    schedule (``lottery.lmimp_flops_bound``, iterations weighted by the FLOPs of an iteration at
    the round's density), so an unreachable target is seen before hours are spent on it."""
    from nmcompile._methods.lottery import LMIMPConfig, lmimp_flops_bound

    variants = [m for m in methods if VARIANTS.get(m, ("",))[0] == "lmimp"]
    if not variants:
        return
    ds = data.load(args.dataset, batch_size=args.batch_size)
    c, h, _ = ds.input_shape
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    for pattern in patterns:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fl = nmcompile.compile(
                model,
                "asp",
                pattern,
                example_inputs=(ds.example_input(1),),
                finetune_iterations=0,
                prune_stem=args.prune_stem,
            ).flops

        def cost(d: float, fl=fl) -> float:
            return fl.train_step(dict.fromkeys(fl.sites, d))

        for m in variants:
            cfg = LMIMPConfig(iterations_per_round=args.iterations, **VARIANTS[m][1])
            b = lmimp_flops_bound(cfg, pattern, cost=cost)
            plp = lmimp_flops_bound(cfg, pattern, cost=cost, plp_shortens=True)
            print(
                f"{pattern} {m}: at most {plp.ratio:.2f}x fewer training FLOPs than mIMP (PLP "
                f"clearing the pool at its first step, every checked round stopping at its "
                f"earliest check); {b.ratio:.2f}x from early stops alone, without PLP; the "
                "paper reports ~11x",
                flush=True,
            )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(
    runs: list[dict[str, Any]], patterns: list[str], seeds: list[int]
) -> tuple[str, dict]:
    lines, claims = [], {}
    for pattern in patterns:
        rows = []
        stats: dict[str, dict[str, float]] = {}
        present = {r["method"] for r in runs}
        order = ["dense-1r", *METHODS, *sorted(present - set(METHODS) - {"dense-1r"})]
        for method in [m for m in order if m in present]:
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
        others = [m for m in stats if not m.startswith(("dense", "lmimp"))]
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


PAPER = "mIMP / L-mIMP (000)"


def _per_seed(runs: list[dict[str, Any]], pattern: str, key: str = "accuracy") -> dict:
    """{method: {seed: value}}, accuracies in percent."""
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        if r["pattern"] == pattern:
            v = r[key] * (100 if key == "accuracy" else 1)
            out.setdefault(r["method"], {})[r["seed"]] = v
    return out


def judge_claims(runs: list[dict[str, Any]], patterns: list[str], setting: dict) -> list[dict]:
    """The paper's claims per pattern, on paired seeds (``benchmarks/claims.py``)."""
    entries = []
    for pattern in patterns:
        acc = _per_seed(runs, pattern)
        flops = _per_seed(runs, pattern, "train_flops")
        conv = None
        if {"dense", "dense-1r"} <= set(acc):
            seeds = sorted(set(acc["dense"]) & set(acc["dense-1r"]))
            if len(seeds) >= 2:
                conv = claimlib.convergence(
                    [acc["dense-1r"][s] for s in seeds], [acc["dense"][s] for s in seeds]
                )
        common = {
            "paper": PAPER,
            "model": setting["model"],
            "dataset": setting["dataset"],
            "setting": pattern,
            "schedule": setting,
            "per_seed": {m: v for m, v in acc.items() if not m.startswith("dense")},
            "converged": conv,
        }
        entries.append(claimlib.judge(
            **common, claim="mIMP >= ASP", source="Table 1", a="mimp", b="asp"))  # fmt: skip
        entries.append(claimlib.judge(
            **common, claim="rewinding beats random re-initialisation (mIMP > mIMP-rand)",
            source="Table 1", a="mimp", b="mimp-rand", strict=True))  # fmt: skip
        for variant in [m for m in acc if m.startswith("lmimp")]:
            ratio = _flops_ratio(flops, "mimp", variant)
            entries.append(claimlib.judge(
                **common, claim=f"{variant} within 0.5 point of mIMP (at ~11x fewer FLOPs)",
                source="Table 1, Sec. 4.1", a=variant, b="mimp", threshold=-0.5,
                extra={"flops_ratio_vs_mimp": ratio, "paper_flops_ratio": 11.0}))  # fmt: skip
            others = [m for m in acc if not m.startswith(("dense", "lmimp"))]
            if len(others) >= 2:
                seeds = sorted(set.intersection(*(set(acc[m]) for m in [*others, variant])))
                mean_others = {s: statistics.mean(acc[m][s] for m in others) for s in seeds}
                per = {variant: acc[variant], "mean of others": mean_others}
                ratio_o = (
                    statistics.mean(
                        statistics.mean(flops[m][s] for m in others) / flops[variant][s]
                        for s in seeds
                    )
                    if seeds
                    else None
                )
                entries.append(claimlib.judge(
                    **{**common, "per_seed": per},
                    claim=f"{variant} at least as accurate as the mean of {', '.join(others)} "
                          "(+0.4 at ~8.6x fewer FLOPs)",
                    source="Table 1, L-mIMP Improvement row", a=variant, b="mean of others",
                    extra={"flops_ratio_vs_others": ratio_o, "paper_flops_ratio": 8.6}))  # fmt: skip
        entries.append(judge_early_bird(runs, pattern, common))
    return [e for e in entries if e is not None]


def early_bird_table(runs: list[dict[str, Any]], pattern: str) -> str:
    """Per L-mIMP run: the FLOPs bound of its schedule, and per checked round the distances at
    each check (in order; "-" where there was nothing to compare with), where it stopped, and the
    share of the pool PLP removed after the round."""
    lines = [
        "| variant | seed | bound: x fewer FLOPs than mIMP at most (early stops alone) "
        "| round: distances at the checks "
        "-> stop iteration | PLP share of the pool, per round |",
        "|---|---|---|---|---|",
    ]
    got = sorted(
        (r for r in runs if r["pattern"] == pattern and r.get("early_bird")),
        key=lambda r: (r["method"], r["seed"]),
    )
    for r in got:
        eb = r["early_bird"]
        parts = []
        for rd in eb["rounds"]:
            if not rd["checks"]:
                continue
            ds = " ".join("-" if d is None else f"{d:.3f}" for _, d in rd["checks"])
            stop = rd["stop_iteration"] if rd["stop_iteration"] is not None else "full"
            parts.append(f"{rd['round']}: {ds} -> {stop}")
        plp = " ".join(
            "-" if rd.get("plp_fraction") is None else f"{rd['plp_fraction']:.2f}"
            for rd in eb["rounds"]
        )
        bounds = [eb.get("flops_bound_plp"), eb.get("flops_bound")]
        b_plp, b_eb = ("-" if b is None else f"{b:.2f}" for b in bounds)
        lines.append(
            f"| {r['method']} ({eb['distance']}) | {r['seed']} | {b_plp} ({b_eb}) | "
            f"{'; '.join(parts)} | {plp} |"
        )
    return "\n".join(lines) if got else ""


def stop_fraction(row: dict[str, Any], iterations: int) -> float | None:
    """Mean over a run's checked rounds (those with early-bird checks) of the share of the round,
    in percent, trained before the detector fired; a round that never fired counts 100."""
    eb = row.get("early_bird") or {}
    fr = [
        100.0
        * (r["stop_iteration"] if r["stop_iteration"] is not None else iterations)
        / iterations
        for r in eb.get("rounds", [])
        if r.get("checks")
    ]
    return statistics.mean(fr) if fr else None


def judge_early_bird(runs: list[dict[str, Any]], pattern: str, common: dict) -> dict | None:
    """Early-bird tickets appear under N:M (Sec. 3.2, Fig. 2): with the pool-normalised distance
    (``lmimp-pool``), consecutive candidate masks come within beta before half the round has
    trained. Judged there and not on Algorithm 2's layer-mean distance, under which a round's
    first check fires by construction: the candidate differs from the round's own mask only in
    the p = 20% of the pool it drops, i.e. p x (pool share of the weights), under beta = 0.1 for
    any pool below half the weights. Per seed: the mean share of a checked round trained before
    the detector fired (never fired: 100%); the claim holds when that is < 50% on the interval."""
    variant = "lmimp-pool"
    it = common["schedule"]["iterations"]
    got = {
        r["seed"]: stop_fraction(r, it)
        for r in runs
        if r["pattern"] == pattern and r["method"] == variant
    }
    got = {k: v for k, v in got.items() if v is not None}
    if len(got) < 2:
        return None
    dist = [
        c[1]
        for r in runs
        if r["pattern"] == pattern and r["method"] == variant
        for rd in (r.get("early_bird") or {}).get("rounds", [])
        for c in rd.get("checks", [])
        if c[1] is not None
    ]
    return claimlib.judge(
        **{**common, "per_seed": {"half a round": dict.fromkeys(got, 50.0), variant: got}},
        claim="early-bird tickets appear under N:M: the pool-normalised mask distance falls "
        "under beta = 0.1 before half the round (values: % of the round trained before it fired)",
        source="Sec. 3.2, Fig. 2", a="half a round", b=variant, strict=True,
        extra={"distance": "pool", "chance_distance": 2 * 0.2 * 0.8,
               "median_distance": statistics.median(dist) if dist else None})  # fmt: skip


def _flops_ratio(flops: dict, a: str, b: str) -> float | None:
    seeds = sorted(set(flops.get(a, {})) & set(flops.get(b, {})))
    if not seeds:
        return None
    return statistics.mean(flops[a][s] / flops[b][s] for s in seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CNN on digits, short rounds")
    ap.add_argument(
        "--regime", choices=["short", "converged"], default="short",
        help="converged: LeNet-300-100 on Fashion-MNIST with converged rounds",
    )  # fmt: skip
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--patterns", default="2:4,1:4")
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--iterations", type=int, default=None, help="iterations per round")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--prune-stem", action="store_true", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON-lines file of finished runs")
    args = ap.parse_args()
    quick = args.quick
    conv = args.regime == "converged"
    preset = CONVERGED if conv else {}
    args.model = args.model or preset.get("model") or ("cnn" if quick else "resnet20")
    args.dataset = args.dataset or preset.get("dataset") or ("digits" if quick else "fashion-mnist")
    args.iterations = args.iterations or preset.get("iterations") or (40 if quick else 100)
    args.batch_size = args.batch_size or preset.get("batch_size") or (64 if quick else 128)
    args.seeds = args.seeds or preset.get("seeds") or "0,1,2"
    args.methods = args.methods or preset.get("methods") or ",".join(METHODS)
    args.prune_stem = conv if args.prune_stem is None else args.prune_stem
    tag = "lth_converged" if conv else ("lth_quick" if quick else "lth_fashion_mnist")
    if args.device != "cpu":
        tag += f"_{args.device.split(':')[0]}"
    out = Path(args.out or RESULTS / f"{tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    patterns = args.patterns.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in VARIANTS and m not in ("dense", "dense-1r")]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: dense, dense-1r, {', '.join(VARIANTS)}")
    setting = {
        "model": args.model,
        "dataset": args.dataset,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    if args.prune_stem:  # new key only when set: the short regime's logged runs keep matching
        setting["prune_stem"] = True

    print_bounds(args, patterns, methods)
    log = RunLog(out, setting)
    done = log.done(lambda r: (r["pattern"], r["seed"], r["method"]))
    for pattern in patterns:
        for seed in seeds:
            for method in methods:
                if (pattern, seed, method) in done:
                    continue
                twin = next(
                    (r for r in log.runs if r["seed"] == seed and r["method"] == method),
                    None,
                )
                if method.startswith("dense") and twin is not None:
                    # a dense run does not depend on the pattern: one per seed, shared
                    res = {k: v for k, v in twin.items() if k not in ("pattern", "setting")}
                    res = {**res, "shared_from": twin["pattern"]}
                else:
                    res = _one_run(args, pattern, seed, method)
                log.append({"pattern": pattern, "seed": seed, "method": method, **res})
                print(
                    f"{pattern} seed {seed} {method:9s} acc {100 * res['accuracy']:.2f}% "
                    f"flops {res['train_flops'] / 1e12:.3f}e12 rounds {res['rounds']} "
                    f"({res['wall_s']:.0f} s)",
                    flush=True,
                )
    runs = [r for r in log.runs if r["seed"] in seeds]
    table, claims = summarise(runs, patterns, seeds)
    for pattern in patterns:
        eb_table = early_bird_table(runs, pattern)
        if eb_table:
            table += f"\n\nEarly-bird checks, {pattern}:\n\n{eb_table}"
    entries = judge_claims(runs, patterns, setting)
    claimlib.write_summary(
        Path(str(out).replace(".jsonl", ".json")), setting, claims, entries, table
    )
    print(table)
    print(claimlib.markdown(entries))
    if entries and not quick:
        claimlib.update(entries)


if __name__ == "__main__":
    main()
