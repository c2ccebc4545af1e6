"""Structural lottery tickets (Chen et al. 2022, "Coarsening the granularity").

``imp-refill`` / ``imp-refill+`` (Alg. 2). IMP (Alg. 1) runs to ``target_sparsity``; then, per
channel space (a layer's output channels, tied across residual adds by the channel graph), the
top-k output channels by ``refill_criterion`` are refilled — every weight of their kernels
trainable again — and the rest emptied, with ``k = ceil(density * C)`` from the space's IMP
density (Refill+ keeps ``refill_extra`` of C more). Emptied channels are also removed from what
their consumers read, so ``shrink_channels`` can delete them: ``CompileResult.module`` is
physically smaller. The refilled ticket is rewound and trained one more round. A space whose
channels cannot be removed (pinned by the channel graph, or read by a layer nmcompile does not
mask, such as the dense classifier) still gets channel-structured rows, without the removal.

Criteria (``refill_criterion``): ``"l1"`` (L1 of a channel's surviving weights; the paper's main
setting, A2 found it best), ``"count"`` (surviving weights; the authors' code default),
``"act_l1"`` / ``"act_l2"`` (norm of the channel's output on a training batch) and ``"taylor"``
(|activation x gradient| on that batch).

``imp-regroup`` (Alg. 3) turns IMP's unstructured mask into dense blocks with the ``regroup``
pass (row graph + pymetis); ``group-aware-imp`` (Alg. 4) regroups after every IMP round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

from .._config import check_float, check_int
from .._errors import ConfigError
from .._registry import register_method
from .._rounds import RoundEngine
from .._session import Session
from ..passes.channel_graph import ChannelGraph, layer_module
from ..passes.regroup import RegroupSettings, regroup_mask
from .lottery import _IMP, IMPConfig

__all__ = ["GroupAwareIMPConfig", "IMPRefillConfig", "IMPRefillPlusConfig", "IMPRegroupConfig"]

_CRITERIA = ("l1", "count", "act_l1", "act_l2", "taylor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IMPRefillConfig(IMPConfig):
    """IMP-Refill: IMP to ``target_sparsity``, then channel refilling by ``refill_criterion``."""

    refill_criterion: str = "l1"
    refill_extra: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.refill_criterion not in _CRITERIA:
            raise ConfigError(
                f"{type(self).__name__}.refill_criterion must be one of {list(_CRITERIA)}, got "
                f"{self.refill_criterion!r}"
            )
        check_float(self, "refill_extra", 0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IMPRefillPlusConfig(IMPRefillConfig):
    """IMP-Refill+: refill an extra ``refill_extra`` (default 10%) of each layer's channels."""

    refill_extra: float = 0.1


def _channel_scores(
    session: Session, graph: ChannelGraph, criterion: str
) -> dict[str, torch.Tensor]:
    """Per producer module, a score per output channel."""
    gm = session.gm
    scores: dict[str, torch.Tensor] = {}
    if criterion in ("l1", "count"):
        for space in graph.spaces:
            for name in space.producers:
                mod = gm.get_submodule(name)
                w = mod.weight.detach()
                mask = getattr(mod, "weight_mask", None)
                eff = w * mask if mask is not None else w
                rows = eff.reshape(eff.shape[0], -1)
                scores[name] = (
                    (rows != 0).sum(1).float() if criterion == "count" else rows.abs().sum(1)
                )
        return scores
    x, y = session.sample_batch()
    outputs: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            layer = layer_module(self.module, n)
            if layer is not None and isinstance(out, torch.Tensor):
                if criterion == "taylor":
                    out.retain_grad()
                outputs[layer[0]] = out
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.enable_grad() if criterion == "taylor" else torch.no_grad():
            out = Recorder(gm).run(*x)
            if criterion == "taylor":
                loss = (
                    torch.nn.functional.cross_entropy(out, y)
                    if y is not None
                    else out.float().pow(2).mean()
                )
                loss.backward()
    finally:
        gm.train(was_training)
        gm.zero_grad(set_to_none=True)
    for name, act in outputs.items():
        a = act.detach().float()
        dims = [d for d in range(a.dim()) if d != (1 if a.dim() > 2 else a.dim() - 1)]
        if criterion == "act_l1":
            s = a.abs().sum(dims)
        elif criterion == "act_l2":
            s = a.pow(2).sum(dims).sqrt()
        else:
            s = (a * act.grad.float()).abs().sum(dims)
        scores[name] = s.cpu()
    return scores


