"""Paper claims judged on paired seeds: the one file RESULTS.md's opening table is made from.

Every benchmark that tests a paper's claim writes its entries here (``update``), one per claim and
setting, into ``benchmarks/results/claims.json``:

- ``paper``, ``claim`` (the claim as the paper states it), ``source`` (its table or figure),
  ``model``, ``dataset``, ``setting`` (pattern, sparsity), ``schedule`` (iterations per round,
  batch, learning rate), ``regime`` ("converged" or "short"), ``converged`` (the dense accuracy
  at the round's length and at twice it, their paired gain: converged when the gain is under 0.5
  point), ``seeds``;
- ``means`` (per method, percent), ``compare`` (the two sides of the claim), ``delta`` (mean
  paired difference ``a - b`` in points), ``ci95`` (its 95% confidence interval: t with n - 1
  degrees of freedom over the per-seed differences), ``threshold`` and ``verdict``.

Seeds are paired: within a seed every method starts from the same initialisation and sees the
same data order, so the per-seed difference removes the seed's own luck. A claim "delta >=
threshold" (or ">" for a strict claim) *held* when the whole interval is on its side, *did not
hold* when the whole interval is on the other side, and is *inconclusive* otherwise: no verdict
from a difference smaller than its interval. A verdict from a run that did not converge is
labelled with its regime, never mixed with the converged ones.

    python benchmarks/claims.py          # print the table and rewrite RESULTS.md's opening table
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
CLAIMS = RESULTS / "claims.json"
RESULTS_MD = Path(__file__).parent / "RESULTS.md"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
CONVERGED_GAIN = 0.5  # points: the dense model trained twice as long gains less than this


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (scipy's, which nmcompile depends on)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_delta(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a[i] - b[i]`` and its 95% confidence interval (t over the paired differences)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need >= 2 paired values on each side, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, threshold: float = 0.0, *, strict: bool = False) -> str:
    """'held' / 'did not hold' / 'inconclusive' for the claim ``delta >= threshold`` (``>`` when
    ``strict``) given the interval ``[lo, hi]`` of delta."""
    if lo > threshold or (not strict and lo >= threshold):
        return "held"
    if hi < threshold or (strict and hi <= threshold):
        return "did not hold"
    return "inconclusive"


def convergence(dense: Sequence[float], dense_2x: Sequence[float]) -> dict[str, Any]:
    """The convergence evidence: dense accuracy (percent) at the round's length and at twice it,
    paired per seed; converged when the mean gain is under ``CONVERGED_GAIN`` points."""
    gain, lo, hi = paired_delta(dense_2x, dense)
    return {
        "dense": statistics.mean(dense),
        "dense_2x": statistics.mean(dense_2x),
        "gain": gain,
        "gain_ci95": [lo, hi],
        "converged": gain < CONVERGED_GAIN,
    }


def convergence_from_log(
    path: Path, setting: Mapping[str, Any], seeds: Sequence[int]
) -> dict[str, Any] | None:
    """Convergence evidence from another benchmark's JSON-lines log (``lth_fashion_mnist.py
    --regime converged`` logs ``dense-1r`` and ``dense`` runs): the runs whose setting matches
    ``setting`` on model, data and schedule, first pattern logged. None without two paired seeds."""
    if not Path(path).exists():
        return None
    keys = ("model", "dataset", "iterations", "batch_size", "lr")
    acc: dict[str, dict[int, float]] = {}
    pattern = None
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        st = r.get("setting", {})
        if r.get("method") not in ("dense", "dense-1r") or r.get("seed") not in seeds:
            continue
        if any(st.get(k) != setting.get(k) for k in keys):
            continue
        pattern = pattern or r.get("pattern")
        if r.get("pattern") == pattern:  # dense runs do not depend on it: one copy per seed
            acc.setdefault(r["method"], {})[r["seed"]] = 100 * r["accuracy"]
    both = sorted(set(acc.get("dense", {})) & set(acc.get("dense-1r", {})))
    if len(both) < 2:
        return None
    return convergence([acc["dense-1r"][s] for s in both], [acc["dense"][s] for s in both])


def judge(
    *,
    paper: str,
    claim: str,
    source: str,
    model: str,
    dataset: str,
    setting: str,
    schedule: Mapping[str, Any],
    per_seed: Mapping[str, Mapping[int, float]],
    a: str,
    b: str,
    threshold: float = 0.0,
    strict: bool = False,
    converged: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One claim entry from per-seed accuracies (percent) of methods ``a`` and ``b`` (plus any
    other methods in ``per_seed``, reported in ``means``); None with fewer than 2 paired seeds."""
    seeds = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
    if len(seeds) < 2:
        return None
    xa = [per_seed[a][s] for s in seeds]
    xb = [per_seed[b][s] for s in seeds]
    delta, lo, hi = paired_delta(xa, xb)
    regime = "converged" if converged and converged.get("converged") else "short"
    return {
        "paper": paper,
        "claim": claim,
        "source": source,
        "model": model,
        "dataset": dataset,
        "setting": setting,
        "schedule": dict(schedule),
        "regime": regime,
        "converged": dict(converged) if converged else None,
        "seeds": seeds,
        "means": {
            m: statistics.mean(v[s] for s in seeds)
            for m, v in per_seed.items()
            if all(s in v for s in seeds)
        },
        "compare": [a, b],
        "delta": delta,
        "ci95": [lo, hi],
        "threshold": threshold,
        "strict": strict,
        "verdict": verdict(lo, hi, threshold, strict=strict),
        **(dict(extra) if extra else {}),
    }


