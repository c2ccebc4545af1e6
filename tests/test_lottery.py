"""Lottery-ticket rounds: IMP, mIMP (+high, +rand), L-mIMP, EB; the round engine's rewinding,
early-bird stops, checkpoints and resume."""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import (
    ConfigError,
    NMPattern,
    StepInfo,
    SupervisedTrainer,
    UnknownOptionError,
    data,
    zoo,
)
from nmcompile._methods.lottery import (
    _MIMP,
    LMIMPConfig,
    early_bird_distance,
    lmimp_flops_bound,
    mimp_pool_schedule,
    plp_scores,
)
from nmcompile._pattern import nm_group_counts
from nmcompile.passes import check_nm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


X = torch.randn(8, 16)


class RecordingTrainer:
    """A real (tiny) SGD trainer that records what each round started from.

    ``snapshot_at``: also records the full state after that iteration of the first call, which
    is what rewinding must restore.
    """

    def __init__(self, snapshot_at: int | None = None, lr: float = 0.05, freeze: bool = False):
        self.calls: list[dict] = []
        self.snapshot_at = snapshot_at
        self.snapshot: dict | None = None
        self.lr = lr
        self.freeze = freeze
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 16, generator=gen)
        self.y = torch.randint(0, 4, (64,), generator=gen)

    def train(self, model, iterations, on_step=None):
        masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight_mask")}
        start = {
            k: v.clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")
        }
        self.calls.append({"masks": masks, "start": start, "iterations": iterations})
        opt = torch.optim.SGD(model.parameters(), lr=0.0 if self.freeze else self.lr, momentum=0.9)
        for i in range(iterations):
            idx = torch.arange(i * 8, i * 8 + 8) % 64
            loss = nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if len(self.calls) == 1 and self.snapshot_at == i + 1:
                self.snapshot = {
                    k: v.clone()
                    for k, v in model.state_dict().items()
                    if not k.endswith("weight_mask")
                }
            if on_step is not None and on_step(StepInfo(i + 1, 8, loss.detach(), self.lr)):
                break

    def evaluate(self, model):
        with torch.no_grad():
            return float((model(self.x).argmax(-1) == self.y).float().mean())


# -- mIMP pool invariants --------------------------------------------------------------------
def _run_2to4(method: str, **options):
    """``method`` at 2:4 on the small net, with a recording trainer."""
    return nmcompile.compile(
        _net(), method, "2:4", example_inputs=(X,), trainer=RecordingTrainer(), **options
    )


@pytest.mark.parametrize("spec", ["2:4", "1:4", "2:8"])
def test_mimp_keeps_at_least_n_per_group_and_exactly_n_at_the_end(spec):
    pattern = NMPattern.parse(spec)
    trainer = RecordingTrainer()
    r = nmcompile.compile(
        _net(), "mimp", spec, example_inputs=(X,), trainer=trainer, iterations_per_round=6
    )
    for call in trainer.calls:  # every round trained with >= n survivors in every group
        for mask in call["masks"].values():
            assert int(nm_group_counts(mask, pattern.m).min()) >= pattern.n
    sparsities = [h["sparsity"] for h in r.history]
    assert sparsities == sorted(sparsities) and sparsities[0] == 0.0
    assert r.history[-1]["pool_cleared"] is True
    assert check_nm(r.masked, pattern, strict=True).ok  # exactly n at the end
    assert r.sparsity == pytest.approx(pattern.sparsity)
    # the losing-ticket pool shrinks by prune_rate each round until epsilon clears it
    pools = [h["pool_after"] for h in r.history[1:]]
    for a, b in itertools.pairwise(pools[:-1]):
        assert b == pytest.approx(0.8 * a, rel=0.02)
    assert pools[-2] > 0.01 >= pools[-2] * 0.8 and pools[-1] == 0.0


