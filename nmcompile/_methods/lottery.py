"""Lottery tickets, unstructured and N:M.

``imp`` — iterative magnitude pruning with rewinding (Frankle et al.; Chen et al. 2022, Alg. 1):
each round prunes ``prune_rate`` of the remaining weights by global |w|, until
``target_sparsity`` (the last step prunes only what is left to reach it exactly).

``mimp`` — masked IMP for N:M (mIMP paper, Alg. 1). In every group of M, the top-N |w| are local
winning tickets; all other surviving weights form one global losing-ticket pool. Each round
prunes ``prune_rate`` of the pool by |w| (losing-ticket pruning, LTP); when the pool is at most
``epsilon`` of all weights it is cleared. Winners are never pruned, so every group keeps at least
N weights throughout and exactly N at the end. ``mimp-high`` is the same with prune_rate 0.4;
``mimp-rand`` re-initialises the weights each round instead of rewinding.

``lmimp`` — L-mIMP (Alg. 2 + 3): mIMP plus Proactive Local Pruning and early-bird detection.

*PLP.* From the pruning step after ``plp_start_round`` (R_t) on, a pool weight is pruned early
when its group-normalised magnitude ``v <= alpha``. The paper is ambiguous here: Section 3.3 says
``|v| < alpha`` while its experiments use alpha = -0.5, -0.3, -0.1 (Fig. 4, Sec. 4.2, A.3) and its
tables print 0.3 / 0.1 for settings the text calls -0.3 / -0.1. A negative threshold on ``|v|``
would never fire, so we read ``v`` as the z-score of |w| among the group's surviving weights,
``v = (|w| - mean) / std``, and prune ``v <= alpha`` (Alg. 3's comparison): alpha = -0.1 removes
pool weights slightly below their group's mean, smaller alpha removes fewer. This reproduces the
paper's trend (smaller alpha: fewer PLP removals, more rounds, more FLOPs). The other reading is
available as ``plp_norm="max"``: ``v = |w| / max |w|`` in the group, with alpha in (0, 1).

*Early bird.* Algorithm 2: every ``eb_interval`` (I_eb) iterations of a round, the mask the next
pruning step would produce from the current weights (LTP, PLP when active) is recorded as ``B``;
its distance to ``B_last`` is computed, ``B_last = B`` is set, and the round stops when the
distance is below ``beta``. Checks run from training round ``eb_start_round`` on: None (default)
means R_t, A.3's schedule ("checked at every I_eb = 3000 iterations starting after R_t = 2 pruning
rounds", I = 30000, so I_eb is 10% of a round, the ``eb_interval`` default). Algorithm 2 itself
checks in every round; ``eb_start_round=0`` is that reading, in which every round may stop early,
rounds 0 and 1 included. The round that trains the final ticket (after the step that cleared the
pool) never stops early in either. Checks count iterations from the start of the round's training
(after the rewind to iteration k, so a later round of I - k iterations has its last check at the
largest multiple of I_eb below I - k).

``eb_distance`` says what "distance" is:

* ``"layer_mean"`` (default, Algorithm 2's "average hamming distance between B_l^last and B_l"):
  per layer, the fraction of the layer's weights whose mask bit differs, averaged over layers.
  Two candidates of one step differ only in the weights that step drops (``prune_rate`` of the
  losing pool, plus PLP's), so this distance is about ``2 * dropped / weights`` at most: at 2:4
  step 4 that is 0.10, and two unrelated random weight draws give about 0.094. Under beta = 0.1
  it cannot fail to fire once the pool is small.
* ``"pool"``: the number of differing entries over all layers divided by the size of the losing
  pool of the mask the round trains under (its surviving weights minus the N winners of every
  group: the weights the step decides on). ``beta`` is then the fraction of the pruning decision
  that changed; unrelated draws give about 0.37 at 2:4 step 4 (at most ``2 * prune_rate`` without
  PLP). Pooled over layers, not averaged per layer: LTP ranks one global pool, and a layer with a
  handful of pool weights should not weigh as much as the largest.

``B_last`` (``eb_reset_last``): Algorithm 2 sets ``B_last = B`` at every check and never resets
it, so the first check of a round compares with the previous round's last recorded mask. A round
that stopped early, or whose last check fell on its last iteration, recorded exactly the mask the
pruning step then applied, so we start ``B_last`` of every round as the mask the round trains
under (default, ``eb_reset_last=False``). Its first check then measures the step's own prune:
with ``"layer_mean"`` LTP alone drops less than beta = 0.1 of the weights at every 2:4 step after
the first (0.2 * 0.4 = 0.08 at step 2), so unless PLP adds more those rounds stop at their first
check, before the rewound weights have trained much; with ``"pool"`` it is at least
``prune_rate`` and cannot fire while ``beta <= prune_rate``. ``eb_reset_last=True`` starts every
round without a ``B_last``: its first check only records, so a round trains at least
``2 * eb_interval`` iterations.

Every L-mIMP round's history record holds ``eb_checks`` (``[iteration, distance]`` per check,
distance None for a check with nothing to compare with) and ``eb_stop_iteration`` (None: the round
ran in full); the pruning step before it adds ``plp_fraction``, the fraction of the pool left after
LTP that PLP removed (near 1 is PLP pruning almost every non-winner at once: on weights trained for
a few iterations, magnitude-at-init pruning). ``diagnostics["early_bird"]`` repeats them with the
distance, ``beta``, interval, start round, and the best training-FLOPs reduction the schedule
allows (``lmimp_flops_bound``).

``eb`` — the early-bird baseline (You et al. 2020) for N:M: dense training, checking the N:M
magnitude mask every ``eb_interval`` iterations; once the last ``eb_queue`` masks all lie within
``eb_threshold`` of the newest, training stops, the ticket is drawn (one-shot N:M) and trained for
one more round from the early-bird weights.

*FLOPs bound.* Rounds before ``eb_start_round`` and the final ticket's round always train in
full, so L-mIMP's saving over mIMP is bounded before anything trains: ``lmimp_flops_bound`` gives
mIMP's training cost over L-mIMP's when every round that may stop early stops at its earliest
possible check (optionally with PLP clearing the pool at its first step).

Diagnostics (``CompileResult.diagnostics``): ``mask_hamming``, the pairwise Hamming distances
between the masks of all pruning steps (Fig. 3), and for ``mimp`` ``plp_misprediction``: per
pruning step, the fraction of the weights PLP would have removed that mIMP kept to the end (Fig. 4).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .._config import CheckpointedConfig, check_float, check_int
from .._errors import ConfigError
from .._pattern import NMPattern, group_view, nm_mask
from .._registry import register_method
from .._rounds import (
    IterativeConfig,
    RoundEngine,
    RoundMethod,
    _popcount,
    mask_distance,
    pack_masks,
)
from .._session import Session, Tracked
from .._shaping import global_unstructured
from .._trainer import StepInfo

__all__ = [
    "EBConfig",
    "FlopsBound",
    "IMPConfig",
    "LMIMPConfig",
    "MIMPConfig",
    "MIMPHighConfig",
    "MIMPRandConfig",
    "early_bird_distance",
    "lmimp_flops_bound",
    "mimp_pool_schedule",
]


# -- IMP -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class IMPConfig(IterativeConfig):
    """IMP: prune ``prune_rate`` of the remaining weights per round until ``target_sparsity``."""

    target_sparsity: float = 0.8

    def validate(self) -> None:
        super().validate()
        check_float(self, "target_sparsity", 0.0, 1.0, lo_open=True, hi_open=True)


class _IMP(RoundMethod):
    def __init__(self, config: IMPConfig) -> None:
        self.config = config

    def _kept(self, engine: RoundEngine) -> int:
        return sum(int(m.sum()) for m in engine.masks().values())

    def propose(self, engine):
        kept = self._kept(engine)
        target_kept = round((1.0 - self.config.target_sparsity) * engine.total_weights)
        # prune prune_rate of what remains, but never below the target (and never a negative
        # count: group-aware IMP's regrouping can leave fewer weights than IMP's own schedule)
        k = max(0, min(round(self.config.prune_rate * kept), kept - target_kept))
        rate = k / kept if kept else 0.0
        masks = engine.masks()
        scores = {p: w.abs() for p, w in engine.weights().items()}
        keep = global_unstructured(scores, rate, eligible=masks)
        new = {p: masks[p] & keep[p] for p in masks}
        return new, {"pruned": k}

    def done(self, engine):
        target_kept = round((1.0 - self.config.target_sparsity) * engine.total_weights)
        return self._kept(engine) <= target_kept

    def rounds_needed(self, engine):
        # the integer recurrence of propose(), from the dense start
        kept = engine.total_weights
        target_kept = round((1.0 - self.config.target_sparsity) * kept)
        rounds = 1
        while kept > target_kept:
            k = min(round(self.config.prune_rate * kept), kept - target_kept)
            if k <= 0:
                return None  # a rate too small to prune anything: the run says so at max_rounds
            kept -= k
            rounds += 1
        return rounds


@register_method(
    "imp",
    IMPConfig,
    structured=False,
    summary="iterative global magnitude pruning with rewinding (LTH)",
)
def run_imp(session: Session, config: IMPConfig) -> None:
    RoundEngine(session, config, _IMP(config)).run()


# -- mIMP / L-mIMP -------------------------------------------------------------------------------
_PLP_NORMS = ("zscore", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MIMPConfig(IterativeConfig):
    """mIMP. ``epsilon``: clear the losing-ticket pool once it is at most this fraction of all
    weights. ``alpha`` / ``plp_norm``: the PLP rule, used by mIMP only for the misprediction
    diagnostic (``plp_diagnostics``)."""

    epsilon: float = 0.01
    alpha: float = -0.1
    plp_norm: str = "zscore"
    plp_diagnostics: bool = True

    def validate(self) -> None:
        super().validate()
        check_float(self, "epsilon", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.plp_norm not in _PLP_NORMS:
            raise ConfigError(
                f"{type(self).__name__}.plp_norm must be one of {list(_PLP_NORMS)}, got "
                f"{self.plp_norm!r}"
            )
        if self.plp_norm == "zscore":
            check_float(self, "alpha", -3.0, 3.0)
        else:
            check_float(self, "alpha", 0.0, 1.0, lo_open=True, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MIMPHighConfig(MIMPConfig):
    """mIMP-high: mIMP pruning 40% of the pool per round."""

    prune_rate: float = 0.4


@dataclasses.dataclass(frozen=True, kw_only=True)
class MIMPRandConfig(MIMPConfig):
    """mIMP-rand: mIMP with random re-initialisation instead of rewinding."""

    rewind: str = "reinit"


_EB_DISTANCES = ("layer_mean", "pool")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMIMPConfig(MIMPConfig):
    """L-mIMP: mIMP + PLP (``alpha``, ``plp_norm``, from ``plp_start_round``) + early-bird
    detection. Defaults from the paper's A.3: epsilon 0.01, p 20%, R_t 2, alpha -0.1, beta 0.1.

    Early bird (module docstring for the maths): a round stops once the distance between
    consecutive candidate masks is below ``beta``, checked every ``eb_interval`` iterations
    (None: 10% of ``iterations_per_round``, A.3's I_eb = 3000 of I = 30000).

    * ``eb_start_round``: the first training round that is checked (round 0 is the dense one).
      None: ``plp_start_round``, A.3's "starting after R_t = 2 pruning rounds". ``0``: every round
      may stop early, rounds before R_t included (Algorithm 2 as printed, which gates only PLP on
      R_t). The final ticket's round always trains in full.
    * ``eb_distance``: ``"layer_mean"`` (default, Algorithm 2): per-layer fraction of differing
      mask bits, averaged over layers. ``"pool"``: differing bits over the size of the round's
      losing pool, so ``beta`` is the fraction of the pruning decision that changed.
    * ``eb_reset_last``: False (default, Algorithm 2, which never resets ``B_last``): a round's
      first check compares with the mask the round trains under. True: every round starts without
      ``B_last`` and can stop at its second check at the earliest.
    """

    beta: float = 0.1
    plp_start_round: int = 2
    eb_interval: int | None = None
    eb_start_round: int | None = None
    eb_distance: str = "layer_mean"
    eb_reset_last: bool = False
    plp_diagnostics: bool = False

    @property
    def eb_every(self) -> int:
        """Iterations between early-bird checks (I_eb)."""
        return self.eb_interval or max(1, self.iterations_per_round // 10)

    @property
    def eb_first_round(self) -> int:
        """The first training round with early-bird checks."""
        return self.plp_start_round if self.eb_start_round is None else self.eb_start_round

    def validate(self) -> None:
        super().validate()
        if self.plp_diagnostics:
            raise ConfigError(
                "LMIMPConfig.plp_diagnostics measures how often PLP would prune a weight that "
                "plain mIMP keeps; L-mIMP applies PLP, so there is nothing to compare. Run mimp "
                "with plp_diagnostics=True (its default) for the misprediction rate"
            )
        check_float(self, "beta", 0.0, 1.0, lo_open=True)
        check_int(self, "plp_start_round", 0)
        if self.eb_interval is not None:
            check_int(self, "eb_interval", 1, self.iterations_per_round)
        if self.eb_start_round is not None:
            check_int(self, "eb_start_round", 0)
        if self.eb_distance not in _EB_DISTANCES:
            raise ConfigError(
                f"LMIMPConfig.eb_distance must be one of {list(_EB_DISTANCES)}, got "
                f"{self.eb_distance!r}"
            )
        if not isinstance(self.eb_reset_last, bool):
            raise ConfigError(
                f"LMIMPConfig.eb_reset_last must be True or False, got {self.eb_reset_last!r}"
            )


def plp_scores(
    weight: torch.Tensor, mask: torch.Tensor, m: int, norm: str, axis: int = 1
) -> torch.Tensor:
    """Group-normalised magnitude ``v`` of every weight among its group's surviving weights
    (z-score or fraction of the group's max; see the module docstring). Groups run along the
    site's reduction ``axis``."""
    a = weight.detach().abs().float() * mask
    av = group_view(a, m, axis)
    mv = group_view(mask, m, axis).float()
    if norm == "max":
        v = av / av.amax(2, keepdim=True).clamp_min(1e-30)
    else:
        count = mv.sum(2, keepdim=True).clamp_min(1.0)
        mean = av.sum(2, keepdim=True) / count
        var = (((av - mean) * mv) ** 2).sum(2, keepdim=True) / count
        v = (av - mean) / var.sqrt().clamp_min(1e-12)
    return v.reshape(weight.shape)


def early_bird_distance(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    kind: str = "layer_mean",
    *,
    pool: int | None = None,
) -> float:
    """Distance between two candidate masks of one pruning step (module docstring).

    ``"layer_mean"``: Algorithm 2's average Hamming distance, the fraction of differing bits per
    layer averaged over layers. ``"pool"``: the differing bits of all layers over ``pool``, the
    size of the losing pool the step decides on (its mask's survivors minus the group winners).
    """
    if kind == "layer_mean":
        return mask_distance(a, b)
    if kind != "pool":
        raise ValueError(f"kind must be one of {list(_EB_DISTANCES)}, got {kind!r}")
    if pool is None:
        raise ValueError('kind="pool" needs pool=, the size of the losing pool')
    differing = sum(int((a[k] != b[k]).sum()) for k in a)
    return differing / max(pool, 1)


def mimp_pool_schedule(
    pattern: NMPattern,
    prune_rate: float,
    epsilon: float,
    *,
    total_weights: int | None = None,
) -> list[float] | None:
    """mIMP's losing-ticket pool, as a fraction of all weights, after each pruning step; the last
    step clears it (0.0). LTP only: pool ``1 - N/M`` at the start, ``prune_rate`` of it pruned per
    step, cleared once at most ``epsilon``. ``total_weights``: follow the run's integer counts
    (what ``rounds_needed`` does); None: the continuous recurrence. None when it takes more than
    10,000 steps."""
    n, m = pattern.n, pattern.m
    total = float(total_weights) if total_weights is not None else 1.0
    pool: float = (
        total_weights - total_weights // m * n if total_weights is not None else 1.0 - n / m
    )
    pools: list[float] = []
    while len(pools) < 10_000:
        pool -= round(prune_rate * pool) if total_weights is not None else prune_rate * pool
        if pool <= epsilon * total:
            return [*pools, 0.0]
        pools.append(pool / total)
    return None


@dataclasses.dataclass(frozen=True)
class FlopsBound:
    """What ``lmimp_flops_bound`` found: per trained round (round 0 first), the iterations mIMP
    trains and the fewest L-mIMP can train (``lmimp_stops``: the iteration a round stops at, None
    for a round that trains in full), and each side's cost, iterations weighted by the cost of an
    iteration at the round's mask density. ``ratio``: ``mimp_cost / lmimp_cost``, the most "times
    fewer training FLOPs than mIMP" the schedule allows."""

    mimp_iterations: tuple[int, ...]
    lmimp_iterations: tuple[int, ...]
    lmimp_stops: tuple[int | None, ...]
    mimp_cost: float
    lmimp_cost: float

    @property
    def ratio(self) -> float:
        return self.mimp_cost / self.lmimp_cost

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}

    def __str__(self) -> str:
        short = sum(s is not None for s in self.lmimp_stops)
        return (
            f"L-mIMP can train at most {self.ratio:.2f}x fewer FLOPs than mIMP: "
            f"{len(self.mimp_iterations)} mIMP rounds ({sum(self.mimp_iterations)} iterations) vs "
            f"{len(self.lmimp_iterations)} L-mIMP rounds ({sum(self.lmimp_iterations)} "
            f"iterations, {short} stopped at their earliest check)"
        )


def lmimp_flops_bound(
    config: LMIMPConfig,
    pattern: NMPattern | str,
    *,
    total_weights: int | None = None,
    plp_shortens: bool = False,
    cost: Callable[[float], float] | None = None,
) -> FlopsBound:
    """The best training-FLOPs saving of L-mIMP over mIMP that ``config``'s schedule allows.

    mIMP runs the same schedule (``iterations_per_round``, ``rewind_iteration``, ``prune_rate``,
    ``epsilon``) without early stops: round 0 trains I iterations, each later round I - k, for the
    rounds of ``mimp_pool_schedule``. L-mIMP trains the same rounds, but every round from
    ``eb_start_round`` on, except the final ticket's, stops at its earliest possible check: the
    first (``I_eb``), or the second (``2 I_eb``) when the first cannot fire: with
    ``eb_reset_last=True`` (nothing to compare with), or with ``eb_distance="pool"`` and ``beta <=
    prune_rate`` (the first check compares with the round's own mask, from which the candidate
    drops at least ``prune_rate`` of the pool, up to rounding).

    PLP is ignored by default (it can only shorten the run, by an amount the weights decide).
    ``plp_shortens=True``: the optimistic variant, in which PLP clears the pool at its first step
    (step R_t + 1), so L-mIMP trains R_t + 2 rounds at most.

    ``cost(density)``: the cost of one training iteration when the pruned layers keep ``density``
    of their weights (round 0: 1.0; after step s: N/M plus the pool left). None: every iteration
    costs the same, the ratio of iterations. From a compile result's FLOP model::

        cost = lambda d: result.flops.train_step(dict.fromkeys(result.flops.sites, d))

    ``total_weights``: the pruned layers' weight count, to follow the run's integer schedule
    exactly (None: the continuous recurrence, which can end a round sooner or later).

    >>> b = lmimp_flops_bound(LMIMPConfig(iterations_per_round=100), "2:4")
    >>> len(b.mimp_iterations), b.lmimp_iterations[:4], round(b.ratio, 2)
    (19, (100, 95, 10, 10), 4.02)
    """
    if isinstance(pattern, str):
        pattern = NMPattern.parse(pattern)
    pools = mimp_pool_schedule(
        pattern, config.prune_rate, config.epsilon, total_weights=total_weights
    )
    if pools is None:
        raise ConfigError(
            f"LMIMPConfig: prune_rate {config.prune_rate} needs more than 10,000 pruning steps "
            "to clear the pool; no bound to compute"
        )
    steps = len(pools)
    kept = pattern.n / pattern.m
    density = [1.0, *(kept + q for q in pools)]
    full = [config.iterations_per_round, *[config.iterations_per_round - config.rewind_at] * steps]
    lm_steps = steps
    if plp_shortens and config.plp_start_round + 1 < steps:
        lm_steps = config.plp_start_round + 1
    lm_density = [*density[:lm_steps], kept]
    first_can_fire = not config.eb_reset_last and not (
        config.eb_distance == "pool" and config.beta <= config.prune_rate
    )
    earliest = config.eb_every * (1 if first_can_fire else 2)
    stops = tuple(
        earliest if config.eb_first_round <= r < lm_steps and earliest < full[r] else None
        for r in range(lm_steps + 1)
    )
    lm_iters = tuple(full[r] if stop is None else stop for r, stop in enumerate(stops))
    price = cost if cost is not None else (lambda d: 1.0)
    return FlopsBound(
        mimp_iterations=tuple(full),
        lmimp_iterations=lm_iters,
        lmimp_stops=stops,
        mimp_cost=float(sum(i * price(d) for i, d in zip(full, density, strict=True))),
        lmimp_cost=float(sum(i * price(d) for i, d in zip(lm_iters, lm_density, strict=True))),
    )


class _MIMP(RoundMethod):
    def __init__(self, config: MIMPConfig, *, plp: bool, early_bird: bool) -> None:
        self.config = config
        self.plp = plp
        self.early_bird = early_bird
        self.cleared = False
        self.plp_candidates: list[torch.Tensor] = []  # packed, per pruning step (diagnostic)
        self._eb_log: dict[str, Any] | None = None  # the early-bird checks of the round training

    def _plp_active(self, engine: RoundEngine) -> bool:
        # Alg. 2 applies PLP when r > R_t, r counting pruning steps from 1.
        return self.plp and engine.round + 1 > self.config.plp_start_round

    def propose(self, engine):
        cfg = self.config
        pattern = engine.session.pattern
        masks, weights = engine.masks(), engine.weights()
        axis = {s.param: s.group_axis for s in engine.session.sites}
        winners, pool, scores = {}, {}, {}
        for p, w in weights.items():
            mag = w.abs()
            scores[p] = mag
            ranked = torch.where(masks[p], mag, torch.full_like(mag, float("-inf")))
            winners[p] = nm_mask(ranked, pattern, axis=axis[p]) & masks[p]
            pool[p] = masks[p] & ~winners[p]
        pool_before = sum(int(x.sum()) for x in pool.values())
        keep = global_unstructured(scores, cfg.prune_rate, eligible=pool)
        pool = {p: pool[p] & keep[p] for p in pool}
        after_ltp = sum(int(x.sum()) for x in pool.values())
        candidates = {}
        if self.plp or (cfg.plp_diagnostics and not self.plp):
            for p, w in weights.items():
                v = plp_scores(w, masks[p], pattern.m, cfg.plp_norm, axis[p])
                candidates[p] = pool[p] & (v <= cfg.alpha)
        plp_pruned = 0
        if self._plp_active(engine):
            plp_pruned = sum(int(c.sum()) for c in candidates.values())
            pool = {p: pool[p] & ~candidates[p] for p in pool}
        remaining = sum(int(x.sum()) for x in pool.values())
        cleared = remaining <= cfg.epsilon * engine.total_weights
        new = {
            p: winners[p] | (pool[p] if not cleared else torch.zeros_like(pool[p])) for p in winners
        }
        info = {
            "pool_before": pool_before / engine.total_weights,
            "ltp_pruned": pool_before - after_ltp,
            "plp_pruned": plp_pruned,
            **({"plp_fraction": plp_pruned / after_ltp if after_ltp else 0.0} if self.plp else {}),
            "pool_after": 0.0 if cleared else remaining / engine.total_weights,
            "pool_cleared": cleared,
        }
        if cfg.plp_diagnostics and not self.plp:
            # the step that clears the pool removes every candidate: nothing to mispredict
            info["_plp_candidates"] = (
                {p: torch.zeros_like(c) for p, c in candidates.items()} if cleared else candidates
            )
        return new, info

    def accept(self, engine, masks, info):
        self.cleared = bool(info["pool_cleared"])
        cands = info.pop("_plp_candidates", None)
        if cands is not None:
            self.plp_candidates.append(pack_masks(cands))

    def done(self, engine):
        return self.cleared

    def rounds_needed(self, engine):
        # mIMP's pool recurrence (LTP only; PLP can only end the schedule sooner)
        pools = mimp_pool_schedule(
            engine.session.pattern,
            self.config.prune_rate,
            self.config.epsilon,
            total_weights=engine.total_weights,
        )
        return None if pools is None else len(pools) + 1

    def step_hook(self, engine, round_index):
        cfg = self.config
        self._eb_log = None
        if not self.early_bird or self.cleared:  # the final ticket trains its full round
            return None
        assert isinstance(cfg, LMIMPConfig)
        if round_index < cfg.eb_first_round:
            return None
        interval = cfg.eb_every
        # Alg. 2's B_last when the round starts: the mask the last pruning step applied (the
        # module docstring says why), or nothing when every round starts afresh
        last = None if cfg.eb_reset_last else {p: m.clone() for p, m in engine.masks().items()}
        log: dict[str, Any] = {"checks": [], "stop_iteration": None}
        self._eb_log = log

        def hook(info: StepInfo) -> bool:
            nonlocal last
            if info.iteration % interval:
                return False
            with torch.no_grad():
                candidate, facts = self.propose(engine)
            distance = None
            if last is not None:
                pool = round(facts["pool_before"] * engine.total_weights)
                distance = early_bird_distance(candidate, last, cfg.eb_distance, pool=pool)
            log["checks"].append([info.iteration, distance])
            last = candidate
            if distance is not None and distance < cfg.beta:
                log["stop_iteration"] = info.iteration
                return True
            return False

        return hook

    def round_report(self, engine, round_index):
        if not self.early_bird:
            return {}
        log, self._eb_log = self._eb_log, None
        if log is None:  # a round without checks
            return {"eb_checks": [], "eb_stop_iteration": None}
        return {"eb_checks": log["checks"], "eb_stop_iteration": log["stop_iteration"]}

    def _early_bird_summary(self, engine: RoundEngine) -> dict[str, Any]:
        cfg = self.config
        assert isinstance(cfg, LMIMPConfig)
        session = engine.session
        sites = [s.param for s in session.sites]

        def cost(density: float) -> float:
            return session.flops.train_step(dict.fromkeys(sites, density))

        bounds = {}
        for key, shortens in (("flops_bound", False), ("flops_bound_plp", True)):
            try:
                bound = lmimp_flops_bound(
                    cfg,
                    session.pattern,
                    total_weights=engine.total_weights,
                    plp_shortens=shortens,
                    cost=cost,
                )
                bounds[key] = bound.ratio
            except ConfigError:  # a schedule longer than the recurrence follows
                bounds[key] = None
        return {
            "distance": cfg.eb_distance,
            "beta": cfg.beta,
            "interval": cfg.eb_every,
            "start_round": cfg.eb_first_round,
            "reset_last": cfg.eb_reset_last,
            "rounds": [
                {
                    "round": h["round"],
                    "checks": h.get("eb_checks", []),
                    "stop_iteration": h.get("eb_stop_iteration"),
                    "plp_fraction": h.get("plp_fraction"),
                }
                for h in session.history
            ],
            **bounds,
        }

    def finish(self, engine):
        out: dict[str, Any] = {}
        if self.early_bird:
            out["early_bird"] = self._early_bird_summary(engine)
        if not self.plp_candidates:
            return out
        final = pack_masks(engine.masks()).numpy()
        rates = []
        for packed in self.plp_candidates:
            c = packed.numpy()
            n = _popcount(c)
            rates.append(None if n == 0 else _popcount(c & final) / n)
        return {**out, "plp_misprediction": rates, "plp_alpha": self.config.alpha}

    def state_dict(self):
        return {"cleared": self.cleared, "plp_candidates": list(self.plp_candidates)}

    def load_state_dict(self, state):
        self.cleared = bool(state["cleared"])
        self.plp_candidates = list(state["plp_candidates"])


def _require_pattern(session: Session, name: str) -> None:
    if session.pattern is None:  # registry marks these structured, so compile always passes one
        raise ConfigError(f"{name} needs an N:M pattern")


for _name, _cls, _summary in (
    ("mimp", MIMPConfig, "masked IMP: N:M lottery tickets via a global losing-ticket pool"),
    ("mimp-high", MIMPHighConfig, "mIMP pruning 40% of the pool per round"),
    ("mimp-rand", MIMPRandConfig, "mIMP with random re-initialisation instead of rewinding"),
):

    def _run(session: Session, config: MIMPConfig, _n: str = _name) -> None:
        _require_pattern(session, _n)
        RoundEngine(session, config, _MIMP(config, plp=False, early_bird=False)).run()

    register_method(_name, _cls, structured=True, summary=_summary)(_run)


@register_method(
    "lmimp",
    LMIMPConfig,
    structured=True,
    summary="L-mIMP: mIMP + proactive local pruning + early-bird rounds",
)
def run_lmimp(session: Session, config: LMIMPConfig) -> None:
    _require_pattern(session, "lmimp")
    RoundEngine(session, config, _MIMP(config, plp=True, early_bird=True)).run()


# -- EB ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class EBConfig(CheckpointedConfig):
    """Early-bird N:M: ``iterations_per_round`` is the dense budget (cut short by the detector),
    ``finetune_iterations`` (None: one more round) the training of the drawn ticket."""

    iterations_per_round: int = 1000
    eb_interval: int | None = None
    eb_queue: int = 5
    eb_threshold: float = 0.1
    finetune_iterations: int | None = None

    def validate(self) -> None:
        check_int(self, "iterations_per_round", 1)
        if self.eb_interval is not None:
            check_int(self, "eb_interval", 1, self.iterations_per_round)
        check_int(self, "eb_queue", 2)
        check_float(self, "eb_threshold", 0.0, 1.0, lo_open=True)
        if self.finetune_iterations is not None:
            check_int(self, "finetune_iterations", 0)


@register_method(
    "eb",
    EBConfig,
    structured=True,
    summary="early-bird ticket: N:M drawn early in dense training, then trained",
)
def run_eb(session: Session, config: EBConfig) -> None:
    _require_pattern(session, "eb")
    pattern = session.pattern
    interval = config.eb_interval or max(1, config.iterations_per_round // 20)
    queue: deque[dict[str, torch.Tensor]] = deque(maxlen=config.eb_queue)
    found: dict[str, Any] = {"iteration": None}

    def current_masks() -> dict[str, torch.Tensor]:
        return {
            s.param: pattern.mask(session.weight(s).detach(), s.group_axis, transform=torch.abs)
            for s in session.sites
        }

    def hook(info: StepInfo) -> bool:
        if info.iteration % interval:
            return False
        with torch.no_grad():
            queue.append(current_masks())
        if (
            len(queue) == queue.maxlen
            and max(mask_distance(queue[-1], old) for old in list(queue)[:-1]) < config.eb_threshold
        ):
            found["iteration"] = info.iteration
            return True
        return False

    def load_state(saved: dict[str, Any]) -> None:
        queue.clear()
        queue.extend(saved["queue"])
        found.update(saved["found"])

    session.track("eb", Tracked(lambda: {"queue": list(queue), "found": dict(found)}, load_state))
    steps = session.train(config.iterations_per_round, hook)
    session.end_round(
        phase="dense", early_bird_iteration=found["iteration"], round_iterations=steps
    )
    with torch.no_grad():
        masks = current_masks()
        for site in session.sites:
            session.set_mask(site, masks[site.param])
    finetune = config.finetune_iterations
    steps = session.train(config.iterations_per_round if finetune is None else finetune)
    session.end_round(phase="pruned", round_iterations=steps)
