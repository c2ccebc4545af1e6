"""Exploit / explore prune-grow (IEE, "Advancing weight and channel sparsification with enhanced
saliency", Alg. 1) and the dynamic / static sparse-training baselines RigL, SET and static.

All train one run of ``total_iterations`` from a sparse start at the budget (uniform or ERK layer
densities, or exactly N of every M). IEE repeats, every ``H + J + Q`` iterations until 3/4 of
training, the step

1. *importance estimation*: train the active weights Theta_K for H iterations;
2. *prune*: move the ``Omega_t`` least important active weights of each layer to the exploration
   space Theta_P;
3. *accuracy improvement*: train the (smaller) Theta_K for J iterations;
4. *reactivate & explore*: turn every weight of Theta_P on, with its most recently used (MRU)
   value (zero for a weight never active, ``never_used_init``), and train them for Q iterations
   with Theta_K frozen (a dense forward, sparse updates);
5. *grow*: move the ``Omega_t`` most important weights of Theta_P back into Theta_K.

Inactive weights keep their values exactly while off (restored after every optimizer step, so
weight decay and momentum cannot drift them), which is what MRU initialisation needs. During
exploration Theta_K is frozen: its pruned-layer weights, and every other parameter and buffer of
the model (biases, BatchNorm affine parameters and running statistics, the dense stem and
classifier), are restored after every step, and their gradients are zeroed before the optimizer
sees them (``GradGate``: restoring values alone would leave the exploration gradients in SGD's
momentum, to be applied to Theta_K after the grow), so only Theta_P trains. ``Omega_t`` starts
at 0.3 of the active weights and decays (cosine by default; the exponential schedule of the
paper's reference [6] is available). The budget is the same before and after every step; with an N:M
pattern the ``Omega_t`` least important active weights are pruned wherever they are (a group
may lose several) and each group grows back exactly as many as it lost, so every group holds
exactly N after each step.

Importance (``importance``) is pluggable, the same criterion for prune and grow as the paper
requires: ``"magnitude"`` (|w|, the paper's unstructured setting) or ``"taylor"`` (first-order
Taylor |w * dL/dw|, summed over the H estimation iterations for pruning and the Q exploration
iterations for growing). RigL drops by magnitude and grows by the dense gradient (zero init);
SET grows at random (zero init); static never changes its random mask.

Training FLOPs are counted per step from the active structure (3 zeta_P), and what an
exploration step computes, ``2 zeta_D + zeta_{Theta_P}`` (dense forward and activation gradient;
see ``_iee.py``); the diagnostics give the same run under the appendix's ``2 zeta_P + zeta_D``
(``flops_appendix_per_sample``) and the paper's appendix formula
``3/4 ((H + J) 3 zeta_P + Q (2 zeta_P + zeta_D)) / (H + J + Q) + 1/4 * 3 zeta_P`` per sample.
Metrics (Fig. 5): IoU of the active structure between consecutive steps after prune and after
grow, and the survival rate of grown weights through the next prune.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._budgets import layer_densities
from .._errors import ConfigError
from .._pattern import NMPattern, group_view
from .._registry import register_method
from .._session import Session, Tracked
from .._trainer import StepInfo
from ._iee import (
    FrozenRest,
    GradGate,
    IEEConfig,
    Metrics,
    RigLConfig,
    SETConfig,
    StaticConfig,
    _SparseTrainingConfig,
    explore_flops,
    explore_flops_appendix,
    omega,
)

__all__ = ["IEEConfig", "RigLConfig", "SETConfig", "StaticConfig"]


# -- masks ---------------------------------------------------------------------------------------
class _Structure:
    """The active structure Theta_K (per-site bool masks) and its bookkeeping."""

    def __init__(self, session: Session, config: _SparseTrainingConfig) -> None:
        self.session = session
        self.config = config
        self.pattern: NMPattern | None = session.pattern if config.structured else None
        if config.structured and self.pattern is None:
            raise ConfigError(f"{config.name} without target_sparsity needs an N:M pattern")
        self.sites = session.sites
        self.gen = torch.Generator().manual_seed(config.seed)
        densities = (
            [self.pattern.density] * len(self.sites)
            if self.pattern
            else layer_densities(
                [s.shape for s in self.sites], config.target_sparsity, config.layer_budget
            )
        )
        self.density = {s.param: d for s, d in zip(self.sites, densities)}
        self.active = {s.param: self._random_mask(s) for s in self.sites}
        if getattr(config, "never_used_init", "zero") == "zero":
            # the sparse start is the initial weights times the mask: a weight never active has
            # no most-recently-used value, and exploration starts it from zero
            with torch.no_grad():
                for s in self.sites:
                    session.weight(s).masked_fill_(~self.active[s.param], 0.0)
        self.saved = {s.param: session.weight(s).detach().clone() for s in self.sites}
        self.apply(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "saved": self.saved, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active, self.saved = dict(state["active"]), dict(state["saved"])
        self.gen.set_state(state["gen"])

    def _random_mask(self, site) -> torch.Tensor:
        w = self.session.weight(site)
        scores = torch.rand(site.shape, generator=self.gen).to(w.device)
        if self.pattern is not None:
            return self.pattern.mask(scores, site.group_axis)
        k = round(self.density[site.param] * site.numel)
        flat = torch.zeros(site.numel, dtype=torch.bool, device=w.device)
        flat[scores.reshape(-1).topk(k).indices] = True
        return flat.reshape(site.shape)

    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        for s in self.sites:
            self.session.set_mask(s, masks[s.param])

    def follow_device(self) -> None:
        """Move the structure to the weights' device: the trainer moves the model (to CUDA)
        only when training starts, after the structure was built."""
        dev = self.session.weight(self.sites[0]).device
        if next(iter(self.active.values())).device != dev:
            self.active = {p: m.to(dev) for p, m in self.active.items()}
            self.saved = {p: v.to(dev) for p, v in self.saved.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return {s.param: self.session.weight(s) for s in self.sites}

    def save(self, which: dict[str, torch.Tensor]) -> None:
        """Remember the current values of the entries in ``which``."""
        with torch.no_grad():
            for p, w in self.weights().items():
                self.saved[p] = torch.where(which[p], w.detach(), self.saved[p])

    def restore(self, which: dict[str, torch.Tensor]) -> None:
        """Put back the remembered values of the entries in ``which``."""
        with torch.no_grad():
            for p, w in self.weights().items():
                w.copy_(torch.where(which[p], self.saved[p], w))

    def inactive(self) -> dict[str, torch.Tensor]:
        return {p: ~m for p, m in self.active.items()}

    def count(self) -> int:
        return sum(int(m.sum()) for m in self.active.values())

    # -- prune / grow, per layer (or per group for N:M) ------------------------------------------
    def prune(self, scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        """Deactivate the lowest-scored ``fraction`` of each layer's active weights (N:M too:
        wherever they are; ``grow`` refills each group to N). Returns what was pruned."""
        pruned = {}
        for s in self.sites:
            act, sc = self.active[s.param], scores[s.param].float()
            k = round(fraction * int(act.sum()))
            p_mask = torch.zeros_like(act)
            if k:
                flat = torch.where(act, sc, torch.full_like(sc, float("inf"))).reshape(-1)
                p_mask.view(-1)[flat.topk(k, largest=False).indices] = True
            pruned[s.param] = p_mask
            self.active[s.param] = act & ~p_mask
        return pruned

    def grow(
        self, scores: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Activate the highest-scored inactive weights: as many per layer as ``counts`` pruned
        (N:M: one in each group that lost one), keeping the budget."""
        grown = {}
        for s in self.sites:
            act, sc = self.active[s.param], scores[s.param].float()
            lost = counts[s.param]
            g_mask = torch.zeros_like(act)
            if self.pattern is not None:
                # each group grows back as many as it lost: its best inactive entries
                m, ax = self.pattern.m, s.group_axis
                need = group_view(lost, m, ax).sum(dim=2, keepdim=True)  # [pre, G, 1, post]
                cand = torch.where(
                    group_view(act, m, ax),
                    torch.full_like(group_view(sc, m, ax), float("-inf")),
                    group_view(sc, m, ax),
                )
                order = cand.argsort(dim=2, descending=True, stable=True)
                rank = torch.empty_like(order)
                rank.scatter_(2, order, torch.arange(m, device=order.device).view(1, 1, m, 1)
                              .expand_as(order))  # fmt: skip
                g_mask = (rank < need).reshape(act.shape)
            else:
                k = int(lost.sum())
                if k:
                    flat = torch.where(act, torch.full_like(sc, float("-inf")), sc).reshape(-1)
                    g_mask.view(-1)[flat.topk(k).indices] = True
            grown[s.param] = g_mask
            self.active[s.param] = act | g_mask
        return grown