def test_mimp_high_takes_fewer_rounds_and_rand_reinitialises():
    base = _run_2to4(
        "mimp",
        iterations_per_round=4,
    )
    high = _run_2to4(
        "mimp-high",
        iterations_per_round=4,
    )
    assert high.config.prune_rate == 0.4
    assert len(high.history) < len(base.history)
    assert high.history[-1]["train_flops"] < base.history[-1]["train_flops"]
    trainer = RecordingTrainer()
    rand = nmcompile.compile(
        _net(), "mimp-rand", "2:4", example_inputs=(X,), trainer=trainer, iterations_per_round=4
    )
    assert rand.config.rewind == "reinit"
    starts = [c["start"]["2.weight"] for c in trainer.calls]
    assert not torch.equal(starts[1], starts[2])  # fresh random weights every round
    assert check_nm(rand.masked, NMPattern(2, 4), strict=True).ok


def test_rewinding_restores_the_snapshot_of_surviving_weights():
    trainer = RecordingTrainer(snapshot_at=3)
    nmcompile.compile(
        _net(),
        "imp",
        example_inputs=(X,),
        trainer=trainer,
        iterations_per_round=10,
        rewind_iteration=3,
        target_sparsity=0.5,
    )
    assert trainer.snapshot is not None and len(trainer.calls) > 2
    assert trainer.calls[0]["iterations"] == 10
    for call in trainer.calls[1:]:
        assert call["iterations"] == 7  # rounds after the first train I - k iterations
        for name, value in trainer.snapshot.items():
            assert torch.equal(call["start"][name], value), name


def test_rewind_iteration_zero_is_the_initialisation():
    net = _net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = RecordingTrainer()
    nmcompile.compile(
        net,
        "imp",
        example_inputs=(X,),
        trainer=trainer,
        iterations_per_round=5,
        rewind_iteration=0,
        target_sparsity=0.36,
    )
    for name, value in init.items():
        assert torch.equal(trainer.calls[1]["start"][name], value)


def test_imp_prunes_globally_to_the_exact_target():
    r = nmcompile.compile(
        _net(),
        "imp",
        example_inputs=(X,),
        trainer=RecordingTrainer(),
        iterations_per_round=3,
        target_sparsity=0.75,
    )
    total = sum(m.numel() for m in r.masks.values())
    kept = sum(int(m.sum()) for m in r.masks.values())
    assert kept == round(0.25 * total)
    # 20% of the remaining weights per round: 1, 0.8, 0.64, 0.512, 0.41, 0.328, 0.262 -> 0.25
    assert [round(h["sparsity"], 3) for h in r.history] == [
        0.0,
        0.2,
        0.36,
        0.488,
        0.59,
        0.672,
        0.738,
        0.75,
    ]
    assert r.pattern is None


# -- L-mIMP ------------------------------------------------------------------------------------
def test_plp_scores_zscore_and_max():
    w = torch.tensor([[4.0, 2.0, 1.0, 1.0, 5.0, -5.0, 0.0, 3.0]])
    mask = torch.tensor([[True, True, True, True, True, True, False, True]])
    z = plp_scores(w, mask, 4, "zscore")
    # group [4, 2, 1, 1]: mean 2, population std sqrt(1.5)
    assert z[0, :4].tolist() == pytest.approx(
        [2 / 1.5**0.5, 0.0, -1 / 1.5**0.5, -1 / 1.5**0.5], rel=1e-5
    )
    assert z[0, 4:].tolist()[0] == pytest.approx(z[0, 5].item())  # |5| == |-5|
    m = plp_scores(w, mask, 4, "max")
    assert m[0, :4].tolist() == [1.0, 0.5, 0.25, 0.25]
    assert m[0, 6].item() == 0.0


def test_lmimp_reaches_exact_nm_with_fewer_flops_than_mimp():
    mimp = _run_2to4(
        "mimp",
        iterations_per_round=20,
    )
    lm = _run_2to4(
        "lmimp",
        iterations_per_round=20,
        eb_interval=2,
    )
    assert check_nm(lm.masked, NMPattern(2, 4), strict=True).ok
    assert len(lm.history) < len(mimp.history)
    assert lm.history[-1]["train_flops"] < mimp.history[-1]["train_flops"] / 2
    # PLP is off for the first R_t = 2 pruning steps, then removes pool weights early
    assert [h["plp_pruned"] for h in lm.history[1:3]] == [0, 0]
    assert sum(h["plp_pruned"] for h in lm.history[3:]) > 0
    # the final ticket trains a full round (no early-bird cut)
    assert lm.history[-1]["stopped_early"] is False
    assert lm.history[-1]["round_iterations"] == 20 - lm.config.rewind_at


