"""Paper 000's BERT experiment at our scale: a small Hugging Face BERT, pruned 2:4 with asp, mimp
and lmimp on a GLUE-style sentence-pair task built offline. A SHORT SCHEDULE, trained from random
init: no pretrained BERT can be downloaded here, so this is not the paper's fine-tuning of
bert-base on GLUE, and its numbers say nothing about the paper's claim at full scale.

The task (``contains``): a pair [CLS] w1 .. w8 [SEP] q [SEP], a "sentence" of 8 words over a
16-word vocabulary and a "question" word q; the label says whether q occurs in the sentence
(half the pairs). It has the shape of GLUE's QNLI (does the sentence hold what the question asks
for?) but is decided exactly. Why it needs attention: q alone is uniform in both classes and the
sentence alone is drawn independently of the label, so no token, position or per-segment word
count says anything; the label is a product of the two segments' word counts (the count of q in
the sentence), which no linear model over bag-of-words features of either or both segments can
represent. A transformer gets it by attending from q to the matching word. It is built from a
seeded generator (no corpus needed) and identical on every machine. A harder variant tried
first (is segment B a reordering of segment A, negatives with one or two words replaced) stayed
at chance for 2,000 AdamW steps with this model: a small BERT from random init learns token
matching slowly, which is why the task is small.

Protocol: for each seed, every method starts from the same BERT initialisation and sees the same
batch order (paired seeds). dense trains two rounds without a mask (asp's schedule); asp trains
one round dense, then fine-tunes one round with the 2:4 mask; mimp / lmimp run the lottery-ticket
rounds of paper 000 (every round rewinds to round 0's weights at 5% of a round, the default;
lmimp stops rounds early by its early-bird test) until the 2:4 pattern is reached. Every
method trains with AdamW (lr 3e-4, 10% linear warm-up, x0.1 at 75% of each round; dropout off:
a model this small trained from scratch learns faster without it); accuracy on 2,000 held-out
pairs; training FLOPs from the counter every method uses (forward + backward, masks counted as
the sparse kernel would run them). Each finished run is appended to a JSON-lines file at once,
so an interrupted run resumes.

    python benchmarks/bert_glue_like.py                       # 3 seeds, 2:4 (about 45 min, 2 cores)
    python benchmarks/bert_glue_like.py --seeds 0 --iterations 100   # a smoke run
    python benchmarks/bert_glue_like.py --table               # the table from the log
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _runlog import RunLog, result_row  # benchmarks/_runlog.py (scripts run from this folder)

import nmcompile
from nmcompile import SupervisedTrainer
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"
METHODS = ("dense", "asp", "mimp", "lmimp")
PAD, CLS, SEP, FIRST_WORD = 0, 1, 2, 3
DROPOUT = 0.0


def contains_pairs(n: int, seed: int, words: int = 16, length: int = 8) -> dict[str, torch.Tensor]:
    """``n`` pairs of the ``contains`` task (module docstring): input_ids, token_type_ids,
    labels."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(FIRST_WORD, FIRST_WORD + words, (n, length), generator=g)
    want = (torch.rand(n, generator=g) < 0.5).long()  # 1: the question word is in the sentence
    present = a.gather(1, torch.randint(0, length, (n, 1), generator=g))[:, 0]
    # a word absent from the sentence: the first absent one of 32 uniform draws (a sentence
    # of 8 words leaves at least 8 of the 16 absent, so one is found but with odds ~1e-10)
    cand = torch.randint(FIRST_WORD, FIRST_WORD + words, (n, 32), generator=g)
    absent_mask = ~(cand[:, :, None] == a[:, None, :]).any(-1)
    absent = cand.gather(1, absent_mask.float().argmax(1, keepdim=True))[:, 0]
    q = torch.where(want == 1, present, absent)
    label = (q[:, None] == a).any(1).long()  # the membership test itself, exact
    ones = torch.ones(n, 1, dtype=torch.long)
    ids = torch.cat([CLS * ones, a, SEP * ones, q[:, None], SEP * ones], dim=1)
    types = torch.cat([torch.zeros(n, length + 2, dtype=torch.long),
                       torch.ones(n, 2, dtype=torch.long)], dim=1)  # fmt: skip
    return {"input_ids": ids, "token_type_ids": types, "labels": label}


class PairLoader:
    """Batches of ``({"input_ids", "token_type_ids"}, labels)``, reshuffled each epoch from its
    own seeded generator (the same order for every method of a seed)."""

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, shuffle: bool, seed: int):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data["labels"]) / self.batch_size)

    def __iter__(self):
        n = len(self.data["labels"])
        order = torch.randperm(n, generator=self.g) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = {"input_ids": self.data["input_ids"][idx],
                 "token_type_ids": self.data["token_type_ids"][idx]}  # fmt: skip
            yield x, self.data["labels"][idx]


def small_bert(seed: int):
    import transformers as T

    cfg = T.BertConfig(
        vocab_size=FIRST_WORD + 16,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=DROPOUT,
        attention_probs_dropout_prob=DROPOUT,
    )
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(cfg), cfg


