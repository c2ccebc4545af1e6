"""One-shot N:M from calibration data (SparseGPT, Wanda) and channel permutations, against
magnitude ASP on the same trained weights: without fine-tuning and after a short one.

    python benchmarks/oneshot_accuracy.py --task vision      # LeNet-300-100, Fashion-MNIST
    python benchmarks/oneshot_accuracy.py --task lm          # a small GPT on Python's stdlib
    python benchmarks/oneshot_accuracy.py --judge            # claims.json + oneshot_accuracy.json

Per seed one dense model is trained, then every method prunes a copy of it, in one process:

- ``vision``: LeNet-300-100 on Fashion-MNIST, the converged regime of ``dst_converged.py`` (8000
  iterations, batch 128, SGD lr 0.05, cosine; the dense model trained twice as long is logged
  there). Patterns 2:4, 1:4, 2:8 (at 2:8 only the 784-input layer is N:M). Accuracy on the full
  10k test set.
- ``lm``: a byte-level causal GPT (3 blocks, width 96, 4 heads, context 128; q/k/v/o and the MLP
  linears pruned, embeddings and head dense) trained with AdamW (lr 2e-3, cosine, batch 16) on the
  top-level ``*.py`` files of this machine's Python standard library (``sysconfig`` stdlib path;
  files sorted by name, the last 10% held out). Held-out perplexity and next-byte accuracy on
  1024 windows. Patterns 2:4 and 4:8. The dense model trained twice as long is logged per seed
  (``dense-2x``), the convergence evidence.

Methods: ``asp`` (magnitude), ``asp+perm`` (magnitude after the channel permutation pass),
``wanda``, ``sparsegpt`` (128 calibration samples from the training split, sequential), each
``+ft`` after ``--finetune`` iterations with the masks fixed (SGD lr 0.01 cosine for vision,
AdamW lr 5e-4 for the LM). Every finished run is appended to ``results/oneshot_accuracy.jsonl``;
an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import statistics
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

import claims as claimlib  # benchmarks/claims.py
import torch
import torch.nn.functional as F
from _runlog import RunLog
from torch import nn

import nmcompile
from nmcompile import SupervisedTrainer, data, zoo
from nmcompile.data import TensorLoader

RESULTS = Path(__file__).parent / "results"
METHODS = ("asp", "asp+perm", "wanda", "sparsegpt")
PATTERNS = {"vision": ("2:4", "1:4", "2:8"), "lm": ("2:4", "4:8")}


# -- the language model ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.size(0), x.size(1), x.size(2)
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True
        )
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A byte-level causal LM: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, vocab: int = 256, d: int = 96, layers: int = 3, heads: int = 4,
                 context: int = 128) -> None:  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.size(1)]
        return self.head(self.ln(self.blocks(x)))


def stdlib_corpus(context: int = 128) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(train windows, held-out windows) ``[N, context + 1]`` of bytes, and where they came
    from: this interpreter's stdlib top-level ``*.py``, the last 10% of files held out."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    cut = int(0.9 * len(files))

    def windows(fs: list[str]) -> torch.Tensor:
        raw = b"".join(Path(f).read_bytes() for f in fs)
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        n = (len(t) - 1) // context
        return t[: n * context + 1].unfold(0, context + 1, context)

    train, held = windows(files[:cut]), windows(files[cut:])
    info = {"stdlib": root, "files": len(files), "held_out_files": len(files) - cut,
            "train_windows": len(train), "held_out_windows": len(held)}  # fmt: skip
    return train, held, info


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def lm_eval(model: nn.Module, held: torch.Tensor, windows: int = 1024) -> dict[str, float]:
    model.eval()
    idx = torch.linspace(0, len(held) - 1, windows).long()
    loss = correct = total = 0.0
    for chunk in idx.split(128):
        w = held[chunk]
        logits = model(w[:, :-1])
        loss += float(lm_loss(logits, w[:, 1:])) * w[:, 1:].numel()
        correct += float((logits.argmax(-1) == w[:, 1:]).sum())
        total += w[:, 1:].numel()
    model.train()
    return {"perplexity": math.exp(loss / total), "accuracy": correct / total}


# -- runs ------------------------------------------------------------------------------------------
def _vision_setup(args, seed: int):
    ds = data.load("fashion-mnist", batch_size=128, seed=seed)
    torch.manual_seed(seed)
    model = zoo.create("lenet300", num_classes=10, in_channels=1, image_size=28)
    return ds, model


def _lm_setup(args, seed: int):
    train, held, info = stdlib_corpus()
    loader = TensorLoader(train[:, :-1], train[:, 1:], 16, shuffle=True, seed=seed, drop_last=True)
    torch.manual_seed(seed)
    return loader, held, info, TinyGPT()


def dense_runs(args, log: RunLog, seed: int):
    """The seed's dense model (trained here, every time: nothing heavy is cached)."""
    if args.task == "vision":
        ds, model = _vision_setup(args, seed)
        trainer = SupervisedTrainer(ds.train, ds.val, lr=0.05, schedule="cosine", progress=False)
        t0 = time.perf_counter()
        trainer.train(model, args.iterations)
        acc = trainer.evaluate(model)
        if ("dense", seed, "-") not in log.done(_key):
            log.append({"seed": seed, "method": "dense", "pattern": "-", "accuracy": acc,
                        "wall_s": time.perf_counter() - t0})  # fmt: skip
        calib = [ds.train.x[:128]] if ds.train.transform is None else None
        if calib is None:
            calib = [ds.train.transform(ds.train.x[:128])]
        return model, calib, {"data": ds}
    loader, held, info, model = _lm_setup(args, seed)
    kw = dict(optimizer="adamw", lr=2e-3, weight_decay=0.01, schedule="cosine", warmup=0.02,
              loss_fn=lm_loss, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    SupervisedTrainer(loader, None, **kw).train(model, args.iterations)
    ev = lm_eval(model, held)
    if ("dense", seed, "-") not in log.done(_key):
        log.append({"seed": seed, "method": "dense", "pattern": "-", **ev, "corpus": info,
                    "wall_s": time.perf_counter() - t0})  # fmt: skip
    if args.check_convergence and ("dense-2x", seed, "-") not in log.done(_key):
        loader2, _, _, model2 = _lm_setup(args, seed)
        SupervisedTrainer(loader2, None, **kw).train(model2, 2 * args.iterations)
        log.append({"seed": seed, "method": "dense-2x", "pattern": "-", **lm_eval(model2, held)})
    gen = torch.Generator().manual_seed(10_000 + seed)
    calib = [loader.x[torch.randperm(len(loader.x), generator=gen)[:128]]]
    return model, calib, {"loader": loader, "held": held, "kw": kw}


def _key(r: dict[str, Any]):
    return (r["method"], r["seed"], r["pattern"])


def prune_runs(args, log: RunLog, seed: int, dense: nn.Module, calib, ctx) -> None:
    done = log.done(_key)
    for pattern in PATTERNS[args.task]:
        for method in METHODS:
            for ft in (0, args.finetune):
                label = method + ("+ft" if ft else "")
                if (label, seed, pattern) in done:
                    continue
                model = copy.deepcopy(dense)
                base = "asp" if method.startswith("asp") else method
                opts: dict[str, Any] = {"finetune_iterations": ft, "permute": method == "asp+perm"}
                if base != "asp":
                    opts.update(calibration=calib, calibration_samples=128)
                if args.task == "vision":
                    ds = ctx["data"]
                    trainer = SupervisedTrainer(
                        ds.train, ds.val, lr=0.01, schedule="cosine", progress=False
                    )
                    example = (ds.train.x[:2].float(),) if ds.train.transform is None else (
                        ds.train.transform(ds.train.x[:2]),)  # fmt: skip
                    extra = {"prune_stem": True}
                else:
                    loader = TensorLoader(ctx["loader"].x, ctx["loader"].y, 16, shuffle=True,
                                          seed=1000 + seed, drop_last=True)  # fmt: skip
                    kw = {**ctx["kw"], "lr": 5e-4, "warmup": 0}
                    trainer = SupervisedTrainer(loader, None, **kw)
                    example = (ctx["held"][:2, :-1],)
                    extra = {}
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = nmcompile.compile(
                        model, base, pattern, example_inputs=example,
                        trainer=trainer if ft else None, **extra, **opts,
                    )  # fmt: skip
                row: dict[str, Any] = {
                    "seed": seed, "method": label, "pattern": pattern,
                    "wall_s": time.perf_counter() - t0,
                    "pruned_layers": sorted(r.masks), "sparsity": r.sparsity,
                }  # fmt: skip
                if args.task == "vision":
                    row["accuracy"] = ctx["data"] and SupervisedTrainer(
                        ctx["data"].train, ctx["data"].val, progress=False
                    ).evaluate(r.module)
                else:
                    row.update(lm_eval(r.module, ctx["held"]))
                perm = r.diagnostics.get("permutation")
                if perm:
                    row["permutation"] = {
                        "spaces": len(perm["spaces"]),
                        "layers": perm["layers"], "seconds": perm["seconds"],
                        "max_abs_diff": perm["max_abs_diff"], "skipped": perm["skipped"],
                    }  # fmt: skip
                if "calibration_seconds" in r.diagnostics:
                    row["calibration_seconds"] = r.diagnostics["calibration_seconds"]
                log.append(row)
                print(f"seed {seed} {pattern} {label:14s} " + (
                    f"acc {100 * row['accuracy']:.2f}" if args.task == "vision" else
                    f"ppl {row['perplexity']:.3f} acc {100 * row['accuracy']:.2f}"
                ) + f" ({row['wall_s']:.1f} s)", flush=True)  # fmt: skip


# -- verdicts ----------------------------------------------------------------------------------------
def _per_seed(runs, pattern: str, key: str = "accuracy") -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        if r["pattern"] in (pattern, "-"):
            out.setdefault(r["method"], {})[r["seed"]] = 100 * r[key]
    return out


def judge(task: str, runs: list[dict[str, Any]], setting: dict[str, Any]) -> list[dict]:
    entries = []
    if task == "vision":
        model, dataset = "LeNet-300-100", "Fashion-MNIST"
        conv = (
            claimlib.convergence_from_log(
                RESULTS / "dst_converged.jsonl",
                {
                    "model": "lenet300",
                    "dataset": "fashion-mnist",
                    "iterations": 8000,
                    "batch_size": 128,
                    "lr": 0.05,
                },
                sorted({r["seed"] for r in runs}),
            )
            if setting["iterations"] == 8000
            else None
        )  # that log's dense runs are 8000 / 16000
    else:
        model, dataset = "TinyGPT (3x96, bytes)", "Python 3.11 stdlib source"
        dense = {r["seed"]: 100 * r["accuracy"] for r in runs if r["method"] == "dense"}
        dense2 = {r["seed"]: 100 * r["accuracy"] for r in runs if r["method"] == "dense-2x"}
        both = sorted(set(dense) & set(dense2))
        conv = (
            claimlib.convergence([dense[s] for s in both], [dense2[s] for s in both])
            if len(both) >= 2
            else None
        )
    schedule = {k: setting[k] for k in ("iterations", "finetune")}
    for pattern in PATTERNS[task]:
        per_seed = _per_seed(runs, pattern)
        ppl = _per_seed(runs, pattern, "perplexity") if task == "lm" else None
        for ft in ("", "+ft"):
            when = " (after a short fine-tune)" if ft else " (no fine-tuning)"
            for a, paper in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda")):
                if ppl:  # the LM: perplexity, lower is better, so magnitude's minus the method's
                    entries.append(claimlib.judge(
                        paper=paper,
                        claim="one-shot N:M from calibration data has lower perplexity than "
                        "magnitude" + when,
                        source="SparseGPT Table 5 / Wanda Table 3 (2:4, 4:8)",
                        model=model, dataset=dataset, setting=pattern, schedule=schedule,
                        per_seed={m: {s: v / 100 for s, v in d.items()} for m, d in ppl.items()},
                        a="asp" + ft, b=a + ft, strict=True, converged=conv,
                        extra={"unit": "held-out perplexity"},
                    ))  # fmt: skip
                    continue
                entries.append(claimlib.judge(
                    paper=paper,
                    claim="one-shot N:M from calibration data loses less than magnitude" + when,
                    source="SparseGPT Table 5 / Wanda Table 3 (2:4, 4:8)",
                    model=model, dataset=dataset, setting=pattern, schedule=schedule,
                    per_seed=per_seed, a=a + ft, b="asp" + ft, strict=True, converged=conv,
                ))  # fmt: skip
            permuted = any(
                (r.get("permutation") or {}).get("spaces")
                for r in runs
                if r["pattern"] == pattern and r["method"] == "asp+perm"
            )
            if not permuted:  # no layer could be permuted at this pattern: nothing to judge
                continue
            if ppl:
                entries.append(claimlib.judge(
                    paper="channel permutations",
                    claim="permuting input channels first lowers magnitude N:M's perplexity"
                    + when,
                    source="Pool & Yu 2021 (NVIDIA ASP)",
                    model=model, dataset=dataset, setting=pattern, schedule=schedule,
                    per_seed={m: {s: v / 100 for s, v in d.items()} for m, d in ppl.items()},
                    a="asp" + ft, b="asp+perm" + ft, strict=True, converged=conv,
                    extra={"unit": "held-out perplexity"},
                ))  # fmt: skip
                continue
            entries.append(claimlib.judge(
                paper="channel permutations",
                claim="permuting input channels first makes magnitude N:M more accurate" + when,
                source="Pool & Yu 2021 (NVIDIA ASP)",
                model=model, dataset=dataset, setting=pattern, schedule=schedule,
                per_seed=per_seed, a="asp+perm" + ft, b="asp" + ft, strict=True, converged=conv,
            ))  # fmt: skip
    return [e for e in entries if e is not None]


def table(task: str, runs: list[dict[str, Any]]) -> str:
    key = "accuracy"
    methods = ["dense", *(m + ft for ft in ("", "+ft") for m in METHODS)]
    lines = ["| pattern | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for pattern in PATTERNS[task]:
        cells = []
        for m in methods:
            vals = [r for r in runs if r["method"] == m and r["pattern"] in (pattern, "-")]
            if not vals:
                cells.append("-")
                continue
            acc = statistics.mean(100 * r[key] for r in vals)
            if task == "lm":
                ppl = statistics.mean(r["perplexity"] for r in vals)
                cells.append(f"{ppl:.3f} ({acc:.2f}%)")
            else:
                cells.append(f"{acc:.2f}")
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("vision", "lm"), default="vision")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--finetune", type=int, default=None)
    ap.add_argument("--check-convergence", action="store_true", help="lm: also train 2x")
    ap.add_argument("--judge", action="store_true", help="only read the log and judge")
    ap.add_argument("--claims", action="store_true", help="write the verdicts to claims.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "oneshot_accuracy.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.iterations is None:
        args.iterations = 8000 if args.task == "vision" else 3000
    if args.finetune is None:
        args.finetune = 500 if args.task == "vision" else 300
    setting = {"task": args.task, "iterations": args.iterations, "finetune": args.finetune}
    log = RunLog(args.out, setting)
    if not args.judge:
        for seed in [int(s) for s in args.seeds.split(",")]:
            dense, calib, ctx = dense_runs(args, log, seed)
            prune_runs(args, log, seed, dense, calib, ctx)
    log = RunLog(args.out, setting)
    entries = judge(args.task, log.runs, setting)
    print(table(args.task, log.runs))
    for e in entries:
        lo, hi = e["ci95"]
        print(f"{e['paper']:22s} {e['setting']:4s} {e['compare'][0]:14s} - {e['compare'][1]:7s}"
              f" {e['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] {e['verdict']} ({e['regime']})")  # fmt: skip
    if args.claims and entries:
        claimlib.update(entries)
        summary = RESULTS / f"oneshot_accuracy_{args.task}.json"
        claimlib.write_summary(summary, setting, {}, entries, table(args.task, log.runs))


if __name__ == "__main__":
    main()