def _layer_mean(a: dict, b: dict) -> float:
    return sum(float((a[k] != b[k]).float().mean()) for k in a) / len(a)


@pytest.mark.parametrize("reset", [False, True])
def test_early_bird_b_last_carries_over_rounds_as_algorithm_2_says(reset):
    # frozen weights: every check proposes the mask the round's pruning step will apply.
    # Alg. 2 never resets B_last, so a round's first check compares with the mask it trains
    # under (the step's own prune); eb_reset_last=True only records at the first check.
    trainer = RecordingTrainer(freeze=True)
    r = nmcompile.compile(
        _net(),
        "lmimp",
        "2:4",
        example_inputs=(X,),
        trainer=trainer,
        iterations_per_round=40,
        eb_interval=5,
        plp_start_round=1,
        eb_start_round=1,
        rewind_iteration=0,
        eb_reset_last=reset,
    )
    assert r.history[0]["round_iterations"] == 40 and r.history[0]["eb_checks"] == []
    eb_rounds = r.history[1:-1]
    assert eb_rounds
    for h in eb_rounds:
        i = h["round"]
        step = _layer_mean(trainer.calls[i]["masks"], trainer.calls[i + 1]["masks"])
        (it0, first), *rest = h["eb_checks"]
        assert it0 == 5
        if reset:
            assert first is None
        else:
            assert first == pytest.approx(step)
        stop = 5 if first is not None and first < 0.1 else 10
        assert h["eb_stop_iteration"] == stop == h["round_iterations"]
        assert h["stopped_early"]
        if stop == 10:
            assert rest == [[10, 0.0]]
    if not reset:  # some round's own step is below beta: it stopped at its first check
        assert any(h["eb_stop_iteration"] == 5 for h in eb_rounds)
    final = r.history[-1]
    assert final["eb_checks"] == [] and final["eb_stop_iteration"] is None
    assert not final["stopped_early"]


