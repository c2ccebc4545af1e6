"""Latency-constrained channel sparsity: IEE over channels (HALP-style knapsack) and one-shot
Taylor channel pruning.

Channels are chosen per *channel space* (a layer's output channels with everything tied to them
by the channel graph: BatchNorm, depthwise convs, residual adds), so coupled layers are pruned
together. A space takes part when its channels can be removed: every layer reading it is a
pruned site (a channel is dead when its readers' columns are masked; ``shrink_channels`` then
deletes it, so ``CompileResult.module`` is really smaller).

Cost. ``LatencyLUT`` measures each space's producer layers on the target backend (ONNX Runtime
CPU or torch) at the batch the model will be deployed at (``latency_batch``), on a grid of
output-channel counts that is dense at thin widths (measured, not drawn as a line to zero), and
caches the table on disk; a space's cost with ``k`` channels is the sum over its producers of
``LUT(c_in, k)``, HALP's ``T(p^{l-1}, p^l)``: ``c_in`` is the producer's current input width,
the active channels of the space feeding it, rounded up to a quarter, half or three quarters of
its full width (so the table holds four curves per layer), and full width for the model's
input. Each knapsack prices every space at the widths of the structure it starts from, as HALP
does; a grown structure is re-priced at its own widths and re-selected under a smaller budget
when it is over, so no structure exceeds its budget.

The budget ``latency_budget`` is a fraction of the dense model's latency *measured whole*. The
table's per-layer sum is not the clock (a whole model pays for operators the table does not
hold and not for each layer's call overhead), so with ``latency_calibrate`` (default) up to
four selections are measured whole, each interleaved with the dense model in one timing run (a
ratio that holds while the machine's load drifts), and the knapsack's budget (table units) is
moved along the secant through the last two points until the measured fraction is within 3%.
Selections keep channel counts on the ``channel_step`` grid (kernels run channel blocks), and
each is filled up to its budget at its own input widths. The
result is measured whole at the end: ``diagnostics["latency_measured_ms"]`` against
``latency_budget_ms``, with the table's gap (``latency_calibration["table_gap"]``). A budget
below the smallest structure (one channel per space) on the clock is refused with that
structure's measured fraction.

Importance (``importance``): ``"taylor"``, first-order Taylor on BatchNorm,
``|g_gamma * gamma + g_beta * beta|`` summed over the space's BatchNorms and accumulated over
training steps (for a space without BatchNorm the same estimate on the producers' rows,
``|sum w * g|``, so every space is on one scale); or ``"l1"``, the L1 norm of the producers'
rows (also used for every space before any Taylor step). Selection: the multiple-choice knapsack of ``_knapsack``, channels
kept in importance order inside a space.

A channel's weights are its producers' rows, its readers' columns and its BatchNorm entries
(affine parameters and running statistics): all of them keep their MRU values while the channel
is off, and all of the active channels' are frozen during exploration, with the rest of the
model (``FrozenRest``). Exploration steps are charged what they compute (``_iee.explore_flops``:
dense forward and activation gradient, the weight gradient of the inactive channels), the
appendix's ``2 zeta_P + zeta_D`` beside it in the diagnostics.

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
from ._iee import (
    FrozenRest,
    GradGate,
    IEEConfig,
    Metrics,
    _LatencyOptions,
    explore_flops,
    explore_flops_appendix,
    omega,
)

__all__ = ["ChannelTaylorConfig"]


class ChannelProblem:
    """The prunable channel spaces of a session's model, their cost curves and importances."""

    def __init__(self, session: Session, config: Any, criterion: str = "taylor") -> None:
        from ..runtime.latency_lut import LatencyLUT, LayerShape

        self.session = session
        self.criterion = criterion
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
        self.lut = LatencyLUT(
            config.latency_cache,
            backend=config.latency_backend,
            device="cpu" if config.latency_backend == "ort" else device,
        )
        self.step = config.channel_step
        self.sites = sites
        self.readers = {
            c.module: (i, c.factor) for i, sp in enumerate(self.spaces) for c in sp.consumers
        }
        self.batch = config.latency_batch
        self.shapes = [
            [(p, LayerShape.of(gm.get_submodule(p), inputs[p], self.batch)) for p in sp.producers]
            for sp in self.spaces
        ]
        self.calibrate = bool(getattr(config, "latency_calibrate", False))
        self.calibration: dict[str, Any] | None = None
        self._dense: fx.GraphModule | None = None  # the dense model as deployed, for timing
        self._curves: dict[tuple, np.ndarray] = {}
        self.curves = [self.curve(i) for i in range(len(self.spaces))]  # at full input widths
        self.full_cost = float(sum(c[-1] for c in self.curves))
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

    # input widths are measured at these fractions of the full width (rounded up to the channel
    # grid): four curves per layer bound the table, and rounding up keeps the price an upper bound
    _WIDTHS = (0.25, 0.5, 0.75)

    def _c_in(self, producer: str, full: int, active: list[np.ndarray] | None) -> int | None:
        """The producer's input width under ``active``, rounded up to the measured widths
        (None: full)."""
        if active is None or producer not in self.readers:
            return None
        j, factor = self.readers[producer]
        width = int(active[j].sum()) * factor
        grid = max(1, self.step * factor)
        for frac in self._WIDTHS:
            point = -(-round(frac * full) // grid) * grid
            if width <= point < full:
                return max(point, factor)
        return None

    def curve(self, i: int, active: list[np.ndarray] | None = None) -> np.ndarray:
        """Latency of space ``i`` for every channel count, its producers' inputs as wide as
        ``active`` leaves them (None: full width)."""
        widths = tuple(self._c_in(p, sh.c_in, active) for p, sh in self.shapes[i])
        key = (i, widths)
        if key not in self._curves:
            size = self.spaces[i].size
            curve = np.zeros(size + 1)
            for (_, shape), c_in in zip(self.shapes[i], widths):
                curve += self.lut.sweep(shape, size, min(self.step, size), c_in=c_in)
            self._curves[key] = curve
        return self._curves[key]

    def on_grid(self, i: int) -> np.ndarray:
        """Bool per channel count 0..size of space ``i``: the counts a selection may keep,
        multiples of ``channel_step`` and the full width (all counts for a space narrower than
        a step). Kernels run channel blocks (ONNX Runtime's CPU convs blocks of 8 or 16): an
        off-grid count costs a padded block or a slower path that the table, measured on the
        grid, does not see."""
        size = self.spaces[i].size
        k = np.arange(size + 1)
        if size <= self.step:
            return k >= 1
        return ((k % self.step == 0) & (k > 0)) | (k == size)

    def _smallest(self, i: int) -> int:
        return int(np.flatnonzero(self.on_grid(i))[0])

    def floor(self, context: list[np.ndarray] | None = None) -> float:
        """Latency of the smallest structure a selection may return (the smallest grid count
        per space), priced at the widths ``context`` gives: per-layer costs the budget cannot
        go below."""
        return float(
            sum(self.curve(i, context)[self._smallest(i)] for i in range(len(self.spaces)))
        )

    def cost(self, active: list[np.ndarray]) -> float:
        """Latency of the model with ``active`` channels, each space priced at the widths
        ``active`` gives its inputs."""
        return float(sum(self.curve(i, active)[int(a.sum())] for i, a in enumerate(active)))

    def accumulate(self) -> None:
        """Add this step's first-order Taylor score of every channel: the loss change estimated
        for zeroing the channel's output, ``|g_gamma * gamma + g_beta * beta|`` on its
        BatchNorms, or, for a space without BatchNorm, ``|sum of w * g|`` over the producers'
        row and bias (the same quantity one layer earlier, so both kinds of space compete on
        one scale in the knapsack)."""
        for i, bns in enumerate(self.bns):
            for bn in bns:
                if bn.weight is None or bn.weight.grad is None:
                    continue
                score = bn.weight.grad * bn.weight
                if bn.bias is not None and bn.bias.grad is not None:
                    score = score + bn.bias.grad * bn.bias
                self.taylor[i] += score.detach().abs().float().cpu()
            if bns:
                continue
            score = None
            for p in self.spaces[i].producers:
                mod = self.session.gm.get_submodule(p)
                if mod.weight.grad is None:
                    continue
                row = (mod.weight.detach() * mod.weight.grad).reshape(mod.weight.shape[0], -1)
                part = row.sum(1)
                if getattr(mod, "bias", None) is not None and mod.bias.grad is not None:
                    part = part + mod.bias.detach() * mod.bias.grad
                score = part if score is None else score + part
            if score is not None:
                self.taylor[i] += score.abs().float().cpu()

    def _l1(self, i: int) -> torch.Tensor:
        t = torch.zeros(self.spaces[i].size)
        for p in self.spaces[i].producers:
            w = self.session.gm.get_submodule(p).weight.detach().abs().float().cpu()
            t += w.reshape(w.shape[0], -1).sum(1)
        return t

    def importance(self) -> list[np.ndarray]:
        """Per-space channel scores. One criterion for every space of a knapsack: Taylor
        wherever anything was accumulated, L1 of the producers' rows for ``"l1"`` or before
        any Taylor step (mixing the two would let the larger-scaled one always win)."""
        if self.criterion == "l1" or not any(float(t.sum()) > 0.0 for t in self.taylor):
            return [self._l1(i).numpy() for i in range(len(self.spaces))]
        return [t.numpy().copy() for t in self.taylor]

    # -- the whole model on the clock --------------------------------------------------------
    def _latency_inputs(self) -> tuple[torch.Tensor, ...]:
        out = []
        for x in self.session.example_inputs:
            x = x.detach().cpu()
            if self.batch is not None:
                x = x[:1].expand(self.batch, *x.shape[1:]).contiguous()
            out.append(x)
        return tuple(out)

    def deployed(self, active: list[np.ndarray]) -> fx.GraphModule:
        """A CPU copy of the model with only ``active`` channels, removed for real
        (``shrink_channels``) and finalized, as it would be deployed."""
        import copy

        from ..passes import finalize, propagate_shapes, shrink_channels

        gm = copy.deepcopy(self.session.gm).cpu().eval()
        masks = self.weight_masks(active)
        with torch.no_grad():
            for s in self.session.sites:
                gm.get_buffer(s.mask_target).copy_(masks[s.param].cpu())
        propagate_shapes(gm, self._latency_inputs())
        shrink_channels(gm)
        finalize(gm)
        return gm

    def measure(self, active: list[np.ndarray]) -> tuple[float, float]:
        """Measured latency (ms) of the model with only ``active`` channels and of the dense
        model, timed interleaved in one run on the table's backend and batch."""
        if self._dense is None:  # its latency does not depend on the weights: deploy it once
            self._dense = self.deployed([np.ones(sp.size, bool) for sp in self.spaces])
        stats = self.lut.whole_models(
            {"model": self.deployed(active), "dense": self._dense}, self._latency_inputs()
        )
        return stats["model"], stats["dense"]

    def lut_budget(self, fraction: float, importance: list[np.ndarray]) -> float:
        """The knapsack's budget (table units) for ``fraction`` of the dense model's latency.

        Without calibration: ``fraction`` of the table's sum. With it, selections are
        measured whole, each interleaved with the dense model (up to 4), and the budget moves
        along the secant through the last two (budget, measured fraction) points until a
        selection lands within 3% of ``fraction``; the closest is kept. ``calibration`` keeps
        the points and the gap between the table and the clock. A budget the smallest
        structure cannot reach on the clock is refused."""
        guess = fraction * self.full_cost
        if not self.calibrate:
            return guess
        # (knapsack budget, the selection's table sum, its time / the dense time, dense ms)
        points = [(self.full_cost, self.full_cost, 1.0, None)]
        floor = self.floor() * 1.01  # the knapsack rounds costs up: room for that
        guess = max(guess, floor)  # the clock decides whether the budget is out of reach
        best = None
        for _ in range(4):
            keep = self.select(guess, importance)
            s = self.cost(keep)
            t, dense_ms = self.measure(keep)
            points.append((guess, s, t / dense_ms, dense_ms))
            if best is None or abs(points[-1][2] / fraction - 1.0) < abs(best[2] / fraction - 1):
                best = points[-1]
            ratio = points[-1][2]
            if abs(ratio / fraction - 1.0) <= 0.03:
                break
            if guess <= floor and ratio > fraction:
                raise ConfigError(
                    f"latency_budget={fraction} is out of reach: the smallest structure "
                    f"(channel_step={self.step} channels per space) measures {ratio:.2f} of the "
                    f"dense model's {dense_ms:.4g} ms whole on this backend and batch; raise "
                    "latency_budget (or deploy at a larger latency_batch, where fixed per-layer "
                    "costs weigh less)"
                )
            # secant on budget -> measured fraction through the last two points: it absorbs
            # the table's gap to the clock and how far under its budget the knapsack lands
            (g1, _, r1, _), (g2, _, r2, _) = points[-2], points[-1]
            slope = (r2 - r1) / (g2 - g1) if abs(g2 - g1) > 1e-12 else 0.0
            if slope <= 0.0:
                slope = r2 / g2 if g2 > 0 else 1.0
            guess = min(max(g2 + (fraction - r2) / slope, floor), self.full_cost)
        dense = [p[3] for p in points[1:]]
        dense_ms = float(np.median(dense))
        self.calibration = {
            "dense_ms": dense_ms,
            "table_dense_ms": self.full_cost,
            "table_gap": dense_ms / self.full_cost,  # whole model / sum of its layers
            "budget_ms": fraction * dense_ms,
            "lut_budget_ms": best[0],
            # [knapsack budget, table sum, measured fraction of dense, dense ms beside it]
            "points": [[float(x) if x is not None else None for x in pt] for pt in points],
        }
        return best[0]

    def settle(
        self, fraction: float, psi: float, active: list[np.ndarray], importance: list[np.ndarray]
    ) -> tuple[list[np.ndarray], float] | None:
        """Move a trained structure onto the measured budget: measure it interleaved with the
        dense model and, while its fraction is more than 5% off ``fraction`` (at most twice),
        prune within it or grow onto it at a budget scaled by the miss. Returns the new
        structure and budget, or None when it was already within 5%."""
        moved = None
        for _ in range(2):
            t, dense = self.measure(active)
            ratio = t / dense
            self.calibration.setdefault("settle", []).append([float(psi), float(ratio)])
            if abs(ratio / fraction - 1.0) <= 0.05:
                break
            psi = psi * fraction / ratio
            if ratio > fraction:
                active = self.select(psi, importance, allowed=active)
            else:
                active = self.select(psi, importance, base=active)
            moved = (active, psi)
        return moved

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
        """Keep-masks within ``budget`` (priced at their own input widths): the knapsack over
        ``allowed`` channels on top of ``base`` (always kept).

        Spaces are priced at the widths of the structure the selection starts from (HALP): the
        allowed channels when pruning (results can only be narrower: an upper bound), the kept
        ones when growing. Growing widens the inputs of the next spaces, so a grown structure is
        re-priced at its own widths and, when over, selected again under a proportionally
        smaller budget; as a last resort at full widths. Pruning is re-priced the same way: the
        upper bound holds only where measured latency never falls as an input widens, which
        timing noise on a busy machine can break.
        """
        context = base if base is not None else allowed
        target = budget
        for _ in range(8):
            keep = self._knapsack(target, importance, allowed, base, context)
            cost = self.cost(keep)
            if cost <= budget * (1 + 1e-9):
                return self._fill(keep, cost, target, budget, importance, allowed, base, context)
            target *= 0.999 * budget / cost
        if base is None:
            return keep  # best effort: the diagnostics report its estimate against the budget
        return self._knapsack(budget, importance, allowed, base, None)

    def _fill(self, keep, cost, target, budget, importance, allowed, base, context):
        """Priced at wider inputs than it ends with, a selection lands under its budget (by a
        sixth on resnet18). Bisect the knapsack's own budget for the largest selection whose
        cost at its own widths stays within ``budget``."""
        lo, best, best_cost = target, keep, cost
        hi = target * max(1.0, budget / max(cost, 1e-12)) * 1.25
        for _ in range(7):
            if best_cost >= budget * 0.995:
                break
            mid = 0.5 * (lo + hi)
            cand = self._knapsack(mid, importance, allowed, base, context)
            c = self.cost(cand)
            if c <= budget * (1 + 1e-9):
                lo = mid
                if c > best_cost:
                    best, best_cost = cand, c
            else:
                hi = mid
        return best

    def _knapsack(
        self,
        budget: float,
        importance: list[np.ndarray],
        allowed: list[np.ndarray] | None,
        base: list[np.ndarray] | None,
        context: list[np.ndarray] | None,
    ) -> list[np.ndarray]:
        n = len(self.spaces)
        allowed = allowed or [np.ones(sp.size, bool) for sp in self.spaces]
        base = base or [np.zeros(sp.size, bool) for sp in self.spaces]
        imps, curves = [], []
        for i in range(n):
            cand = allowed[i] & ~base[i]
            k0 = int(base[i].sum())
            full = self.curve(i, context)
            imps.append(np.where(cand, importance[i], -np.inf)[cand])
            options = full[k0 : k0 + int(cand.sum()) + 1] - full[k0]
            grid = self.on_grid(i)[k0 : k0 + int(cand.sum()) + 1].copy()
            grid[0] = grid[0] or k0 > 0  # adding nothing to a kept base is always allowed
            curves.append(np.where(grid, options, np.inf))
        extra = budget - sum(self.curve(i, context)[int(b.sum())] for i, b in enumerate(base))
        picks = choose_channels(
            imps, curves, max(extra, 1e-9), minimum=0 if any(b.any() for b in base) else 1
        )
        if picks is None:
            if not any(b.any() for b in base):
                raise ConfigError(
                    f"latency budget {budget:.4g} ms is below the cheapest structure that keeps "
                    "one channel per space; raise latency_budget"
                )
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


def _latency_report(
    prob: ChannelProblem, fraction: float, psi: float, active: list[np.ndarray]
) -> dict[str, Any]:
    """Diagnostics of a latency-constrained run: the knapsack's view (table units) and, when
    calibrated, the clock's (the final model measured whole against the measured budget)."""
    out: dict[str, Any] = {
        "latency_lut_budget_ms": psi,
        "latency_estimate_ms": prob.cost(active),
        "latency_lut_full_ms": prob.full_cost,
        "latency_batch": prob.batch,
        "channels": {",".join(sp.producers): int(a.sum()) for sp, a in zip(prob.spaces, active)},
    }
    if prob.calibration is not None:
        measured, dense_now = prob.measure(active)
        out.update(
            latency_budget_ms=fraction * dense_now,
            latency_full_ms=dense_now,
            latency_measured_ms=measured,
            latency_vs_budget=measured / (fraction * dense_now),
            latency_calibration=prob.calibration,
        )
    else:
        out.update(latency_budget_ms=psi, latency_full_ms=prob.full_cost)
    return out


def run_channel_iee(session: Session, config: IEEConfig) -> None:
    prob = ChannelProblem(session, config, config.criterion)
    psi = prob.lut_budget(config.latency_budget, prob.importance())
    active = prob.select(psi, prob.importance())
    h, j, q = config.update_period
    period = h + j + q
    steps = int(config.stop_fraction * config.total_iterations) // period
    metrics = Metrics()
    saved = {s.param: session.weight(s).detach().clone() for s in session.sites}
    bn_names = {
        f"{m}.{attr}"
        for sp in prob.spaces
        for m in sp.channelwise
        for attr in ("weight", "bias", "running_mean", "running_var")
    }
    rest = FrozenRest(session, skip=bn_names)
    gate = GradGate()
    bn_saved: dict[tuple[int, int], torch.Tensor] = {}
    state: dict[str, Any] = {"t": 0, "phase": "estimate", "active": active}
    log: list[dict[str, Any]] = []

    def bn_tensors(i: int) -> list[torch.Tensor]:
        return [
            t
            for bn in prob.bns[i]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
            if t is not None
        ]

    def apply(chan: list[np.ndarray]) -> dict[str, torch.Tensor]:
        masks = prob.weight_masks(chan)
        for s in session.sites:
            session.set_mask(s, masks[s.param])
        return masks

    def restore(which: dict[str, torch.Tensor], chans: list[np.ndarray]) -> None:
        with torch.no_grad():
            for s in session.sites:
                w = session.weight(s)
                w.copy_(torch.where(which[s.param], saved[s.param], w))
            for i, c in enumerate(chans):
                idx = torch.from_numpy(np.flatnonzero(c))
                for k, t in enumerate(bn_tensors(i)):
                    if len(idx) and (i, k) in bn_saved:
                        buf = bn_saved[(i, k)] = bn_saved[(i, k)].to(t.device)
                        t[idx.to(t.device)] = buf[idx.to(t.device)]

    def save(which: dict[str, torch.Tensor], chans: list[np.ndarray]) -> None:
        with torch.no_grad():
            for s in session.sites:
                w = session.weight(s)
                saved[s.param] = torch.where(which[s.param], w.detach(), saved[s.param])
            for i, c in enumerate(chans):
                idx = torch.from_numpy(np.flatnonzero(c))
                for k, t in enumerate(bn_tensors(i)):
                    # keyed by position: moving the model to a device replaces buffer objects
                    buf = bn_saved.get((i, k))
                    buf = t.detach().clone() if buf is None else buf.to(t.device)
                    if len(idx):
                        buf[idx.to(t.device)] = t.detach()[idx.to(t.device)]
                    bn_saved[(i, k)] = buf

    def explore_trainable(
        masks: dict[str, torch.Tensor], chans: list[np.ndarray]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # the inactive channels' weights and BatchNorm affine entries; everything else frozen
        out = [(session.weight(s), ~masks[s.param]) for s in session.sites]
        for i, c in enumerate(chans):
            off = torch.from_numpy(~c)
            out += [(t, off) for bn in prob.bns[i] for t in (bn.weight, bn.bias) if t is not None]
        return out

    def inactive(chans: list[np.ndarray]) -> list[np.ndarray]:
        return [~c for c in chans]

    def as_dict(chans: list[np.ndarray]) -> dict[str, torch.Tensor]:
        # the structure at channel level: what IoU and survival are measured on
        return {
            ",".join(sp.producers): torch.from_numpy(c.copy()) for sp, c in zip(prob.spaces, chans)
        }

    def densities(chans: list[np.ndarray]) -> dict[str, float]:
        masks = prob.weight_masks(chans)
        return {p: float(m.float().mean()) for p, m in masks.items()}

    appendix_gap = {"per_sample": 0.0, "total": 0.0}

    masks = apply(active)
    state["masks"] = masks
    save({k: ~v for k, v in masks.items()}, inactive(active))

    def on_step(info: StepInfo) -> None:
        phase = state["phase"]
        dev = session.weight(session.sites[0]).device  # the trainer moves the model late
        if next(iter(saved.values())).device != dev:
            saved.update({k: v.to(dev) for k, v in saved.items()})
            state["masks"] = {k: v.to(dev) for k, v in state["masks"].items()}
        active_w = state["masks"]
        prob.accumulate()
        if phase == "explore":  # Theta_K frozen: the active channels and the rest of the model
            restore(active_w, state["active"])
            rest.restore()
            appendix_gap["total"] += appendix_gap["per_sample"] * info.batch_size
        else:  # inactive channels keep their MRU values
            restore({k: ~v for k, v in active_w.items()}, inactive(state["active"]))
        t = state["t"]
        if t >= steps:
            return
        pos = (info.iteration - 1) % period
        if pos == h - 1:  # prune: knapsack over the active channels to psi - omega
            frac = omega(config, t, steps)
            imp = prob.importance()
            target = psi * (1.0 - frac)
            floor = prob.floor(state["active"])
            if target < floor:
                # small layers are mostly fixed cost: Omega_t of the budget may not exist above
                # the one-channel floor; take Omega_t of what lies above the floor instead
                target = floor + (psi - floor) * (1.0 - frac)
            kept = prob.select(target, imp, allowed=state["active"])
            state["active"] = kept
            state["masks"] = apply(kept)
            save({k: ~v for k, v in state["masks"].items()}, inactive(kept))
            metrics.after_prune(as_dict(kept))
            state["phase"], state["omega"] = "improve", frac
            state["prune_target_ms"] = target
        elif pos == h + j - 1:  # explore every channel, active weights frozen
            save(state["masks"], state["active"])
            rest.snapshot()
            gate.close(session.gm, explore_trainable(state["masks"], state["active"]))
            dens = densities(state["active"])
            session.step_flops_override = explore_flops(session.flops, dens)
            appendix_gap["per_sample"] = session.step_flops_override - explore_flops_appendix(
                session.flops, dens
            )
            apply([np.ones(sp.size, bool) for sp in prob.spaces])
            prob.reset()
            state["phase"] = "explore"
        elif pos == period - 1:  # grow back to psi from the explored channels
            imp = prob.importance()
            grown_chan = prob.select(psi, imp, base=state["active"])
            new = [g & ~a for g, a in zip(grown_chan, state["active"])]
            state["active"] = grown_chan
            state["masks"] = apply(grown_chan)
            save({k: ~v for k, v in state["masks"].items()}, inactive(grown_chan))
            rest.release()
            gate.open()
            session.step_flops_override = None
            metrics.after_grow(as_dict(grown_chan), as_dict(new))
            log.append(
                {
                    "step": t,
                    "omega": state["omega"],
                    "prune_target_ms": state["prune_target_ms"],
                    "latency_ms": prob.cost(grown_chan),
                    "channels": [int(a.sum()) for a in grown_chan],
                }
            )
            prob.reset()
            state["t"], state["phase"] = t + 1, "estimate"

    try:
        session.train(config.total_iterations, on_step)
    finally:
        gate.open()
    if state["phase"] == "explore":
        restore(state["masks"], state["active"])
        rest.restore()
        session.step_flops_override = None
    if prob.calibration is not None:
        # the budget was calibrated on the starting structure; the one training ended with
        # has other widths, so measure it against the dense model and, if it is more than 5%
        # off, move it onto the budget: prune within it or grow onto it by the last importance
        settled = prob.settle(config.latency_budget, psi, state["active"], prob.importance())
        if settled is not None:
            state["active"], psi = settled
    apply(state["active"])
    prob.lut.save()
    samples = max(1, session._samples_seen)
    session.diagnostics.update(
        channel_steps=log,
        **metrics.to_json(),
        flops_counter_per_sample=session.train_flops / samples,
        flops_appendix_per_sample=(session.train_flops - appendix_gap["total"]) / samples,
        **_latency_report(prob, config.latency_budget, psi, state["active"]),
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
    prob = ChannelProblem(session, config, "taylor")
    start = max(0, config.pretrain_iterations - config.taylor_iterations)

    def on_step(info: StepInfo) -> None:
        if info.iteration > start:
            prob.accumulate()

    if config.pretrain_iterations:
        session.train(config.pretrain_iterations, on_step)
        session.end_round(phase="dense")
    imp = prob.importance()
    psi = prob.lut_budget(config.latency_budget, imp)
    keep = prob.select(psi, imp)
    masks = prob.weight_masks(keep)
    for s in session.sites:
        session.set_mask(s, masks[s.param])
    session.train(config.finetune_iterations)
    prob.lut.save()
    session.diagnostics.update(**_latency_report(prob, config.latency_budget, psi, keep))
    session.end_round(phase="pruned", latency_estimate_ms=prob.cost(keep))