class _Importance:
    """The criterion scores of every site's weights: |w| now, or |w * grad| summed over the
    steps since the last ``reset`` (first-order Taylor)."""

    def __init__(self, st: _Structure, criterion: str) -> None:
        self.st, self.criterion = st, criterion
        self.acc = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in st.weights().items()}

    def accumulate(self) -> None:
        if self.criterion != "taylor":
            return
        with torch.no_grad():
            for p, w in self.st.weights().items():
                if w.grad is not None:
                    if self.acc[p].device != w.device:
                        self.acc[p] = self.acc[p].to(w.device)
                    self.acc[p] += (w.detach() * w.grad).abs().float()

    def reset(self) -> None:
        for a in self.acc.values():
            a.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = dict(state["acc"])

    def scores(self) -> dict[str, torch.Tensor]:
        if self.criterion == "magnitude":
            return _magnitude(self.st)
        return {p: a.clone() for p, a in self.acc.items()}


def _magnitude(st: _Structure) -> dict[str, torch.Tensor]:
    return {p: w.detach().abs() for p, w in st.weights().items()}


# -- IEE -----------------------------------------------------------------------------------------
def run_iee_schedule(session: Session, config: IEEConfig, *, hooks: Callable | None = None) -> None:
    st = _Structure(session, config)
    rest = FrozenRest(session)
    gate = GradGate()
    importance = _Importance(st, config.criterion)
    h, j, q = config.update_period
    period = h + j + q
    steps = int(config.stop_fraction * config.total_iterations) // period
    metrics = Metrics()
    budget = st.count()
    flops_model = session.flops
    zeta_d = flops_model.dense
    state: dict[str, Any] = {"t": 0, "phase": "estimate", "pruned": None}
    log: list[dict[str, Any]] = []

    def densities(masks: dict[str, torch.Tensor]) -> dict[str, float]:
        return {p: float(m.float().mean()) for p, m in masks.items()}

    def zeta(masks: dict[str, torch.Tensor]) -> float:
        return flops_model.forward(densities(masks))

    zeta_budget = zeta(st.active)
    # the appendix convention, charged beside the counter: what the counter charges more per
    # sample of an exploration step, summed (so train_flops - extra = the appendix's count)
    appendix_gap = {"per_sample": 0.0, "total": 0.0}

    def save_state() -> dict[str, Any]:
        return {
            "state": dict(state),
            "log": list(log),
            "appendix_gap": dict(appendix_gap),
            "structure": st.state_dict(),
            "importance": importance.state_dict(),
            "metrics": metrics.state_dict(),
            "rest": rest.state_dict(),
        }

    def load_state(saved: dict[str, Any]) -> None:
        state.clear()
        state.update(saved["state"])
        log[:] = saved["log"]
        appendix_gap.update(saved["appendix_gap"])
        st.load_state_dict(saved["structure"])
        importance.load_state_dict(saved["importance"])
        metrics.load_state_dict(saved["metrics"])
        rest.load_state_dict(saved["rest"])
        if state["phase"] == "explore":  # Theta_K's gradients stay gated, as they were
            gate.close(session.gm, [(session.weight(x), ~st.active[x.param]) for x in st.sites])

    session.track("iee", Tracked(save_state, load_state))

    def on_step(info: StepInfo) -> None:
        i = info.iteration
        phase = state["phase"]
        st.follow_device()
        if phase in ("estimate", "explore") and state["t"] < steps:
            importance.accumulate()  # the windows the Taylor criterion sums over
        # keep what must not move: inactive weights (MRU values) or, exploring, Theta_K
        st.restore(st.active if phase == "explore" else st.inactive())
        if phase == "explore":
            rest.restore()
            appendix_gap["total"] += appendix_gap["per_sample"] * info.batch_size
        t = state["t"]
        if t >= steps:
            return
        pos = (i - 1) % period
        if pos == h - 1:  # end of importance estimation: prune
            frac = omega(config, t, steps)
            state["pruned"] = st.prune(importance.scores(), frac)
            st.save(st.inactive())
            st.apply(st.active)
            metrics.after_prune(st.active)
            state["phase"] = "improve"
            state["omega"] = frac
            state["zeta_pruned"] = zeta(st.active)
        elif pos == h + j - 1:  # reactivate & explore: everything on, Theta_K frozen
            st.save(st.active)
            rest.snapshot()
            gate.close(session.gm, [(session.weight(x), ~st.active[x.param]) for x in st.sites])
            st.apply({p: torch.ones_like(m) for p, m in st.active.items()})
            dens = densities(st.active)
            session.step_flops_override = explore_flops(flops_model, dens)
            appendix_gap["per_sample"] = session.step_flops_override - explore_flops_appendix(
                flops_model, dens
            )
            importance.reset()
            state["phase"] = "explore"
        elif pos == period - 1:  # grow, then back to estimation
            inactive = st.inactive()
            scores = {
                p: torch.where(inactive[p], s, torch.zeros_like(s))
                for p, s in importance.scores().items()
            }
            grown = st.grow(scores, state["pruned"])
            st.save(st.inactive())
            st.apply(st.active)
            rest.release()
            gate.open()
            importance.reset()
            session.step_flops_override = None
            metrics.after_grow(st.active, grown)
            log.append(
                {
                    "step": t,
                    "iteration": i,
                    "omega": state["omega"],
                    "moved": sum(int(g.sum()) for g in grown.values()),
                    "active": st.count(),
                    "zeta_pruned": state["zeta_pruned"],
                }
            )
            if st.count() != budget:
                raise AssertionError(f"IEE budget drifted: {st.count()} != {budget}")
            state["t"] = t + 1
            state["phase"] = "estimate"

    try:
        session.train(config.total_iterations, on_step)
    finally:
        gate.open()
    if state["phase"] != "estimate":  # training ended inside a step: settle on Theta_K
        st.restore(st.active if state["phase"] == "explore" else st.inactive())
        if state["phase"] == "explore":
            rest.restore()
        st.apply(st.active)
        session.step_flops_override = None
    # The appendix formula takes zeta_P constant; while Theta_K is pruned (J and Q iterations)
    # it is smaller, which the exact version below follows step by step.
    total = config.total_iterations
    paper = (
        config.stop_fraction * ((h + j) * 3 * zeta_budget + q * (2 * zeta_budget + zeta_d)) / period
        + (1 - config.stop_fraction) * 3 * zeta_budget
    )
    exact = sum(
        h * 3 * zeta_budget + j * 3 * s["zeta_pruned"] + q * (2 * s["zeta_pruned"] + zeta_d)
        for s in log
    )
    exact = (exact + (total - len(log) * period) * 3 * zeta_budget) / total
    samples = max(1, session._samples_seen)
    session.diagnostics.update(
        iee_steps=log,
        **metrics.to_json(),
        flops_paper_formula_per_sample=paper,
        flops_exact_formula_per_sample=exact,
        # the counter: exploration charged as computed (dense forward and activation gradient)
        flops_counter_per_sample=session.train_flops / samples,
        # the same run under the appendix's convention (exploration 2 zeta_P + zeta_D)
        flops_appendix_per_sample=(session.train_flops - appendix_gap["total"]) / samples,
        train_flops_appendix=session.train_flops - appendix_gap["total"],
    )
    session.end_round(phase="sparse training", update_steps=state["t"])