class _OneLayerEngine:
    """What ``propose`` reads of a RoundEngine, for one 2:4 layer."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.session = SimpleNamespace(
            pattern=NMPattern(2, 4), sites=[SimpleNamespace(param="w", group_axis=1)]
        )
        self.mask, self.weight, self.round = mask, mask.float(), 0
        self.total_weights = mask.numel()

    def masks(self):
        return {"w": self.mask}

    def weights(self):
        return {"w": self.weight}


def test_pool_distance_can_fail_to_fire_where_the_layer_mean_cannot():
    # Two unrelated random weight draws at 2:4 pruning step 4: the candidates differ in almost
    # every weight the step drops, yet the layer-mean distance (Alg. 2) is under beta = 0.1,
    # since the step drops only 0.2 * 0.256 of the weights. Pool-normalised, it is ~0.37.
    gen = torch.Generator().manual_seed(0)
    method = _MIMP(LMIMPConfig(plp_start_round=99), plp=True, early_bird=True)
    engine = _OneLayerEngine(torch.ones(256, 256, dtype=torch.bool))
    engine.weight = torch.randn(256, 256, generator=gen)
    for step in range(3):
        engine.round = step
        engine.mask = method.propose(engine)[0]["w"]
    engine.round = 3  # the 4th pruning step
    candidates = []
    for _ in range(2):
        engine.weight = torch.randn(256, 256, generator=gen)
        mask, info = method.propose(engine)
        candidates.append(mask)
    pool = round(info["pool_before"] * engine.total_weights)
    assert pool / engine.total_weights == pytest.approx(0.5 * 0.8**3, abs=1e-3)
    layer_mean = early_bird_distance(*candidates)
    pooled = early_bird_distance(*candidates, "pool", pool=pool)
    assert layer_mean == pytest.approx(0.094, abs=0.005) and layer_mean < 0.1
    assert pooled == pytest.approx(layer_mean * engine.total_weights / pool)
    assert pooled > 0.3
    # ... and the same mask with itself is 0 under both
    assert early_bird_distance(candidates[0], candidates[0], "pool", pool=pool) == 0.0


class Shaker(RecordingTrainer):
    """Fresh random weights at every step: the ranking never settles."""

    def train(self, model, iterations, on_step=None):
        for i in range(iterations):
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn_like(p))
            if on_step is not None and on_step(StepInfo(i + 1, 8, torch.zeros(()), 0.1)):
                break
        self.calls.append({"iterations": iterations})


def test_early_bird_on_random_weights_fires_with_the_layer_mean_not_with_the_pool():
    runs = {
        distance: nmcompile.compile(
            _net(),
            "lmimp",
            "2:4",
            example_inputs=(X,),
            trainer=Shaker(),
            iterations_per_round=30,
            eb_interval=5,
            eb_start_round=1,
            plp_start_round=50,  # LTP only: candidates differ only in what the step drops
            eb_reset_last=True,
            eb_distance=distance,
        )
        for distance in ("layer_mean", "pool")
    }
    late = runs["layer_mean"].history[6:-1]  # steps 7 on: the step drops < 3% of the weights
    assert late and all(h["eb_stop_iteration"] == 10 for h in late)
    assert all(h["eb_checks"][1][1] < 0.1 for h in late)
    pooled = runs["pool"].history
    assert not any(h["stopped_early"] for h in pooled)
    assert all(d > 0.25 for h in pooled[1:-1] for _, d in h["eb_checks"][1:])


def test_early_bird_report_per_round_is_json_and_consistent():
    r = _run_2to4(
        "lmimp",
        iterations_per_round=40,
        eb_interval=4,
        eb_distance="pool",
    )
    assert json.loads(json.dumps(r.history)) == r.history
    assert json.loads(json.dumps(r.diagnostics)) == r.diagnostics
    for h in r.history:
        checks, stop = h["eb_checks"], h["eb_stop_iteration"]
        if h["round"] < 2 or h is r.history[-1]:  # A.3: from R_t = 2 on; the final round: full
            assert checks == [] and stop is None
            continue
        assert [it for it, _ in checks] == [4 * (i + 1) for i in range(len(checks))]
        distances = [d for _, d in checks]
        if stop is None:
            assert all(d >= 0.1 for d in distances) and not h["stopped_early"]
        else:
            assert stop == checks[-1][0] == h["round_iterations"] and h["stopped_early"]
            assert distances[-1] < 0.1 and all(d >= 0.1 for d in distances[:-1])
    eb = r.diagnostics["early_bird"]
    assert (eb["distance"], eb["beta"], eb["interval"], eb["start_round"]) == ("pool", 0.1, 4, 2)
    assert eb["reset_last"] is False
    assert [x["checks"] for x in eb["rounds"]] == [h["eb_checks"] for h in r.history]
    assert [x["stop_iteration"] for x in eb["rounds"]] == [
        h["eb_stop_iteration"] for h in r.history
    ]
    assert eb["flops_bound_plp"] >= eb["flops_bound"] > 1.0
    # mIMP has no early bird: no keys
    m = _run_2to4(
        "mimp",
        iterations_per_round=4,
    )
    assert "eb_checks" not in m.history[1] and "early_bird" not in m.diagnostics


def test_plp_fraction_is_recorded_per_pruning_step():
    r = _run_2to4(
        "lmimp",
        iterations_per_round=20,
        eb_interval=2,
    )
    total = sum(m.numel() for m in r.masks.values())
    assert "plp_fraction" not in r.history[0]
    for h in r.history[1:]:
        after_ltp = round(h["pool_before"] * total) - h["ltp_pruned"]
        assert h["plp_fraction"] == pytest.approx(h["plp_pruned"] / after_ltp)
    assert [h["plp_fraction"] for h in r.history[1:3]] == [0.0, 0.0]  # before R_t
    assert r.history[3]["plp_fraction"] > 0.5  # z-score alpha -0.1 at 2:4: most of the pool


# -- the FLOPs bound ---------------------------------------------------------------------------
def test_flops_bound_by_hand():
    # I = 100, k = 10, I_eb = 10, 2:4, p = 0.5, epsilon = 0.1: pool 0.5 -> 0.25 -> 0.125 ->
    # 0.0625 (cleared at step 3): mIMP trains 4 rounds, 100 + 3 * 90 = 370 iterations.
    base = {
        "iterations_per_round": 100,
        "rewind_iteration": 10,
        "eb_interval": 10,
        "prune_rate": 0.5,
        "epsilon": 0.1,
    }
    assert mimp_pool_schedule(NMPattern(2, 4), 0.5, 0.1) == [0.25, 0.125, 0.0]
    b = lmimp_flops_bound(LMIMPConfig(**base), "2:4")
    # A.3: rounds 0, 1 full, round 2 stops at its first check, round 3 (the final ticket) full
    assert b.mimp_iterations == (100, 90, 90, 90)
    assert b.lmimp_iterations == (100, 90, 10, 90)
    assert b.lmimp_stops == (None, None, 10, None)
    assert b.ratio == pytest.approx(370 / 290)
    # every round may stop early: 10 + 10 + 10 + 90
    assert lmimp_flops_bound(LMIMPConfig(**base, eb_start_round=0), "2:4").ratio == (
        pytest.approx(370 / 120)
    )
    # the first check cannot fire: with a reset B_last, or pool distance and beta <= p
    for extra in ({"eb_reset_last": True}, {"eb_distance": "pool"}):
        assert lmimp_flops_bound(LMIMPConfig(**base, **extra), "2:4").lmimp_iterations == (
            100,
            90,
            20,
            90,
        )
    # cost per iteration = mask density: 1, 0.75, 0.625, 0.5
    weighted = lmimp_flops_bound(LMIMPConfig(**base), "2:4", cost=lambda d: d)
    assert weighted.mimp_cost == pytest.approx(100 + 0.75 * 90 + 0.625 * 90 + 0.5 * 90)
    assert weighted.lmimp_cost == pytest.approx(100 + 0.75 * 90 + 0.625 * 10 + 0.5 * 90)
    # p = 0.2, epsilon = 0.01: 18 steps; PLP clearing the pool at step R_t + 1 = 3 leaves
    # rounds 0..3: 100 + 90 + 10 + 90
    long = {**base, "prune_rate": 0.2, "epsilon": 0.01}
    b = lmimp_flops_bound(LMIMPConfig(**long), "2:4")
    assert len(b.mimp_iterations) == 19 and b.ratio == pytest.approx(1720 / (100 + 90 + 160 + 90))
    opt = lmimp_flops_bound(LMIMPConfig(**long), "2:4", plp_shortens=True)
    assert opt.lmimp_iterations == (100, 90, 10, 90) and opt.ratio == pytest.approx(1720 / 290)
    assert "5.93x fewer" in str(opt)
    assert json.loads(json.dumps(opt.to_json()))["ratio"] == pytest.approx(opt.ratio)


@pytest.mark.parametrize("start", [0, 1])
def test_flops_bound_is_what_a_run_stopping_at_every_earliest_check_trains(start):
    # frozen weights and a reset B_last: every checked round stops at its second check, the
    # earliest possible; eb_start_round=0 lets the dense round 0 stop early too
    cfg = {
        "iterations_per_round": 40,
        "eb_interval": 5,
        "eb_start_round": start,
        "plp_start_round": 50,
        "eb_reset_last": True,
    }
    r = nmcompile.compile(
        _net(), "lmimp", "2:4", example_inputs=(X,), trainer=RecordingTrainer(freeze=True), **cfg
    )
    total = sum(m.numel() for m in r.masks.values())
    bound = lmimp_flops_bound(LMIMPConfig(**cfg), NMPattern(2, 4), total_weights=total)
    assert tuple(h["round_iterations"] for h in r.history) == bound.lmimp_iterations
    assert tuple(h["eb_stop_iteration"] for h in r.history) == bound.lmimp_stops
    assert (r.history[0]["eb_stop_iteration"] == 10) is (start == 0)
    assert r.history[-1]["round_iterations"] == 40 - r.config.rewind_at  # final ticket: full


# -- EB baseline ---------------------------------------------------------------------------------
def test_eb_draws_the_ticket_when_the_queue_agrees():
    trainer = RecordingTrainer(freeze=True)
    r = nmcompile.compile(
        _net(),
        "eb",
        "2:4",
        example_inputs=(X,),
        trainer=trainer,
        iterations_per_round=100,
        eb_interval=4,
        eb_queue=5,
        finetune_iterations=7,
    )
    dense, pruned = r.history
    assert dense["early_bird_iteration"] == 20 and dense["round_iterations"] == 20
    assert pruned["round_iterations"] == 7 and pruned["sparsity"] == pytest.approx(0.5)
    assert check_nm(r.masked, NMPattern(2, 4), strict=True).ok


# -- diagnostics -------------------------------------------------------------------------------
def test_hamming_matrix_and_plp_misprediction():
    r = nmcompile.compile(
        _net(),
        "mimp",
        "2:8",
        example_inputs=(X,),
        trainer=RecordingTrainer(),
        iterations_per_round=5,
    )
    steps = len(r.history) - 1
    matrix = r.diagnostics["mask_hamming"]
    assert len(matrix) == steps and all(len(row) == steps for row in matrix)
    assert all(matrix[i][i] == 0.0 for i in range(steps))
    assert matrix[0][-1] > matrix[0][1] > 0  # masks drift apart as rounds go on
    assert matrix[0][1] == pytest.approx(r.history[2]["hamming_to_prev"])
    rates = r.diagnostics["plp_misprediction"]
    assert len(rates) == steps
    assert all(x is None or 0.0 <= x <= 1.0 for x in rates)
    # ... and per round in the history: pruning step i comes before round i's training
    assert [h.get("plp_misprediction") for h in r.history[1:]] == rates
    assert "plp_misprediction" not in r.history[0]
    with pytest.raises(ConfigError, match=r"LMIMPConfig\.plp_diagnostics measures"):
        nmcompile.compile(_net(), "lmimp", "2:4", example_inputs=(X,), plp_diagnostics=True)
    report = r.report()
    assert "PLP misprediction" in report and "Mask Hamming distance" in report


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("mimp", {"epsilon": 2.0}, r"MIMPConfig.epsilon must be in \(0.0, 1.0\), got 2.0"),
        ("mimp", {"prune_rate": 0.0}, r"MIMPConfig.prune_rate must be in \(0.0, 1.0\)"),
        ("lmimp", {"beta": -1.0}, r"LMIMPConfig.beta must be in \(0.0, 1.0\]"),
        ("lmimp", {"plp_norm": "l2"}, r"LMIMPConfig.plp_norm must be one of \['zscore', 'max'\]"),
        ("lmimp", {"plp_norm": "max", "alpha": -0.1}, r"LMIMPConfig.alpha must be in \(0.0, 1.0\)"),
        (
            "lmimp",
            {"eb_distance": "all"},
            r"LMIMPConfig.eb_distance must be one of \['layer_mean', 'pool'\], got 'all'",
        ),
        ("lmimp", {"eb_reset_last": 1}, r"LMIMPConfig.eb_reset_last must be True or False"),
        (
            "imp",
            {"rewind_iteration": 10, "iterations_per_round": 10},
            r"IMPConfig.rewind_iteration must be <= 9",
        ),
        ("imp", {"rewind": "snap"}, r"IMPConfig.rewind must be one of \['snapshot', 'reinit'\]"),
        ("imp", {"resume": True}, r"resume=True needs checkpoint_dir"),
        ("eb", {"eb_queue": 1}, r"EBConfig.eb_queue must be >= 2"),
    ],
)
def test_out_of_range_options_are_named(method, options, message):
    with pytest.raises(ConfigError, match=message):
        nmcompile.compile(_net(), method, "2:4", example_inputs=(X,), **options)


def test_unknown_iterative_option_lists_the_valid_ones():
    with pytest.raises(
        UnknownOptionError, match=r"unknown option \['eps'\].*'epsilon'.*'rewind_iteration'"
    ):
        nmcompile.compile(_net(), "mimp", "2:4", example_inputs=(X,), eps=0.1)


# -- checkpoints and resume --------------------------------------------------------------------
class Interrupt(Exception):
    pass


class CountingTrainer(SupervisedTrainer):
    """A real trainer that counts its train calls (a resumed run must not redo finished rounds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n = 0

    def train(self, model, iterations, on_step=None):
        self.n += 1
        return super().train(model, iterations, on_step)


class DyingTrainer(SupervisedTrainer):
    """A real trainer that dies in the middle of its ``die_on``-th train call."""

    def __init__(self, *args, die_on: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_on = die_on
        self.n = 0

    def train(self, model, iterations, on_step=None):
        self.n += 1
        if self.n == self.die_on:

            def dying(info):
                if info.iteration == 2:
                    raise Interrupt("killed mid-round")
                return on_step(info) if on_step else None

            return super().train(model, iterations, dying)
        return super().train(model, iterations, on_step)


def _digits_run(
    tmp, method, trainer_cls=SupervisedTrainer, resume=False, pattern="2:4", loader=None, **kw
):
    ds = data.load("digits", batch_size=32, seed=0)
    torch.manual_seed(0)
    model = zoo.create("cnn", in_channels=1, image_size=8)
    trainer = trainer_cls(loader or ds.train, ds.val, lr=0.05, progress=False, **kw)
    result = nmcompile.compile(
        model,
        method,
        pattern,
        example_inputs=(ds.example_input(2),),
        trainer=trainer,
        iterations_per_round=30,
        checkpoint_dir=str(tmp),
        resume=resume,
        seed=3,
    )
    result.trainer = trainer
    return result


def _strip(history):
    return [{k: v for k, v in h.items() if k != "wall_s"} for h in history]


def _assert_same_run(a, b):
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k]), k
    assert _strip(a.history) == _strip(b.history)
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k], v), k


