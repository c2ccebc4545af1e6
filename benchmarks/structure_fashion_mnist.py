"""Structural lottery tickets on Fashion-MNIST: IMP vs IMP-Refill vs IMP-Refill+ vs IMP-Regroup vs
group-aware IMP vs random tickets, accuracy vs sparsity and the latency of each ticket.

Per seed: ``imp`` to the highest target (its history gives accuracy at every IMP round), and
``imp-refill``, ``imp-refill+``, ``imp-regroup`` and ``group-aware-imp`` at each ``--targets``
sparsity. A random ticket is the paper's sanity baseline (Frankle & Carbin): a pruning run's final
structure trained for one round from a fresh random initialisation (a permutation of each
tensor's initial values, the model's own init distribution) instead of the rewound weights.
``random-ticket`` takes IMP's mask (top target), ``random-refill`` / ``random-regroup`` the refilled
/ regrouped ticket at each target; each is trained from its parent's run, in the same process, so
it costs one round, not a second pruning run. Each ticket is exported to ONNX and timed with ONNX Runtime on the CPU (batch
``--latency-batch``) against the dense model; refilled tickets are physically smaller (channels
removed); regrouped tickets are timed twice: as masked dense weights and as block-sparse layers
(``runtime/block_sparse.py``, dense GEMMs over the blocks).

Claims tested (paper 001), on paired seeds (``benchmarks/claims.py``): regroup >= refill at high
sparsity (Fig. 3-5); structural tickets beat random tickets (Tables A3 / A4: the refilled and
regrouped tickets vs the same structure trained from a random re-initialisation); rewinding
beats random re-initialisation for IMP. Finished runs are appended to a JSON-lines file, so the
sweep resumes where it stopped and can be run in parts.

    python benchmarks/structure_fashion_mnist.py --regime converged  # LeNet-300-100, converged rounds
    python benchmarks/structure_fashion_mnist.py              # resnet20, Fashion-MNIST (short rounds)
    python benchmarks/structure_fashion_mnist.py --quick      # small CNN on digits (minutes)

``--regime converged``: LeNet-300-100 (``prune_stem=True``), rounds whose length is shown to
converge by ``lth_fashion_mnist.py --regime converged`` (same model, data and schedule: its
dense runs are the evidence each claim entry carries), targets 0.5 / 0.7 / 0.8 / 0.9, latency at
batch 64 with ONNX Runtime (CPU) and torch. ``--device cuda`` trains on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import claims as claimlib  # benchmarks/claims.py
import torch
from _runlog import RunLog  # benchmarks/_runlog.py (scripts run from this folder)

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile.runtime import export_onnx, ort_latency
from nmcompile.runtime.block_sparse import to_block_sparse

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("imp", "imp-refill", "imp-refill+", "imp-regroup", "group-aware-imp", "random-ticket")
# a random ticket of each structural method: its final structure, trained from a random init
RANDOM = {"random-refill": "imp-refill", "random-regroup": "imp-regroup"}
# the pruning run each random ticket takes its structure from
PARENT = {"random-ticket": "imp", **RANDOM}
REGROUPED = ("imp-regroup", "group-aware-imp")
CONVERGED = {
    "model": "lenet300",
    "dataset": "fashion-mnist",
    "iterations": 8000,  # as lth_fashion_mnist.py --regime converged
    "batch_size": 128,
    "targets": "0.5,0.7,0.8,0.9",
    "variants": "imp,imp-refill,imp-regroup,random-ticket,random-refill,random-regroup",
    "latency_batch": 64,
}


def _run(args, seed: int, variant: str, target: float, children=()) -> dict[str, dict[str, Any]]:
    """Run ``variant`` at ``target`` and, from the same run, each random ticket in ``children``
    (its structure trained from a random init: no second pruning run). {variant: row fields}."""
    ds = data.load(args.dataset, batch_size=args.batch_size, seed=seed)
    if args.device != "cpu":
        ds.to(args.device)  # batches sliced on the GPU, same order
    c, h, _ = ds.input_shape
    torch.manual_seed(seed)
    model = zoo.create(args.model, num_classes=ds.num_classes, in_channels=c, image_size=h)
    trainer = SupervisedTrainer(
        ds.train, ds.val, lr=args.lr, milestones=(0.5, 0.75), progress=False, device=args.device
    )
    method = PARENT.get(variant, variant)
    options: dict[str, Any] = {
        "seed": seed,
        "target_sparsity": target,
        "iterations_per_round": args.iterations,
        "prune_stem": args.prune_stem,
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model, method, example_inputs=(ds.example_input(1),), trainer=trainer, **options
        )
    accuracy = {}
    train_s = {}
    for v in (variant, *children):
        t1 = time.perf_counter()
        if v in PARENT:
            accuracy[v] = _random_ticket(r, model, trainer, args.iterations, seed)
        else:
            accuracy[v] = r.history[-1]["accuracy"]
        # a random ticket reuses the pruning run: its own cost is the one round it trains
        train_s[v] = (t1 - t0 if v == variant else 0.0) + time.perf_counter() - t1
    model = model.cpu()
    x = ds.example_input(args.latency_batch)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "dense": export_onnx(model.eval(), (x,), Path(tmp) / "dense.onnx", verify=False).path,
            "ticket": r.export_onnx(Path(tmp) / "ticket.onnx", example_inputs=(x,)).path,
        }
        blocks = r.diagnostics.get("blocks") or {}
        if method in REGROUPED and any(blocks.values()):
            fast = to_block_sparse(copy.deepcopy(r.module).eval(), blocks)
            files["blocks"] = export_onnx(fast, (x,), Path(tmp) / "blocks.onnx", sites=()).path
        lat = ort_latency(files, (x,), warmup=5, repeat=args.latency_repeat)
        torch_lat = _torch_latency(model, r, blocks if "blocks" in files else None, x, args)
    params = sum(p.numel() for p in r.module.parameters())
    common = {
        "sparsity": r.sparsity,
        "train_flops": r.history[-1]["train_flops"],
        "rounds": len(r.history),
        "params": params,
        "dense_params": sum(p.numel() for p in model.parameters()),
        "latency_dense_ms": lat["dense"].median_ms,
        "latency_ticket_ms": lat["ticket"].median_ms,
        "latency_blocks_ms": lat["blocks"].median_ms if "blocks" in lat else None,
        "latency_batch": args.latency_batch,
        "torch_latency_ms": torch_lat,
        "blocks": sum(len(b) for b in blocks.values()),
        "layers_with_blocks": sum(bool(b) for b in blocks.values()),
        "curve": [(h["sparsity"], h["accuracy"]) for h in r.history],
    }
    return {
        v: {
            "accuracy": accuracy[v],
            **common,
            "train_s": train_s[v],
            **({"structure_from": method} if v in PARENT else {}),
        }
        for v in accuracy
    }


def _torch_latency(model, r, blocks, x, args) -> dict[str, float]:
    """torch (CPU, eager, inference mode) medians: dense, the ticket as compiled (a refilled one
    is physically smaller), and the regrouped one as block-sparse layers."""
    from nmcompile.runtime.latency import time_interleaved

    models = {"dense": model.eval(), "ticket": r.module.cpu().eval()}
    if blocks:
        models["blocks"] = to_block_sparse(copy.deepcopy(r.module).cpu().eval(), blocks)

    def call(m):
        def run():
            with torch.inference_mode():
                m(x)

        return run

    stats = time_interleaved(
        {k: call(m) for k, m in models.items()}, warmup=5, repeat=args.latency_repeat
    )
    return {k: s.median_ms for k, s in stats.items()}


def _random_ticket(r, model, trainer, iterations: int, seed: int) -> float:
    """Train IMP's mask for one round from a fresh random init; return its accuracy."""
    ticket = copy.deepcopy(r.masked)
    init = model.state_dict()  # compile() never mutates the model: these are theta_0
    gen = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for name, t in ticket.state_dict().items():
            if name in init and t.is_floating_point() and t.numel() > 1:
                v = init[name].reshape(-1)
                t.copy_(v[torch.randperm(v.numel(), generator=gen)].reshape(t.shape))
    trainer.train(ticket, iterations)
    return trainer.evaluate(ticket)


