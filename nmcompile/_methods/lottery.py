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

*Early bird.* From training round ``eb_start_round`` on (default R_t, as in A.3), every
``eb_interval`` iterations the mask the next pruning step would produce is computed from the
current weights; when its average per-layer Hamming distance to the previous one is below
``beta`` the round stops early. The previous mask starts afresh every round, so a round trains
at least ``2 * eb_interval`` iterations. Algorithm 2 never resets ``B_last``: its first check of
a round compares with the last candidate of the round before, the mask the pruning step just
applied, from which the new candidate differs only by that step's prune; with beta = 0.1 that
stops nearly every round at its first check, before the rewound weights trained at all.

``eb`` — the early-bird baseline (You et al. 2020) for N:M: dense training, checking the N:M
magnitude mask every ``eb_interval`` iterations; once the last ``eb_queue`` masks all lie within
``eb_threshold`` of the newest, training stops, the ticket is drawn (one-shot N:M) and trained for
one more round from the early-bird weights.

Diagnostics (``CompileResult.diagnostics``): ``mask_hamming``, the pairwise Hamming distances
between the masks of all pruning steps (Fig. 3), and for ``mimp`` ``plp_misprediction``: per
pruning step, the fraction of the weights PLP would have removed that mIMP kept to the end (Fig. 4).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import torch

from .._config import MethodConfig, check_float, check_int
from .._errors import ConfigError
from .._pattern import group_view, nm_mask
from .._registry import register_method
from .._rounds import (
    IterativeConfig,
    RoundEngine,
    RoundMethod,
    _popcount,
    mask_distance,
    pack_masks,
)
from .._session import Session
from .._shaping import global_unstructured
from .._trainer import StepInfo

__all__ = [
    "EBConfig",
    "IMPConfig",
    "LMIMPConfig",
    "MIMPConfig",
    "MIMPHighConfig",
    "MIMPRandConfig",
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMIMPConfig(MIMPConfig):
    """L-mIMP: mIMP + PLP (``alpha``, ``plp_norm``, from ``plp_start_round``) + early-bird
    detection (``beta`` on the mask distance, every ``eb_interval`` iterations, None: 10% of a
    round, from training round ``eb_start_round``, None: ``plp_start_round``). Defaults from the
    paper's A.3: epsilon 0.01, p 20%, R_t 2, alpha -0.1, beta 0.1."""

    beta: float = 0.1
    plp_start_round: int = 2
    eb_interval: int | None = None
    eb_start_round: int | None = None
    plp_diagnostics: bool = False

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


class _MIMP(RoundMethod):
    def __init__(self, config: MIMPConfig, *, plp: bool, early_bird: bool) -> None:
        self.config = config
        self.plp = plp
        self.early_bird = early_bird
        self.cleared = False
        self.plp_candidates: list[torch.Tensor] = []  # packed, per pruning step (diagnostic)

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
        # mIMP's pool recurrence (LTP only; PLP can only end the schedule sooner). Every group
        # keeps its N winners, so the pool starts at (1 - N/M) of the weights.
        pattern = engine.session.pattern
        total = engine.total_weights
        pool = total - total // pattern.m * pattern.n
        rounds = 1
        while True:
            pool -= round(self.config.prune_rate * pool)
            rounds += 1
            if pool <= self.config.epsilon * total:
                return rounds
            if rounds > 10_000:
                return None

    def step_hook(self, engine, round_index):
        cfg = self.config
        if not self.early_bird or self.cleared:  # the final ticket trains its full round
            return None
        start = cfg.eb_start_round if cfg.eb_start_round is not None else cfg.plp_start_round
        if round_index < start:
            return None
        interval = cfg.eb_interval or max(1, cfg.iterations_per_round // 10)
        last: dict[str, torch.Tensor] | None = None

        def hook(info: StepInfo) -> bool:
            nonlocal last
            if info.iteration % interval:
                return False
            with torch.no_grad():
                candidate, _ = self.propose(engine)
            stop = last is not None and mask_distance(candidate, last) < cfg.beta
            last = candidate
            return stop

        return hook

    def finish(self, engine):
        if not self.plp_candidates:
            return {}
        final = pack_masks(engine.masks()).numpy()
        rates = []
        for packed in self.plp_candidates:
            c = packed.numpy()
            n = _popcount(c)
            rates.append(None if n == 0 else _popcount(c & final) / n)
        return {"plp_misprediction": rates, "plp_alpha": self.config.alpha}

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
class EBConfig(MethodConfig):
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