@register_method(
    "iee",
    IEEConfig,
    structured=lambda c: c.structured,
    shrink=True,
    kind="unstructured, N:M or channels",
    summary="exploit/explore prune-grow (IEE): weights, N:M, or channels to a latency budget",
)
def run_iee(session: Session, config: IEEConfig) -> None:
    if config.latency_budget is not None:
        from .channels import run_channel_iee

        run_channel_iee(session, config)
    else:
        run_iee_schedule(session, config)


# -- RigL / SET / static -------------------------------------------------------------------------
def _dense_gradient(session: Session, st: _Structure, batch_index: int) -> dict[str, torch.Tensor]:
    """dL/d(w * m) at the current sparse point, on one training batch."""
    gm = session.gm
    x, y = session.sample_batch(batch_index)
    weights = st.weights()
    keep = {p: w.detach().clone() for p, w in weights.items()}
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]  # BatchNorm statistics
    with torch.no_grad():
        for p, w in weights.items():
            w.mul_(st.active[p])
    st.apply({p: torch.ones_like(m) for p, m in st.active.items()})
    try:
        gm.zero_grad(set_to_none=True)
        out = gm(*x)
        loss = (
            torch.nn.functional.cross_entropy(out, y)
            if y is not None
            else out.float().pow(2).mean()
        )
        loss.backward()
        grads = {
            p: (w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w))
            for p, w in weights.items()
        }
    finally:
        gm.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, w in weights.items():
                w.copy_(keep[p])
            for b, v in buffers:  # scoring a batch must not move the running statistics
                b.copy_(v)
        st.apply(st.active)
    n = x[0].shape[0] if x and hasattr(x[0], "shape") else 1
    # RigL's accounting: a sparse forward and input gradient, and a dense weight gradient
    zeta_p = session.flops.forward({p: float(m.float().mean()) for p, m in st.active.items()})
    session.add_flops((2.0 * zeta_p + session.flops.dense) * n)
    return grads