def _one_run(args: argparse.Namespace, seed: int, method: str) -> dict[str, Any]:
    train = contains_pairs(args.train_pairs, seed=1000)
    val = contains_pairs(2000, seed=2000)
    model, _ = small_bert(seed)
    trainer = SupervisedTrainer(
        PairLoader(train, args.batch_size, shuffle=True, seed=seed),
        PairLoader(val, 500, shuffle=False, seed=0),
        optimizer="adamw",
        lr=args.lr,
        weight_decay=0.01,
        warmup=0.1,
        milestones=(0.75,),
        progress=False,
    )
    example = {k: v[:2] for k, v in train.items() if k != "labels"}
    it = args.iterations
    t0 = time.perf_counter()
    if method == "dense":
        samples = 0

        def count(info) -> None:
            nonlocal samples
            samples += info.batch_size

        for _ in range(2):  # two rounds, as asp trains (dense, then fine-tuning), no mask
            trainer.train(model, it, count)
        acc = trainer.evaluate(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flops = nmcompile.compile(model, "asp", args.pattern, example_inputs=example).flops
        return {"accuracy": acc, "train_flops": samples * flops.train_step(), "rounds": 2,
                "sparsity": 0.0, "wall_s": time.perf_counter() - t0}  # fmt: skip
    options: dict[str, Any] = {"seed": seed}
    if method == "asp":
        options.update(pretrain_iterations=it, finetune_iterations=it)
    else:
        options.update(iterations_per_round=it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(
            model, method, args.pattern, example_inputs=example, trainer=trainer, **options
        )
    return result_row(r, t0)


def _t95(n: int) -> float:
    return {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}.get(n, 2.0)


def table(runs: list[dict[str, Any]]) -> str:
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "| method | accuracy % (mean ± std) | − dense, paired (95% CI) | training FLOPs "
        "(10^12) | rounds | sparsity | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        got = [by[(m, s)] for s in seeds if (m, s) in by]
        if not got:
            continue
        acc = [100 * r["accuracy"] for r in got]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        diff = "-"
        pairs = [100 * (by[(m, s)]["accuracy"] - by[("dense", s)]["accuracy"])
                 for s in seeds if (m, s) in by and ("dense", s) in by]  # fmt: skip
        if m != "dense" and len(pairs) > 1:
            mean = statistics.mean(pairs)
            half = _t95(len(pairs)) * statistics.stdev(pairs) / math.sqrt(len(pairs))
            diff = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
        elif m != "dense" and pairs:
            diff = f"{pairs[0]:+.2f} (one seed)"
        lines.append(
            f"| {m} | {statistics.mean(acc):.2f} ± {sd:.2f} | {diff} "
            f"| {statistics.mean(r['train_flops'] for r in got) / 1e12:.2f} "
            f"| {statistics.mean(r['rounds'] for r in got):.1f} "
            f"| {statistics.mean(r['sparsity'] for r in got):.2f} | {len(got)} |"
        )
    lines += ["", "| paired difference | points (95% CI) | training FLOPs ratio | seeds |",
              "|---|---|---|---|"]  # fmt: skip
    for a, b in (("mimp", "asp"), ("lmimp", "mimp"), ("lmimp", "asp")):
        both = [s for s in seeds if (a, s) in by and (b, s) in by]
        if len(both) < 2:
            continue
        d = [100 * (by[(a, s)]["accuracy"] - by[(b, s)]["accuracy"]) for s in both]
        mean = statistics.mean(d)
        half = _t95(len(d)) * statistics.stdev(d) / math.sqrt(len(d))
        ratio = statistics.mean(by[(b, s)]["train_flops"] / by[(a, s)]["train_flops"] for s in both)
        cost = f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"
        lines.append(
            f"| {a} − {b} | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] "
            f"| {a} uses {cost} | {len(d)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--iterations", type=int, default=1000, help="iterations per round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-pairs", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--out", default=str(RESULTS / "bert_glue_like.jsonl"))
    ap.add_argument("--table", action="store_true", help="print the table from the log and exit")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setting = {
        "task": "contains",
        "model": "BertForSequenceClassification(hidden 128, 2 layers, 2 heads, ffn 512, dropout 0)",
        "pattern": args.pattern,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "train_pairs": args.train_pairs,
        "lr": args.lr,
        "optimizer": "adamw, warm-up 10%, lr x0.1 at 75% of each train call",
    }
    log = RunLog(Path(args.out), setting)
    if not args.table:
        done = log.done(lambda r: (r["seed"], r["method"]))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                if (seed, method) in done:
                    continue
                row = _one_run(args, seed, method)
                log.append({"seed": seed, "method": method, **row})
                print(f"seed {seed} {method}: acc {100 * row['accuracy']:.2f} "
                      f"flops {row['train_flops'] / 1e12:.2f}e12 rounds {row['rounds']} "
                      f"{row['wall_s']:.0f}s", flush=True)  # fmt: skip
    text = table(log.runs)
    print(text)
    summary = {"machine": machine_info(), "setting": setting, "table": text,
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in log.runs]}  # fmt: skip
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