def _table(runs: list[dict], targets: list[float]) -> tuple[str, dict]:
    lines = [
        "| variant | target | sparsity | top-1 % (mean ± std) | params | ORT CPU ms ticket / dense "
        "| ORT CPU ms block-sparse | layers with blocks | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    stats: dict[tuple[str, float], float] = {}
    for variant in (*VARIANTS, *RANDOM):
        for target in targets:
            got = [r for r in runs if r["variant"] == variant and r["target"] == target]
            if not got:
                continue
            accs = [100 * r["accuracy"] for r in got]
            m = statistics.mean(accs)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            stats[(variant, target)] = m
            lines.append(
                f"| {variant} | {target:.2f} | {statistics.mean(r['sparsity'] for r in got):.3f} | "
                f"{m:.2f} ± {sd:.2f} | {statistics.mean(r['params'] for r in got):,.0f} | "
                f"{statistics.mean(r['latency_ticket_ms'] for r in got):.2f} / "
                f"{statistics.mean(r['latency_dense_ms'] for r in got):.2f} | "
                f"{_mean_or_dash([r.get('latency_blocks_ms') for r in got])} | "
                f"{_mean_or_dash([r.get('layers_with_blocks') for r in got], '.1f')} | "
                f"{len(got)} |"
            )
    top = max(targets)
    claims = {}
    if ("imp-regroup", top) in stats and ("imp-refill", top) in stats:
        claims["regroup_ge_refill_at_high_sparsity"] = (
            stats[("imp-regroup", top)] >= stats[("imp-refill", top)]
        )
        claims["regroup_minus_refill_points"] = (
            stats[("imp-regroup", top)] - stats[("imp-refill", top)]
        )
    if ("imp", top) in stats and ("random-ticket", top) in stats:
        claims["rewind_beats_random_ticket"] = stats[("imp", top)] > stats[("random-ticket", top)]
        claims["imp_minus_random_ticket_points"] = (
            stats[("imp", top)] - stats[("random-ticket", top)]
        )
    return "\n".join(lines), claims


def equal_accuracy(runs: list[dict], targets: list[float], dense_acc: float | None) -> str:
    """The latency each structural method buys at equal accuracy: per method, the sparsest target
    whose mean accuracy is within 0.5 point of the dense model (``dense_acc``, percent), and that
    ticket's latency against dense (ONNX Runtime CPU and torch; block-sparse where regrouped)."""
    if dense_acc is None:
        return ""
    lines = [
        f"Latency at equal accuracy (within 0.5 point of dense, {dense_acc:.2f}%): the sparsest "
        "ticket of each method that is, timed against dense (speedup = dense ms / ticket ms).",
        "",
        "| variant | target | top-1 % | ORT ticket ms (speedup) | ORT block-sparse ms (speedup) "
        "| torch ticket ms (speedup) | torch block-sparse ms (speedup) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        best = None
        for t in sorted(targets):
            got = [r for r in runs if r["variant"] == variant and r["target"] == t]
            if got and statistics.mean(100 * r["accuracy"] for r in got) >= dense_acc - 0.5:
                best = (t, got)
        if best is None:
            if any(r["variant"] == variant for r in runs):
                lines.append(f"| {variant} | none within 0.5 point | | | | | |")
            continue
        t, got = best
        if variant == "imp" and t != max(targets):
            lines.append(f"| imp | {t:.2f} | (read off IMP's history, not timed) | | | | |")
            continue

        def cell(key, dense_key, src=None, got=got):
            vals = [
                ((r.get(src) or {}).get(key), (r.get(src) or {}).get(dense_key))
                if src
                else (r.get(key), r.get(dense_key))
                for r in got
            ]
            vals = [(a, b) for a, b in vals if a is not None and b is not None]
            if not vals:
                return "-"
            ms = statistics.mean(a for a, _ in vals)
            return f"{ms:.3f} ({statistics.mean(b / a for a, b in vals):.2f}x)"

        acc = statistics.mean(100 * r["accuracy"] for r in got)
        lines.append(
            f"| {variant} | {t:.2f} | {acc:.2f} | {cell('latency_ticket_ms', 'latency_dense_ms')} | "
            f"{cell('latency_blocks_ms', 'latency_dense_ms')} | "
            f"{cell('ticket', 'dense', 'torch_latency_ms')} | "
            f"{cell('blocks', 'dense', 'torch_latency_ms')} |"
        )
    return "\n".join(lines)


def _mean_or_dash(values: list, fmt: str = ".2f") -> str:
    values = [v for v in values if v is not None]
    return format(statistics.mean(values), fmt) if values else "-"


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    imp_curves = [r["curve"] for r in runs if r["variant"] == "imp"]
    if imp_curves:
        n = min(len(c) for c in imp_curves)
        xs = [statistics.mean(c[i][0] for c in imp_curves) for i in range(n)]
        ys = [statistics.mean(100 * c[i][1] for c in imp_curves) for i in range(n)]
        ax.plot(xs, ys, marker="o", label="imp (rounds)")
    for variant in (*VARIANTS[1:], *RANDOM):
        pts = {}
        for r in runs:
            if r["variant"] == variant:
                pts.setdefault(r["target"], []).append((r["sparsity"], 100 * r["accuracy"]))
        if pts:
            xs = [statistics.mean(p[0] for p in v) for _, v in sorted(pts.items())]
            ys = [statistics.mean(p[1] for p in v) for _, v in sorted(pts.items())]
            ax.plot(xs, ys, marker="s", linestyle="--", label=variant)
    ax.set_xlabel("sparsity of the pruned layers")
    ax.set_ylabel("top-1 %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAPER = "Structure-LTH (001)"


def judge_claims(runs: list[dict], targets: list[float], setting: dict, conv) -> list[dict]:
    """Paper 001's claims per target sparsity, on paired seeds (``benchmarks/claims.py``)."""
    entries = []
    for t in targets:
        per: dict[str, dict[int, float]] = {}
        for r in runs:
            if r["target"] == t:
                per.setdefault(r["variant"], {})[r["seed"]] = 100 * r["accuracy"]
        sparsity: dict[str, list[float]] = {}
        for r in runs:
            if r["target"] == t:
                sparsity.setdefault(r["variant"], []).append(r["sparsity"])
        # regrouping adds weights back (Table A4), so tickets of one target differ in sparsity
        extra = {"sparsity": {v: statistics.mean(x) for v, x in sparsity.items()}}
        common = {
            "extra": extra,
            "paper": PAPER,
            "model": setting["model"],
            "dataset": setting["dataset"],
            "setting": f"sparsity {t:.2f}",
            "schedule": setting,
            "per_seed": per,
            "converged": conv,
        }
        if t >= 0.7:
            entries.append(claimlib.judge(
                **common, claim="IMP-Regroup >= IMP-Refill at high sparsity",
                source="Fig. 3-5", a="imp-regroup", b="imp-refill"))  # fmt: skip
        for ours, rand, table in (
            ("imp-refill", "random-refill", "Table A3"),
            ("imp-regroup", "random-regroup", "Table A4"),
            ("imp", "random-ticket", "Frankle & Carbin's sanity check"),
        ):
            entries.append(claimlib.judge(
                **common, claim=f"{ours} ticket beats its random ticket", source=table,
                a=ours, b=rand, strict=True))  # fmt: skip
    return [e for e in entries if e is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--regime", choices=["short", "converged"], default="short")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--variants", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--prune-stem", action="store_true", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-batch", type=int, default=None)
    ap.add_argument("--latency-repeat", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    conv_regime = args.regime == "converged"
    pre = CONVERGED if conv_regime else {}
    args.model = args.model or pre.get("model") or ("cnn" if args.quick else "resnet20")
    args.dataset = (
        args.dataset or pre.get("dataset") or ("digits" if args.quick else "fashion-mnist")
    )
    args.iterations = args.iterations or pre.get("iterations") or (40 if args.quick else 60)
    args.batch_size = args.batch_size or pre.get("batch_size") or (64 if args.quick else 128)
    args.latency_batch = args.latency_batch or pre.get("latency_batch") or 1
    args.prune_stem = conv_regime if args.prune_stem is None else args.prune_stem
    variants = (args.variants or pre.get("variants") or ",".join(VARIANTS)).split(",")
    unknown = [v for v in variants if v not in VARIANTS and v not in RANDOM]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join((*VARIANTS, *RANDOM))}")
    tag = "structure_converged" if conv_regime else (
        "structure_quick" if args.quick else "structure_fashion_mnist")  # fmt: skip
    if args.device != "cpu":
        tag += f"_{args.device.split(':')[0]}"
    out = Path(args.out or RESULTS / f"{tag}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in (args.targets or pre.get("targets") or "0.5,0.8").split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    setting = {
        "model": args.model,
        "dataset": args.dataset,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    if args.prune_stem:  # new key only when set: the short regime's logged runs keep matching
        setting["prune_stem"] = True
    log = RunLog(out, setting)
    runs = [r for r in log.runs if r["seed"] in seeds]
    done = log.done(lambda r: (r["seed"], r["variant"], r["target"]))
    # imp runs to the top target only (its history gives the lower ones); a random ticket is
    # trained from its parent's run, so it exists where the parent runs (random-ticket: the top
    # target). A parent already logged whose random ticket is missing is run again for it.
    parents = [v for v in variants if v not in PARENT]
    jobs = [
        (s, v, max(targets) if v == "imp" else t) for s in seeds for v in parents for t in targets
    ]
    jobs = list(dict.fromkeys(jobs))
    orphans = sorted({PARENT[v] for v in variants if v in PARENT} - set(parents))
    jobs += [
        (s, p, max(targets) if p == "imp" else t) for s in seeds for p in orphans for t in targets
    ]
    jobs = list(dict.fromkeys(jobs))
    for seed, variant, target in jobs:
        children = [
            c
            for c, p in PARENT.items()
            if p == variant and c in variants and (seed, c, target) not in done
        ]
        want_main = variant in variants and (seed, variant, target) not in done
        if not want_main and not children:
            continue
        res = _run(args, seed, variant, target, children)
        if not want_main:
            del res[variant]
        for v, fields in res.items():
            row = {"seed": seed, "variant": v, "target": target, **fields}
            log.append(row)
            runs.append({**row, "setting": setting})
            print(
                f"seed {seed} {v:14s} target {target:.2f}: acc {100 * fields['accuracy']:.2f}% "
                f"sparsity {fields['sparsity']:.3f} params {fields['params']:,} ORT "
                f"{fields['latency_ticket_ms']:.2f}/{fields['latency_dense_ms']:.2f} ms "
                f"({fields['train_s']:.0f} s)",
                flush=True,
            )
    # imp's own history gives its accuracy at every round; its target rows are read off it
    for r in [r for r in runs if r["variant"] == "imp"]:
        for t in targets:
            if t != r["target"]:
                pts = [p for p in r["curve"] if abs(p[0] - t) < 0.03]
                if pts and (r["seed"], "imp", t) not in done:
                    runs.append({**r, "target": t, "sparsity": pts[-1][0], "accuracy": pts[-1][1]})
    table, claims = _table(runs, targets)
    _plot(runs, out.with_suffix(".png"))
    conv = claimlib.convergence_from_log(RESULTS / "lth_converged.jsonl", setting, seeds)
    eq = equal_accuracy(runs, targets, conv["dense_2x"] if conv else None)
    if eq:
        table += "\n\n" + eq
    entries = judge_claims(runs, targets, setting, conv)
    claimlib.write_summary(out.with_suffix(".json"), setting, claims, entries, table)
    print(table)
    print(claimlib.markdown(entries))
    if entries and not args.quick:
        claimlib.update(entries)


if __name__ == "__main__":
    main()