def _key(e: Mapping[str, Any]) -> tuple:
    return (e["paper"], e["claim"], e["model"], e["dataset"], e["setting"], e["regime"])


def load(path: Path = CLAIMS) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["entries"] if path.exists() else []


def update(
    entries: Sequence[Mapping[str, Any] | None],
    path: Path = CLAIMS,
    *,
    drop: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[dict]:
    """Merge ``entries`` into the claims file (an entry replaces the one with its key). ``drop``:
    existing entries it returns True for are removed first (a benchmark replacing everything it
    judged before, e.g. a verdict from partial data that changed regime)."""
    from nmcompile._io import atomic_write_json

    merged = {_key(e): e for e in load(path) if drop is None or not drop(e)}
    for e in entries:
        if e is not None:
            merged[_key(e)] = dict(e)
    out = sorted(merged.values(), key=lambda e: (e["paper"], e["regime"] != "converged", _key(e)))
    atomic_write_json(path, {"entries": out})
    return out


def markdown(entries: Sequence[Mapping[str, Any]]) -> str:
    """The claims table: converged-regime verdicts first, short runs labelled."""
    lines = [
        "| paper | claim (source) | model, data, setting | regime (dense, 2x) | seeds | means (%) "
        "| delta a - b [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        c = e.get("converged") or {}
        regime = e["regime"]
        if c:
            regime += f" ({c['dense']:.2f}, {c['dense_2x']:.2f})"
        means = ", ".join(f"{m} {v:.2f}" for m, v in e["means"].items())
        if e.get("unit"):  # not an accuracy in percent
            means += f" ({e['unit']})"
        a, b = e["compare"]
        lo, hi = e["ci95"]
        verdict_text = e["verdict"] if e["regime"] == "converged" else f"{e['verdict']} (short run)"
        for key, against in (("flops_ratio_vs_mimp", "mIMP"), ("flops_ratio_vs_others", "them")):
            if e.get(key):
                means += f"; {e[key]:.1f}x fewer training FLOPs than {against}"
        if e.get("flops_ratio_a_b"):
            convention = str(e.get("flops_convention", "")).replace(":", " ").split(" ")[0]
            means += f"; training FLOPs {a} / {b} = {e['flops_ratio_a_b']:.2f}x ({convention})"
        lines.append(
            f"| {e['paper']} | {e['claim']} ({e['source']}) | {e['model']}, {e['dataset']}, "
            f"{e['setting']} | {regime} | {len(e['seeds'])} | {means} | {a} - {b}: "
            f"{e['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] | **{verdict_text}** |"
        )
    return "\n".join(lines) + "\n"


def write_results_md(entries: Sequence[Mapping[str, Any]], path: Path = RESULTS_MD) -> None:
    """Put the table between the claims markers at the top of RESULTS.md."""
    text = path.read_text()
    body = (
        f"{BEGIN}\n## Paper claims, judged on paired seeds\n\nGenerated by "
        "`python benchmarks/claims.py` from `results/claims.json`; how each row was produced is "
        "in the section of its benchmark below. Verdict rule: the 95% interval of the paired "
        "difference decides (held / did not hold), otherwise inconclusive; rows from runs that "
        "did not converge are labelled short runs.\n\n"
        f"{markdown(entries)}{END}"
    )
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END) :]
    else:  # after the title and its opening paragraph
        head, _, rest = text.partition("\n## ")
        text = f"{head.rstrip()}\n\n{body}\n\n## {rest}"
    path.write_text(text)


def write_summary(
    path: Path, setting: Mapping[str, Any], legacy: Mapping[str, Any], entries: Sequence, table: str
) -> None:
    """A benchmark's JSON summary: machine, setting, its own claim flags, the paired entries."""
    from nmcompile._machine import machine_info

    body = {
        "machine": machine_info(),
        "setting": dict(setting),
        "claims": dict(legacy),
        "paired_claims": list(entries),
        "table": table,
    }
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    entries = load()
    if not entries:
        print(f"no claims in {CLAIMS} yet", file=sys.stderr)
        return 1
    print(markdown(entries))
    write_results_md(entries)
    print(f"rewrote the claims table in {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