class _IMPRefill(_IMP):
    """IMP rounds, then one refill step; done after the refilled ticket trained its round."""

    def __init__(self, config: IMPRefillConfig) -> None:
        super().__init__(config)
        self.refilled = False
        self.config = config

    def propose(self, engine):
        if not super().done(engine):
            return super().propose(engine)
        return self._refill(engine)

    def accept(self, engine, masks, info):
        if info.get("refill"):
            self.refilled = True

    def done(self, engine):
        return self.refilled

    def state_dict(self):
        return {"refilled": self.refilled}

    def load_state_dict(self, state):
        self.refilled = bool(state["refilled"])

    def rounds_needed(self, engine):
        imp = super().rounds_needed(engine)
        return None if imp is None else imp + 1  # the refilled ticket trains one more round

    def _refill(self, engine):
        session = engine.session
        cfg = self.config
        graph = session.channel_graph()
        site_of = {s.name: s for s in session.sites}
        masks = {p: m.clone() for p, m in engine.masks().items()}
        scores = _channel_scores(session, graph, cfg.refill_criterion)
        spaces = [sp for sp in graph.spaces if any(p in site_of for p in sp.producers)]
        density = {}
        for sp in spaces:
            producers = [site_of[p] for p in sp.producers if p in site_of]
            density[sp.index] = sum(int(masks[s.param].sum()) for s in producers) / sum(
                s.numel for s in producers
            )
        # a space's channels can go only if every reader is masked (a site)
        removable = {
            sp.index
            for sp in spaces
            if sp.removable and all(c.module in site_of for c in sp.consumers)
        }
        out_space = {p: sp.index for sp in spaces for p in sp.producers}
        in_space = {
            c.module: (sp.index, c.factor)
            for sp in spaces
            if sp.index in removable
            for c in sp.consumers
        }
        size = {sp.index: sp.size for sp in spaces}

        def plan(lam: float, extra: float) -> dict[int, int]:
            return {
                i: max(
                    1,
                    min(
                        size[i],
                        math.ceil(min(1.0, lam * density[i]) * size[i])
                        + math.ceil(extra * size[i]),
                    ),
                )
                for i in size
            }

        def kept(k: dict[int, int]) -> int:
            total = 0
            for site in session.sites:
                per_row = site.numel // site.shape[site.out_axis]
                rows = k.get(out_space.get(site.name), site.shape[site.out_axis])
                if site.name in in_space:
                    idx, factor = in_space[site.name]
                    per_row = per_row // site.shape[1] * k[idx] * factor
                total += rows * per_row
            return total

        # Keep the IMP ticket's weight count (s~ = s, Alg. 2): scale every space's channel share
        # (its IMP density) by one factor, found by bisection, since removing a channel also
        # removes its consumers' columns.
        budget = sum(int(m.sum()) for m in masks.values())
        lo, hi = 0.0, max(1.0 / max(d, 1e-9) for d in density.values()) if density else 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept(plan(mid, 0.0)) <= budget else (lo, mid)
        k = plan(lo, cfg.refill_extra)
        alive: dict[int, torch.Tensor] = {}
        for sp in spaces:
            score = sum(scores[p].to(torch.float64) for p in sp.producers if p in scores)
            order = torch.argsort(score, descending=True, stable=True)
            keep = torch.zeros(sp.size, dtype=torch.bool)
            keep[order[: k[sp.index]]] = True
            alive[sp.index] = keep
        for site in session.sites:  # rows: refill kept channels whole, empty the others
            m = masks[site.param]
            idx = out_space.get(site.name)
            if idx is not None:
                rows = alive[idx].to(m.device).reshape(-1, *([1] * (m.dim() - 1)))
                m = rows.expand_as(m).clone()
            if site.name in in_space:  # columns: stop reading removed channels
                idx, factor = in_space[site.name]
                cols = alive[idx].repeat_interleave(factor).to(m.device)
                m = m & cols.reshape([1, -1] + [1] * (m.dim() - 2))
            masks[site.param] = m
        return masks, {
            "refill": True,
            "refill_channels": {
                ",".join(sp.producers): int(alive[sp.index].sum()) for sp in spaces
            },
            "removable_channels": sum(int((~alive[i]).sum()) for i in removable),
        }


for _name, _cls, _summary in (
    ("imp-refill", IMPRefillConfig, "IMP, then whole channels refilled by importance and removed"),
    ("imp-refill+", IMPRefillPlusConfig, "IMP-Refill keeping an extra fraction of channels"),
):

    def _run(session: Session, config: IMPRefillConfig) -> None:
        RoundEngine(session, config, _IMPRefill(config)).run()

    register_method(_name, _cls, structured=False, summary=_summary, shrink=True, kind="channels")(
        _run
    )