@pytest.mark.parametrize("method", ["lmimp", "mimp-rand"])
def test_resume_after_interruption_gives_the_uninterrupted_masks(tmp_path, method):
    full = _digits_run(tmp_path / "full", method)
    with pytest.raises(Interrupt):
        _digits_run(tmp_path / "cut", method, DyingTrainer, die_on=3)
    saved = sorted(p.name for p in (tmp_path / "cut").glob("round-*.pt"))
    assert saved and len(saved) <= 2  # keep_checkpoints=2
    resumed = _digits_run(tmp_path / "cut", method, CountingTrainer, resume=True)
    _assert_same_run(full, resumed)  # the early-bird checks of every round included
    if method == "lmimp":
        assert any(h["eb_checks"] for h in resumed.history)
        assert resumed.diagnostics["early_bird"] == full.diagnostics["early_bird"]
    # it continued: rounds 0 and 1 finished before the kill in round 2's training, so the
    # resumed run trains round 2 again and the rest, not the two finished ones
    assert resumed.trainer.n == len(full.history) - 2
    # resuming a finished run returns its result without training at all
    again = _digits_run(tmp_path / "cut", method, CountingTrainer, resume=True)
    assert _strip(again.history) == _strip(full.history) and again.trainer.n == 0


def test_resume_is_exact_with_a_shuffling_dataloader(tmp_path):
    # A plain DataLoader draws each epoch's order from the global RNG when the epoch starts;
    # the resumed run must replay that epoch in the same order. 30-iteration rounds over 45
    # batches per epoch: the kill lands mid-epoch.
    ds = data.load("digits", batch_size=32, seed=0)
    dataset = torch.utils.data.TensorDataset(ds.train.x, ds.train.y)

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)

    full = _digits_run(tmp_path / "full", "mimp", loader=loader())
    with pytest.raises(Interrupt):
        _digits_run(tmp_path / "cut", "mimp", DyingTrainer, loader=loader(), die_on=3)
    resumed = _digits_run(tmp_path / "cut", "mimp", CountingTrainer, loader=loader(), resume=True)
    _assert_same_run(full, resumed)
    assert resumed.trainer.n == len(full.history) - 2


