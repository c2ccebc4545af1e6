"""Latency-constrained channel sparsity: IEE over channels (HALP-style knapsack) and one-shot
Taylor channel pruning.

Channels are chosen per *channel space* (a layer's output channels with everything tied to them
by the channel graph: BatchNorm, depthwise convs, residual adds), so coupled layers are pruned
together. A space takes part when its channels can be removed: every layer reading it is a
pruned site (a channel is dead when its readers' columns are masked; ``shrink_channels`` then
deletes it, so ``CompileResult.module`` is really smaller).

Cost. ``LatencyLUT`` measures each space's producer layers on the target backend (ONNX Runtime
CPU or torch) at a grid of output-channel counts and caches the table on disk; a space's cost
with ``k`` channels is the sum over its producers, with their input channels at full size (HALP's
per-layer approximation). The budget ``latency_budget`` is a fraction of the full model's total.

Importance: first-order Taylor on BatchNorm, ``|g_gamma * gamma + g_beta * beta|`` summed over
the space's BatchNorms and accumulated over training steps (L1 of the producers' rows for a space
without BatchNorm). Selection: the multiple-choice knapsack of ``_knapsack``, channels kept in
importance order inside a space.

``iee`` with ``latency_budget`` runs the IEE step over channels: prune to ``budget - Omega_t`` by
knapsack over the active channels, improve, explore every inactive channel for Q iterations with
the active weights frozen, grow back to the budget by knapsack over the explored ones.
``channel-taylor`` is the one-shot baseline: train dense, rank once by Taylor, keep the knapsack
optimum at the budget, fine-tune.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .._config import MethodConfig, check_int
from .._errors import ConfigError
from .._knapsack import choose_channels
from .._registry import register_method
from .._session import Session
from .._trainer import StepInfo
from ..passes.channel_graph import ChannelSpace, layer_module
from .prune_grow import IEEConfig, _LatencyOptions, _Metrics, omega

__all__ = ["ChannelTaylorConfig"]


class ChannelProblem:
    """The prunable channel spaces of a session's model, their cost curves and importances."""

    def __init__(self, session: Session, config: Any) -> None:
        from ..runtime.latency_lut import LatencyLUT, LayerShape

        self.session = session
        gm = session.gm
        graph = session.channel_graph()
        sites = {s.name: s for s in session.sites}
        self.spaces: list[ChannelSpace] = [
            sp
            for sp in graph.spaces
            if sp.removable and sp.consumers and all(c.module in sites for c in sp.consumers)
        ]
        if not self.spaces:
            raise ConfigError(
                "no channel space can be pruned: every layer reading a channel must be a pruned "
                "site (try prune_classifier=True, or a model whose layers the channel graph "
                "understands)"
            )
        inputs: dict[str, tuple[int, ...]] = {}
        for node in gm.graph.nodes:
            layer = layer_module(gm, node)
            if layer is not None and node.args and isinstance(node.args[0], fx.Node):
                inputs[layer[0]] = tuple(node.args[0].meta.get("nm_shape", ()))
        device = str(next(gm.parameters()).device)
        lut = LatencyLUT(
            config.latency_cache,
            backend=config.latency_backend,
            device="cpu" if config.latency_backend == "ort" else device,
        )
        self.curves: list[np.ndarray] = []
        for sp in self.spaces:
            curve = np.zeros(sp.size + 1)
            for p in sp.producers:
                shape = LayerShape.of(gm.get_submodule(p), inputs[p])
                curve += lut.sweep(shape, sp.size, min(config.channel_step, sp.size))
            self.curves.append(curve)
        self.full_cost = float(sum(c[-1] for c in self.curves))
        self.sites = sites
        self.readers = {
            c.module: (i, c.factor) for i, sp in enumerate(self.spaces) for c in sp.consumers
        }
        self.writers = {p: i for i, sp in enumerate(self.spaces) for p in sp.producers}
        self.bns = [
            [
                gm.get_submodule(m)
                for m in sp.channelwise
                if isinstance(gm.get_submodule(m), nn.modules.batchnorm._BatchNorm)
            ]
            for sp in self.spaces
        ]
        self.taylor = [torch.zeros(sp.size) for sp in self.spaces]

    def cost(self, active: list[np.ndarray]) -> float:
        return float(sum(c[int(a.sum())] for c, a in zip(self.curves, active)))

    def accumulate(self) -> None:
        """Add this step's first-order Taylor score of every channel (BatchNorm gradients)."""
        for i, bns in enumerate(self.bns):
            for bn in bns:
                if bn.weight is None or bn.weight.grad is None:
                    continue
                score = bn.weight.grad * bn.weight
                if bn.bias is not None and bn.bias.grad is not None:
                    score = score + bn.bias.grad * bn.bias
                self.taylor[i] += score.detach().abs().float().cpu()

    def importance(self) -> list[np.ndarray]:
        out = []
        for i, sp in enumerate(self.spaces):
            t = self.taylor[i]
            if not self.bns[i] or float(t.sum()) == 0.0:  # no BatchNorm: L1 of producer rows
                t = torch.zeros(sp.size)
                for p in sp.producers:
                    w = self.session.gm.get_submodule(p).weight.detach().abs().float().cpu()
                    t += w.reshape(w.shape[0], -1).sum(1)
            out.append(t.numpy())
        return out

    def reset(self) -> None:
        self.taylor = [torch.zeros(sp.size) for sp in self.spaces]

    def weight_masks(self, active: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Per-site masks: rows of inactive channels and readers' columns of them off."""
        masks = {}
        for name, site in self.sites.items():
            w = self.session.weight(site)
            m = torch.ones(site.shape, dtype=torch.bool, device=w.device)
            if name in self.writers:
                rows = torch.from_numpy(active[self.writers[name]]).to(w.device)
                m &= rows.reshape(-1, *([1] * (m.dim() - 1)))
            if name in self.readers:
                i, factor = self.readers[name]
                cols = torch.from_numpy(np.repeat(active[i], factor)).to(w.device)
                m &= cols.reshape([1, -1] + [1] * (m.dim() - 2))
            masks[site.param] = m
        return masks

    def select(
        self,
        budget: float,
        importance: list[np.ndarray],
        allowed: list[np.ndarray] | None = None,
        base: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Keep-masks within ``budget``: the knapsack over ``allowed`` channels on top of
        ``base`` (always kept)."""
        n = len(self.spaces)
        allowed = allowed or [np.ones(sp.size, bool) for sp in self.spaces]
        base = base or [np.zeros(sp.size, bool) for sp in self.spaces]
        imps, curves = [], []
        for i in range(n):
            cand = allowed[i] & ~base[i]
            k0 = int(base[i].sum())
            imps.append(np.where(cand, importance[i], -np.inf)[cand])
            curves.append(self.curves[i][k0 : k0 + int(cand.sum()) + 1] - self.curves[i][k0])
        extra = budget - self.cost(base)
        picks = choose_channels(
            imps, curves, max(extra, 1e-9), minimum=0 if any(b.any() for b in base) else 1
        )
        if picks is None:
            return [b.copy() for b in base]
        out = []
        for i in range(n):
            keep = base[i].copy()
            idx = np.flatnonzero(allowed[i] & ~base[i])
            keep[idx[picks[i]]] = True
            if not keep.any():
                keep[int(np.argmax(importance[i]))] = True
            out.append(keep)
        return out


def run_channel_iee(session: Session, config: IEEConfig) -> None:
    prob = ChannelProblem(session, config)
    psi = config.latency_budget * prob.full_cost
    active = prob.select(psi, prob.importance())
    h, j, q = config.update_period
    period = h + j + q
    steps = int(config.stop_fraction * config.total_iterations) // period
    metrics = _Metrics()
    saved = {s.param: session.weight(s).detach().clone() for s in session.sites}
    state: dict[str, Any] = {"t": 0, "phase": "estimate", "active": active}
    log: list[dict[str, Any]] = []

    def apply(chan: list[np.ndarray]) -> dict[str, torch.Tensor]:
        masks = prob.weight_masks(chan)
        for s in session.sites:
            session.set_mask(s, masks[s.param])
        return masks

    def restore(which: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for s in session.sites:
                w = session.weight(s)
                w.copy_(torch.where(which[s.param], saved[s.param], w))

    def save(which: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for s in session.sites:
                w = session.weight(s)
                saved[s.param] = torch.where(which[s.param], w.detach(), saved[s.param])

    masks = apply(active)
    state["masks"] = masks

    def chan_masks(chan: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in prob.weight_masks(chan).items()}

    def on_step(info: StepInfo) -> None:
        phase = state["phase"]
        active_w = state["masks"]
        prob.accumulate()
        restore(active_w if phase == "explore" else {k: ~v for k, v in active_w.items()})
        t = state["t"]
        if t >= steps:
            return
        pos = (info.iteration - 1) % period
        if pos == h - 1:  # prune: knapsack over the active channels to psi - omega
            frac = omega(config, t, steps)
            imp = prob.importance()
            kept = prob.select(psi * (1.0 - frac), imp, allowed=state["active"])
            state["pruned"] = [a & ~k for a, k in zip(state["active"], kept)]
            state["active"] = kept
            state["masks"] = apply(kept)
            save({k: ~v for k, v in state["masks"].items()})
            metrics.after_prune(chan_masks(kept))
            state["phase"], state["omega"] = "improve", frac
        elif pos == h + j - 1:  # explore every channel, active weights frozen
            save(state["masks"])
            apply([np.ones(sp.size, bool) for sp in prob.spaces])
            prob.reset()
            state["phase"] = "explore"
        elif pos == period - 1:  # grow back to psi from the explored channels
            imp = prob.importance()
            grown_chan = prob.select(psi, imp, base=state["active"])
            new = [g & ~a for g, a in zip(grown_chan, state["active"])]
            state["active"] = grown_chan
            state["masks"] = apply(grown_chan)
            save({k: ~v for k, v in state["masks"].items()})
            metrics.after_grow(chan_masks(grown_chan), prob.weight_masks(new))
            log.append(
                {
                    "step": t,
                    "omega": state["omega"],
                    "latency_ms": prob.cost(grown_chan),
                    "channels": [int(a.sum()) for a in grown_chan],
                }
            )
            prob.reset()
            state["t"], state["phase"] = t + 1, "estimate"

    session.train(config.total_iterations, on_step)
    if state["phase"] == "explore":
        restore(state["masks"])
    apply(state["active"])
    session.diagnostics.update(
        channel_steps=log,
        **metrics.to_json(),
        latency_budget_ms=psi,
        latency_full_ms=prob.full_cost,
        latency_estimate_ms=prob.cost(state["active"]),
        channels={
            ",".join(sp.producers): int(a.sum()) for sp, a in zip(prob.spaces, state["active"])
        },
    )
    session.end_round(
        phase="channel sparse training",
        update_steps=state["t"],
        latency_estimate_ms=prob.cost(state["active"]),
    )


# -- one-shot Taylor ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelTaylorConfig(_LatencyOptions, MethodConfig):
    """One-shot latency-constrained channel pruning: ``pretrain_iterations`` dense (Taylor scores
    accumulated over the last ``taylor_iterations``), one knapsack at ``latency_budget``,
    ``finetune_iterations`` with the channels removed."""

    latency_budget: float | None = 0.5
    pretrain_iterations: int = 1000
    taylor_iterations: int = 100
    finetune_iterations: int = 1000

    def validate(self) -> None:
        self._check_latency()
        if self.latency_budget is None:
            raise ConfigError("ChannelTaylorConfig.latency_budget is required")
        check_int(self, "pretrain_iterations", 0)
        check_int(self, "taylor_iterations", 0)
        check_int(self, "finetune_iterations", 0)


@register_method(
    "channel-taylor",
    ChannelTaylorConfig,
    structured=False,
    shrink=True,
    kind="channels",
    summary="one-shot Taylor channel pruning to a measured latency budget",
)
def run_channel_taylor(session: Session, config: ChannelTaylorConfig) -> None:
    prob = ChannelProblem(session, config)
    start = max(0, config.pretrain_iterations - config.taylor_iterations)

    def on_step(info: StepInfo) -> None:
        if info.iteration > start:
            prob.accumulate()

    if config.pretrain_iterations:
        session.train(config.pretrain_iterations, on_step)
        session.end_round(phase="dense")
    keep = prob.select(config.latency_budget * prob.full_cost, prob.importance())
    masks = prob.weight_masks(keep)
    for s in session.sites:
        session.set_mask(s, masks[s.param])
    session.train(config.finetune_iterations)
    session.diagnostics.update(
        latency_budget_ms=config.latency_budget * prob.full_cost,
        latency_full_ms=prob.full_cost,
        latency_estimate_ms=prob.cost(keep),
        channels={",".join(sp.producers): int(a.sum()) for sp, a in zip(prob.spaces, keep)},
    )
    session.end_round(phase="pruned", latency_estimate_ms=prob.cost(keep))