# -- regroup -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class IMPRegroupConfig(IMPConfig):
    """IMP-Regroup: IMP to ``target_sparsity``, then dense blocks by hypergraph-style partitioning
    (see ``passes/regroup.py`` for ``regroup_*`` options)."""

    regroup_parts: int = 8
    regroup_min_rows: int = 16
    regroup_min_cols: int = 8
    regroup_col_fraction: float = 0.5
    regroup_density_factor: float = 1.5
    regroup_block_rows: int = 32
    regroup_neighbors: int = 16
    regroup_backend: str = "pymetis"

    def validate(self) -> None:
        super().validate()
        check_int(self, "regroup_parts", 1)
        check_int(self, "regroup_min_rows", 1)
        check_int(self, "regroup_min_cols", 1)
        check_float(self, "regroup_col_fraction", 0.0, 1.0, lo_open=True)
        check_float(self, "regroup_density_factor", 1.0, 10.0)
        check_int(self, "regroup_block_rows", 1)
        check_int(self, "regroup_neighbors", 1)
        if self.regroup_backend not in ("pymetis", "kahypar"):
            raise ConfigError(
                f"{type(self).__name__}.regroup_backend must be 'pymetis' or 'kahypar', got "
                f"{self.regroup_backend!r}"
            )

    def settings(self) -> RegroupSettings:
        return RegroupSettings(
            parts=self.regroup_parts,
            min_rows=self.regroup_min_rows,
            min_cols=self.regroup_min_cols,
            col_fraction=self.regroup_col_fraction,
            density_factor=self.regroup_density_factor,
            block_rows=self.regroup_block_rows,
            neighbors=self.regroup_neighbors,
            seed=self.seed,
            backend=self.regroup_backend,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupAwareIMPConfig(IMPRegroupConfig):
    """Group-aware IMP (Alg. 4): regroup after every IMP round."""


def _regroup_all(
    engine: RoundEngine,
    masks: dict[str, torch.Tensor],
    settings: RegroupSettings,
    *,
    keep_budget: bool = False,
):
    """Regroup every site's mask; keep the blocks for the block-sparse runtime. With
    ``keep_budget`` no layer ends with more weights than its mask had (group-aware IMP)."""
    blocks, new = {}, {}
    for site in engine.session.sites:
        mask = masks[site.param]
        m2d = site.rows(mask)  # one row per output channel, whatever the weight's layout
        budget = int(m2d.sum()) if keep_budget else None
        out, found = regroup_mask(m2d.cpu(), settings, budget=budget)
        new[site.param] = site.from_rows(out).to(mask.device)
        blocks[site.param] = [[b.rows.tolist(), b.cols.tolist()] for b in found]
    return new, blocks


class _IMPRegroup(_IMP):
    def __init__(self, config: IMPRegroupConfig, *, every_round: bool) -> None:
        super().__init__(config)
        self.config = config
        self.every_round = every_round
        self.regrouped = False
        self.blocks: dict[str, list] = {}
        self.imp_masks: dict[str, torch.Tensor] | None = None

    def _imp_target_reached(self, engine) -> bool:
        """IMP's own masks reached the target, or the regrouped ones did (a regroup that keeps
        each layer's budget can still end under IMP's count, when a block rounds down)."""
        target_kept = round((1.0 - self.config.target_sparsity) * engine.total_weights)
        for masks in (self.imp_masks, engine.masks()):
            if masks and sum(int(m.sum()) for m in masks.values()) <= target_kept:
                return True
        return False

    def propose(self, engine):
        settings = self.config.settings()
        if self.every_round:
            # IMP prunes the *regrouped* mask of the last round, then regroups again (Alg. 4)
            masks, info = super().propose(engine)
            imp = {p: m.clone() for p, m in masks.items()}
            new, blocks = _regroup_all(engine, masks, settings, keep_budget=True)
            info.update(
                regrouped=True,
                blocks=sum(len(b) for b in blocks.values()),
                _imp=imp,
                _blocks=blocks,
            )
            return new, info
        if not super().done(engine):
            return super().propose(engine)
        new, blocks = _regroup_all(engine, engine.masks(), settings)
        return new, {
            "regrouped": True,
            "blocks": sum(len(b) for b in blocks.values()),
            "_blocks": blocks,
            "_final": True,
        }

    def accept(self, engine, masks, info):
        self.blocks = info.pop("_blocks", self.blocks)
        imp = info.pop("_imp", None)
        if imp is not None:
            self.imp_masks = imp
        if info.pop("_final", False) or (self.every_round and self._imp_target_reached(engine)):
            self.regrouped = True

    def done(self, engine):
        return self.regrouped

    def rounds_needed(self, engine):
        if self.every_round:
            return None  # each regroup refills weights inside blocks: the count is data-dependent
        imp = super().rounds_needed(engine)
        return None if imp is None else imp + 1  # the regrouped ticket trains one more round

    def finish(self, engine):
        return {"blocks": self.blocks}

    def state_dict(self):
        return {"regrouped": self.regrouped, "blocks": self.blocks, "imp_masks": self.imp_masks}

    def load_state_dict(self, state):
        self.regrouped = bool(state["regrouped"])
        self.blocks = state["blocks"]
        self.imp_masks = state["imp_masks"]


@register_method(
    "imp-regroup",
    IMPRegroupConfig,
    structured=False,
    kind="blocks",
    summary="IMP, then the mask regrouped into dense blocks (pymetis)",
)
def run_imp_regroup(session: Session, config: IMPRegroupConfig) -> None:
    RoundEngine(session, config, _IMPRegroup(config, every_round=False)).run()


@register_method(
    "group-aware-imp",
    GroupAwareIMPConfig,
    structured=False,
    kind="blocks",
    summary="IMP regrouping its mask into dense blocks after every round",
)
def run_group_aware_imp(session: Session, config: GroupAwareIMPConfig) -> None:
    RoundEngine(session, config, _IMPRegroup(config, every_round=True)).run()
