"""Learned N:M masks: LBC ("Learning best combination for efficient N:M sparsity") and the
straight-through baselines SR-STE and STE.

**LBC** (Alg. 1, Eqs. 5-10). Every group of M weights along the input channels has C = C(M, N)
candidate subsets of N weights, listed once in a fixed binary matrix ``combos [C, M]``. A learnable
score matrix ``S [groups, C]`` rates them, initialised so each weight's summed score is 1
(``1 / C(M-1, N-1)``, NOTES). The mask keeps every weight that belongs to a surviving candidate,
``B = 1[alive @ combos > 0]``, computed as the hard value with a straight-through gradient to
``S`` (Eq. 9): ``dL/dS_gj = sum_{i in j} dL/dB_gi``. (Eq. 8 writes ``(alive * S) @ combos != 0``,
which drops a weight whose surviving candidates' scores happen to cancel, e.g. +s and -s; the
candidate set, not the score values, decides membership here.) Candidates are removed before the
forward of the iteration they belong to, as in Algorithm 1. Between ``t_i`` and ``t_f``
(``removal_window``, fractions of training) the lowest-scored candidates go, leaving per group

    alive(t) = 1 + ceil((C - 1) * (1 - (t - t_i) / (t_f - t_i))^3)

(the cubic schedule of Eq. 6, as NOTES writes it), stepped once per epoch as the paper does
(``removal_interval``, iterations; t is the start of the step); once one candidate is left its
scores are frozen, and the mask is exactly N:M. Memory: ``groups x C`` scores, e.g. 28 per group for 2:8.

**SR-STE** recomputes the magnitude N:M mask every forward and, backward, passes the gradient
straight through to all weights plus ``lambda * (1 - mask) * W`` (lambda 2e-4); **STE** is the same
with lambda 0.

*Training FLOPs.* The counter charges what the computation needs: SR-STE / STE a sparse forward,
a sparse activation gradient and a dense weight gradient (``2 zeta_P + zeta_D`` per sample); LBC
``3 zeta_U`` at the density ``U`` of its surviving candidates' union (the score gradient of Eq. 9
needs the weight gradient only where ``B = 1``): dense at the start, N:M once one candidate is
left. The paper's Table 1 counts differently: SR-STE ``zeta_P + 2 zeta_D`` ("dense backward",
0.83x at 2:4) and LBC ``2 zeta_P + zeta_D`` throughout (0.70x at 2:4, 0.38x at 1:16). Both are in
``diagnostics``: ``flops_counter_per_sample`` and ``flops_table1_per_sample``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import nn

from .._config import CheckpointedConfig, check_float, check_int
from .._errors import ConfigError
from .._pattern import NMPattern, group_view
from .._registry import register_method
from .._session import Session, Tracked
from .._trainer import StepInfo

__all__ = [
    "LBCConfig",
    "LBCMasker",
    "SRSTEConfig",
    "SRSTEMasker",
    "STEConfig",
    "alive_count",
    "combinations",
]


def combinations(n: int, m: int) -> torch.Tensor:
    """All C(m, n) ways to keep n of m, as a bool matrix [C, m] (lexicographic order)."""
    rows = []
    for keep in itertools.combinations(range(m), n):
        row = [False] * m
        for i in keep:
            row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def alive_count(t: float, t_i: float, t_f: float, c: int) -> int:
    """Candidates left per group at iteration ``t`` (cubic schedule)."""
    if t <= t_i:
        return c
    if t >= t_f:
        return 1
    p = (t - t_i) / (t_f - t_i)
    return 1 + math.ceil((c - 1) * (1.0 - p) ** 3 - 1e-9)


def _to_groups(t: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """[..., C_in, ...] -> [groups, m] with groups of m consecutive input channels (along the
    site's reduction ``axis``)."""
    return group_view(t, m, axis).permute(0, 1, 3, 2).reshape(-1, m)


def _from_groups(g: torch.Tensor, like: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    view = group_view(like, m, axis)
    pre, groups, _, post = view.shape
    return g.reshape(pre, groups, post, m).permute(0, 1, 3, 2).reshape(like.shape)


class LBCMasker(nn.Module):
    """Score matrix, candidate list and surviving candidates of one weight."""

    def __init__(self, weight: torch.Tensor, pattern: NMPattern, axis: int = 1) -> None:
        super().__init__()
        self.n, self.m, self.axis = pattern.n, pattern.m, axis
        combos = combinations(pattern.n, pattern.m)
        groups = weight.numel() // pattern.m
        init = 1.0 / math.comb(pattern.m - 1, pattern.n - 1)
        self.register_buffer("combos", combos.to(weight.device), persistent=False)
        self.scores = nn.Parameter(torch.full((groups, len(combos)), init, device=weight.device))
        self.register_buffer(
            "alive", torch.ones(groups, len(combos), dtype=torch.bool, device=weight.device)
        )

    def _hard(self) -> torch.Tensor:
        return (self.alive.to(torch.float32) @ self.combos.to(torch.float32)) > 0

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        return _from_groups(self._hard(), weight, self.m, self.axis)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        combos = self.combos.to(self.scores.dtype)
        soft = (self.scores * self.alive) @ combos
        hard = self._hard().to(soft.dtype)
        b = hard + soft - soft.detach()  # value: the hard mask; gradient: to the scores (Eq. 9)
        return weight * _from_groups(b, weight, self.m, self.axis).to(weight.dtype)

    @torch.no_grad()
    def keep(self, count: int) -> None:
        """Keep the ``count`` highest-scored surviving candidates of every group."""
        if count >= int(self.alive.sum(1).max()):
            return
        s = self.scores.masked_fill(~self.alive, float("-inf"))
        idx = s.topk(count, dim=1).indices
        self.alive.copy_(torch.zeros_like(self.alive).scatter_(1, idx, True) & self.alive)
        if count == 1:
            self.scores.requires_grad_(False)  # the best candidate is chosen: stop learning


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask, lam):
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        out = grad if ctx.lam == 0 else grad + ctx.lam * (~mask) * weight
        return out, None, None


class SRSTEMasker(nn.Module):
    """Magnitude N:M mask every forward; straight-through (sparse-refined) backward."""

    def __init__(self, pattern: NMPattern, lam: float, axis: int = 1) -> None:
        super().__init__()
        self.pattern, self.lam, self.axis = pattern, lam, axis

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.pattern.mask(weight.detach(), self.axis, transform=torch.abs)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _STE.apply(weight, self.mask(weight), self.lam)


# -- configs and methods ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class LBCConfig(CheckpointedConfig):
    """LBC: ``total_iterations`` of training; candidates removed over ``removal_window`` (fractions
    of training; the paper uses (0, 1/2)). ``removal_interval``: iterations between removal steps
    of Eq. 6; None: one epoch of the trainer's ``train_loader`` (the paper steps per epoch, so
    the first removal comes after an epoch of training), or every iteration when the loader has
    no length."""

    total_iterations: int = 3000
    removal_window: tuple[float, float] = (0.0, 0.5)
    removal_interval: int | None = None

    def validate(self) -> None:
        check_int(self, "total_iterations", 1)
        if self.removal_interval is not None:
            check_int(self, "removal_interval", 1)
        w = self.removal_window
        ok = (
            isinstance(w, (tuple, list))
            and len(w) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            and 0.0 <= w[0] < w[1] <= 1.0
        )
        if not ok:
            raise ConfigError(
                f"LBCConfig.removal_window must be (t_i, t_f) with 0 <= t_i < t_f <= 1, got {w!r}"
            )
        object.__setattr__(self, "removal_window", (float(w[0]), float(w[1])))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRSTEConfig(CheckpointedConfig):
    """SR-STE: ``total_iterations`` of training with the refined STE (``lam``, 2e-4)."""

    total_iterations: int = 3000
    lam: float = 2e-4

    def validate(self) -> None:
        check_int(self, "total_iterations", 1)
        check_float(self, "lam", 0.0, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class STEConfig(CheckpointedConfig):
    """STE: magnitude N:M every forward, plain straight-through gradient."""

    total_iterations: int = 3000

    def validate(self) -> None:
        check_int(self, "total_iterations", 1)


def _maskers(session: Session) -> list[tuple[object, nn.Module]]:
    return [(s, session.gm.get_submodule(s.masker_target)) for s in session.sites]


def _flops_diagnostics(session: Session, table1: str) -> dict[str, float]:
    """The counter's FLOPs per sample next to the paper's Table 1 convention for the method:
    ``"sr-ste"``: zeta_P + 2 zeta_D; ``"lbc"``: 2 zeta_P + zeta_D (zeta_P at N:M density)."""
    zeta_d = session.flops.dense
    zeta_p = session.flops.forward({s.param: session.pattern.density for s in session.sites})
    per = zeta_p + 2 * zeta_d if table1 == "sr-ste" else 2 * zeta_p + zeta_d
    samples = max(1, session._samples_seen)
    return {
        "flops_counter_per_sample": session.train_flops / samples,
        "flops_table1_per_sample": per,
        "flops_dense_per_sample": 3 * zeta_d,
    }


@register_method(
    "lbc",
    LBCConfig,
    structured=True,
    masker=lambda config, pattern: lambda site, weight: LBCMasker(weight, pattern, site.group_axis),
    summary="learned best N:M combination per group (score matrix, cubic removal)",
)
def run_lbc(session: Session, config: LBCConfig) -> None:
    maskers = _maskers(session)
    c = math.comb(session.pattern.m, session.pattern.n)
    t_i, t_f = (f * config.total_iterations for f in config.removal_window)
    counts: list[int] = []  # candidates alive in the forward of each iteration
    state = {"alive": c}

    interval = config.removal_interval
    if interval is None:
        try:
            interval = max(1, len(session.trainer.train_loader))  # one epoch
        except (AttributeError, TypeError):
            interval = 1  # a loader without a length: Eq. 6 stepped every iteration

    def remove_for(iteration: int) -> None:
        # Eq. 6 evaluated at the start of the removal step (epoch) the iteration falls in
        t = iteration if interval == 1 else ((iteration - 1) // interval) * interval
        target = alive_count(t, t_i, t_f, c)
        if target < state["alive"]:
            for _, masker in maskers:
                masker.keep(target)
            state["alive"] = target
            session.refresh_densities()

    def on_step(info: StepInfo) -> None:
        counts.append(state["alive"])
        remove_for(info.iteration + 1)  # before the next forward, as Algorithm 1 removes

    def load_state(saved: dict) -> None:
        state.update(saved["state"])
        counts[:] = saved["counts"]

    # the scores and surviving candidates are the maskers' own parameters and buffers
    session.track(
        "lbc", Tracked(lambda: {"state": dict(state), "counts": list(counts)}, load_state)
    )
    remove_for(1)
    session.train(config.total_iterations, on_step)
    if state["alive"] > 1:  # training ended inside the window: choose now
        for _, masker in maskers:
            masker.keep(1)
        session.refresh_densities()
    session.diagnostics["alive_per_step"] = counts
    session.diagnostics["removal_interval"] = interval
    session.diagnostics.update(_flops_diagnostics(session, "lbc"))
    session.end_round(phase="learned")


@register_method(
    "sr-ste",
    SRSTEConfig,
    structured=True,
    masker=lambda config, pattern: (
        lambda site, weight: SRSTEMasker(pattern, config.lam, site.group_axis)
    ),
    summary="SR-STE: magnitude N:M each forward, refined straight-through backward",
)
def run_sr_ste(session: Session, config: SRSTEConfig) -> None:
    session.train(config.total_iterations, dense_weight_grad=True)
    session.diagnostics.update(_flops_diagnostics(session, "sr-ste"))
    session.end_round(phase="learned")


@register_method(
    "ste",
    STEConfig,
    structured=True,
    masker=lambda config, pattern: lambda site, weight: SRSTEMasker(pattern, 0.0, site.group_axis),
    summary="STE: magnitude N:M each forward, straight-through backward",
)
def run_ste(session: Session, config: STEConfig) -> None:
    session.train(config.total_iterations, dense_weight_grad=True)
    session.diagnostics.update(_flops_diagnostics(session, "sr-ste"))
    session.end_round(phase="learned")
