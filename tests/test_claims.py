"""benchmarks/claims.py: paired intervals and verdicts that can go each way, and the merged file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims


def test_paired_interval_matches_scipys_paired_t():
    from scipy import stats

    a = [91.2, 90.8, 91.5, 90.9, 91.1]
    b = [90.7, 90.9, 90.8, 90.2, 90.6]
    mean, lo, hi = claims.paired_delta(a, b)
    d = [x - y for x, y in zip(a, b)]
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert mean == pytest.approx(sum(d) / len(d))
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
    # pairing matters: the same numbers unpaired would give a far wider interval
    assert hi - lo < 2 * (max(a) - min(b))
    with pytest.raises(ValueError, match="paired"):
        claims.paired_delta([1.0], [2.0])


@pytest.mark.parametrize(
    ("lo", "hi", "threshold", "strict", "expected"),
    [
        (0.1, 0.9, 0.0, False, "held"),
        (0.0, 0.9, 0.0, False, "held"),
        (0.0, 0.9, 0.0, True, "inconclusive"),
        (-0.3, 0.4, 0.0, False, "inconclusive"),
        (-0.9, -0.1, 0.0, False, "did not hold"),
        (-0.4, 0.2, -0.5, False, "held"),  # within 0.5 point
        (-1.2, -0.6, -0.5, False, "did not hold"),
        (-0.8, -0.2, -0.5, False, "inconclusive"),
    ],
)
def test_verdict_follows_the_interval(lo, hi, threshold, strict, expected):
    assert claims.verdict(lo, hi, threshold, strict=strict) == expected


def test_judge_update_and_results_md(tmp_path):
    per_seed = {"mimp": {0: 90.0, 1: 91.0, 2: 90.5}, "asp": {0: 89.0, 1: 90.1, 2: 89.4}}
    conv = claims.convergence([89.9, 90.3, 90.0], [90.1, 90.4, 90.2])
    assert conv["converged"] and conv["gain"] == pytest.approx(0.1667, abs=1e-3)
    common = dict(
        paper="mIMP", claim="mIMP >= ASP", source="Table 1", model="lenet300",
        dataset="fashion-mnist", setting="2:4", schedule={"iterations": 3000},
        per_seed=per_seed, a="mimp", b="asp",
    )  # fmt: skip
    e = claims.judge(**common, converged=conv)
    assert e["regime"] == "converged" and e["verdict"] == "held" and e["seeds"] == [0, 1, 2]
    short = claims.judge(**common, converged={**conv, "converged": False})
    assert short["regime"] == "short"
    assert claims.judge(**{**common, "per_seed": {"mimp": {0: 1.0}, "asp": {0: 1.0}}}) is None
    path = tmp_path / "claims.json"
    claims.update([e, short, None], path)
    # a rerun replaces its own entry, keyed by paper, claim, model, data, setting and regime
    again = claims.judge(**{**common, "per_seed": {**per_seed, "asp": {0: 91, 1: 92, 2: 91.6}}},
                         converged=conv)  # fmt: skip
    entries = claims.update([again], path)
    assert len(entries) == 2 and entries[0]["verdict"] == "did not hold"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nIntro.\n\n## First section\n\nbody\n")
    claims.write_results_md(entries, md)
    claims.write_results_md(entries, md)  # idempotent: one table, the sections kept
    text = md.read_text()
    assert text.count(claims.BEGIN) == 1 and "## First section" in text
    assert text.index("Intro.") < text.index(claims.BEGIN) < text.index("## First section")
    assert "**did not hold**" in text and "(short run)" in text
    # a benchmark replacing everything it judged: the short-run entry of the same schedule goes
    left = claims.update([again], path, drop=lambda x: x["regime"] == "short")
    assert [x["regime"] for x in left] == ["converged"]


def _eb_rows(stops, iterations=8000):
    """lmimp-pool rows of 3 seeds whose checked rounds stop at ``stops[seed]`` (None: never)."""
    rows = []
    for seed, stop in enumerate(stops):
        rounds = [
            {"round": 0, "checks": [], "stop_iteration": None},
            *(
                {"round": r, "checks": [[800, 0.3], [1600, 0.05]], "stop_iteration": stop}
                for r in (1, 2, 3)
            ),
        ]
        row = {"pattern": "2:4", "method": "lmimp-pool", "seed": seed}
        rows.append({**row, "early_bird": {"rounds": rounds}})
    return rows


@pytest.mark.parametrize(
    "stops, expected",
    [((1600, 1600, 800), "held"), ((None, None, 7200), "did not hold")],
)
def test_early_bird_claim_reads_the_rounds_stop_iterations(stops, expected):
    import lth_fashion_mnist as lth

    rows = _eb_rows(stops)
    # round 0 has no checks: it does not count; a round that never fired counts 100%
    frac = lth.stop_fraction(rows[0], 8000)
    assert frac == (20.0 if stops[0] else 100.0)
    common = {
        "paper": "p", "model": "m", "dataset": "d", "setting": "2:4",
        "schedule": {"iterations": 8000}, "per_seed": {}, "converged": None,
    }  # fmt: skip
    entry = lth.judge_early_bird(rows, "2:4", common)
    assert entry["verdict"] == expected
    assert entry["median_distance"] == pytest.approx((0.3 + 0.05) / 2)