def _run_drop_grow(session: Session, config: RigLConfig, grow_rule: str) -> None:
    st = _Structure(session, config)
    interval = config.update_interval
    steps = int(config.stop_fraction * config.total_iterations) // interval
    metrics = Metrics()
    budget = st.count()
    state = {"t": 0}
    updates: list[dict[str, float]] = []

    def load_state(saved: dict[str, Any]) -> None:
        state.update(saved["state"])
        updates[:] = saved["updates"]
        st.load_state_dict(saved["structure"])
        metrics.load_state_dict(saved["metrics"])

    session.track(
        config.name,
        Tracked(
            lambda: {
                "state": dict(state),
                "updates": list(updates),
                "structure": st.state_dict(),
                "metrics": metrics.state_dict(),
            },
            load_state,
        ),
    )

    def on_step(info: StepInfo) -> None:
        st.follow_device()
        st.restore(st.inactive())
        t = state["t"]
        if t >= steps or info.iteration % interval:
            return
        # RigL's f_decay(t) = alpha/2 (1 + cos(pi t / T_end)) at the update's own iteration: the
        # first update (t = Delta T) already moves less than alpha
        frac = omega(config, t + 1, steps)
        state["t"] = t + 1
        if frac <= 1e-12:
            return  # the update at T_end moves nothing: no prune, no grow, no survival sample
        pruned = st.prune(_magnitude(st), frac)
        metrics.after_prune(st.active)
        updates.append({"iteration": info.iteration, "fraction": frac})
        if grow_rule == "gradient":
            scores = {p: g.abs() for p, g in _dense_gradient(session, st, info.iteration).items()}
        else:
            scores = {
                p: torch.rand(m.shape, generator=st.gen).to(m.device) for p, m in st.active.items()
            }
        inactive = st.inactive()
        scores = {
            p: torch.where(inactive[p], s, torch.full_like(s, float("-inf")))
            for p, s in scores.items()
        }
        grown = st.grow(scores, pruned)
        with torch.no_grad():  # grown connections start from zero (RigL / SET)
            for p, w in st.weights().items():
                w.masked_fill_(grown[p], 0.0)
        st.save(st.inactive())
        st.apply(st.active)
        metrics.after_grow(st.active, grown)
        if st.count() != budget:
            raise AssertionError(f"{config.name} budget drifted: {st.count()} != {budget}")

    session.train(config.total_iterations, on_step)
    session.diagnostics.update(metrics.to_json(), updates=updates)
    session.end_round(phase="sparse training", update_steps=state["t"])


@register_method(
    "rigl",
    RigLConfig,
    structured=lambda c: c.structured,
    summary="RigL: drop by magnitude, grow by dense gradient",
)
def run_rigl(session: Session, config: RigLConfig) -> None:
    _run_drop_grow(session, config, "gradient")


@register_method(
    "set",
    SETConfig,
    structured=lambda c: c.structured,
    summary="SET: drop by magnitude, grow at random",
)
def run_set(session: Session, config: SETConfig) -> None:
    _run_drop_grow(session, config, "random")


@register_method(
    "static",
    StaticConfig,
    structured=lambda c: c.structured,
    summary="static sparse training: a fixed random mask at the budget",
)
def run_static(session: Session, config: StaticConfig) -> None:
    st = _Structure(session, config)
    session.track("static", st)

    def on_step(info: StepInfo) -> None:
        st.follow_device()
        st.restore(st.inactive())

    session.train(config.total_iterations, on_step)
    session.end_round(phase="sparse training")