def test_a_fresh_run_refuses_a_folder_holding_another_runs_rounds(tmp_path):
    _digits_run(tmp_path / "a", "imp")
    with pytest.raises(ConfigError, match=r"already holds the checkpoints of a run.*resume=True"):
        _digits_run(tmp_path / "a", "imp")


def test_resume_refuses_the_rounds_of_another_pattern(tmp_path):
    _digits_run(tmp_path / "a", "mimp")
    with pytest.raises(ConfigError, match=r"written by a run with pattern='2:4'.*pattern='1:4'"):
        _digits_run(tmp_path / "a", "mimp", pattern="1:4", resume=True)


def test_max_rounds_below_the_schedule_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"needs 78 rounds \(prune_rate 0.05\).*max_rounds=60"):
        nmcompile.compile(_net(), "mimp", "2:4", example_inputs=(X,), prune_rate=0.05)
    for method in ("mimp", "imp"):  # the prediction is the number of rounds the run trains
        r = nmcompile.compile(_net(), method, "2:4", example_inputs=(X,), iterations_per_round=1)
        assert len(r.history) == (19 if method == "mimp" else 9)
        assert check_nm(r.masked, NMPattern(2, 4)).ok or method == "imp"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    full = _digits_run(tmp_path / "a", "imp")
    del full
    pts = sorted((tmp_path / "a").glob("round-*.pt"))
    assert len(pts) == 2
    newest = pts[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(
        UserWarning, match=r"round-\d+\.pt is not usable: its checksum does not match"
    ):
        r = _digits_run(tmp_path / "a", "imp", resume=True)
    assert r.history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    # the torn round was set aside (kept for a look, never matched again), and the rounds the
    # resumed run wrote are the folder's newest
    assert (tmp_path / "a" / f"{newest.name}.unusable").is_file()
    assert sorted((tmp_path / "a").glob("round-*.pt"))[-1].name == newest.name


def test_random_reinit_draws_from_the_models_own_initialisation():
    # mimp-rand re-initialises each round: every weight tensor becomes a fresh permutation of
    # its initial values (the zoo's kaiming-normal fan-out here, not PyTorch's reset defaults)
    torch.manual_seed(0)
    model = zoo.create("cnn", in_channels=1, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    r = nmcompile.compile(model, "mimp-rand", "2:4", example_inputs=(x,), iterations_per_round=1)
    for name, init in model.state_dict().items():
        now = r.masked.state_dict()[name]
        if init.is_floating_point() and init.numel() > 1 and init.unique().numel() > 1:
            assert not torch.equal(now, init), name
            assert torch.equal(now.reshape(-1).sort().values, init.reshape(-1).sort().values), name


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    _digits_run(tmp_path / "a", "imp")
    ds = data.load("digits", batch_size=32, seed=0)
    with pytest.raises(ConfigError, match="written by a run with config="):
        nmcompile.compile(
            zoo.create("cnn", in_channels=1, image_size=8),
            "imp",
            example_inputs=(ds.example_input(1),),
            iterations_per_round=31,
            checkpoint_dir=str(tmp_path / "a"),
            resume=True,
            seed=3,
        )


def test_checkpoint_metadata(tmp_path):
    _digits_run(tmp_path / "a", "mimp-high")
    meta = json.loads(sorted((tmp_path / "a").glob("round-*.json"))[-1].read_text())
    assert meta["method"] == "mimp-high" and len(meta["sha256"]) == 64
    assert "checkpoint_dir" not in meta["config"] and meta["config"]["prune_rate"] == 0.4


def test_same_seed_same_masks():
    a = _digits_run_nockpt(seed=5)
    b = _digits_run_nockpt(seed=5)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
    assert [h["accuracy"] for h in a.history] == [h["accuracy"] for h in b.history]


def _digits_run_nockpt(seed):
    ds = data.load("digits", batch_size=32, seed=seed)
    torch.manual_seed(seed)
    model = zoo.create("cnn", in_channels=1, image_size=8)
    trainer = SupervisedTrainer(ds.train, ds.val, lr=0.05, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nmcompile.compile(
            copy.deepcopy(model),
            "lmimp",
            "1:4",
            example_inputs=(ds.example_input(2),),
            trainer=trainer,
            iterations_per_round=20,
            seed=seed,
        )
