"""Structural lottery tickets (Chen et al. 2022, "Coarsening the granularity").

``imp-refill`` / ``imp-refill+`` (§3.2, Alg. 2). IMP (Alg. 1) runs to ``target_sparsity``; then,
per channel space (a layer's output channels, tied across residual adds by the channel graph), the
top-k output channels by ``refill_criterion`` are refilled — every weight of their kernels
trainable again — and the rest emptied, with ``k = ceil(density * C)`` from the space's IMP
density (Refill+ keeps ``refill_extra`` of C more). Emptied channels are also removed from what
their consumers read, so ``shrink_channels`` can delete them: ``CompileResult.module`` is
physically smaller. The refilled ticket is rewound and trained one more round. A space whose
channels cannot be removed (pinned by the channel graph, or read by a layer nmcompile does not
mask, such as the dense classifier) still gets channel-structured rows, without the removal; so
does a pruned weight outside every space (a matmul's ``[in, out]`` parameter), along its own
output axis. Rows, columns and scores follow each site's axes (``out_axis``, ``group_axis``).

A channel's score is summed over the *pruned* producers of its space only. The paper scores the
ticket's kernels, ``||m_i * theta_i||_1`` per pruned layer, and IMP never prunes the stem (the
authors' code skips ``conv1`` for pruning and refilling alike); the dense stem's L1, added into
the residual space it feeds, would outweigh its sparse members' and choose the channels alone.

Criteria (``refill_criterion``): ``"l1"`` (L1 of a channel's surviving weights; the paper's main
setting, A2 found it best), ``"count"`` (surviving weights; the authors' code default),
``"act_l1"`` / ``"act_l2"`` (norm of the channel's output on a training batch) and ``"taylor"``
(|activation x gradient| on that batch).

``imp-regroup`` (§3.3, Alg. 3) turns IMP's unstructured mask into dense blocks with the
``regroup`` pass (row graph + pymetis, then the authors' block rule: see ``passes/regroup.py``);
``group-aware-imp`` (Alg. 4) regroups after every IMP round. A layer where no block forms (too few
rows, for one) keeps IMP's mask and is not counted as regrouped: each regroup step's history
says how many layers were (``regrouped_layers``) and were not (``unregrouped_layers``), and
``diagnostics["regroup_layers"]`` gives each layer's counts and, when it was left, why.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.fx as fx

from .._config import check_float, check_int
from .._errors import ConfigError
from .._registry import register_method
from .._rounds import RoundEngine
from .._session import Session
from ..passes.find_sites import PrunableSite
from ..passes.regroup import RegroupSettings, regroup_layer
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


def _product_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Per site (by param), the graph nodes that compute with its masked weight (a conv / linear
    call, a matmul): their outputs hold the site's output channels."""
    nodes: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        site = n.meta.get("nm_site")
        if site is not None and not n.meta.get("nm_mask_source"):
            nodes.setdefault(site.param, []).append(n)
    return nodes


def _channel_dim(act: torch.Tensor, site: PrunableSite) -> int:
    """The dim of ``act`` (an output of ``site``'s product) that runs over its output channels:
    1 for a conv, the last for a linear; for a matmul the one dim of the right size."""
    size = site.shape[site.out_axis]
    if site.kind == "conv":
        return 1
    if site.kind == "linear" or act.shape[-1] == size:
        return act.dim() - 1
    dims = [d for d in range(act.dim()) if act.shape[d] == size]
    if len(dims) != 1:
        raise ConfigError(
            f"refill: cannot tell which dim of `{site.name}`'s output {tuple(act.shape)} holds "
            f"its {size} output features; use refill_criterion='l1' or 'count'"
        )
    return dims[0]


def _channel_scores(
    session: Session, masks: dict[str, torch.Tensor], criterion: str
) -> dict[str, torch.Tensor]:
    """Per pruned site (by param), a score per output channel (per row of ``site.rows``).

    Only pruned layers are scored: as in the paper (§3.2, Alg. 2) a channel's importance is that
    of the ticket's kernel, ``||m_i * theta_i||_1``, and a layer IMP does not prune (the dense
    stem) is not part of the ticket. Summed over a residual space, the stem's dense L1 would
    outweigh its sparse members' and pick the channels by themselves.
    """
    gm = session.gm
    scores: dict[str, torch.Tensor] = {}
    if criterion in ("l1", "count"):
        for site in session.sites:
            w = session.weight(site).detach()
            rows = site.rows(w * masks[site.param].to(w.dtype))
            scores[site.param] = (
                (rows != 0).sum(1).float() if criterion == "count" else rows.abs().sum(1)
            ).cpu()
        return scores
    x, y = session.sample_batch()
    products = {id(n): p for p, ns in _product_nodes(gm).items() for n in ns}
    outputs: dict[str, list[torch.Tensor]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            param = products.get(id(n))
            if param is not None and isinstance(out, torch.Tensor):
                if criterion == "taylor":
                    out.retain_grad()
                outputs.setdefault(param, []).append(out)
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
    site_of = {s.param: s for s in session.sites}
    for param, acts in outputs.items():
        total = None
        for act in acts:
            a = act.detach().float()
            axis = _channel_dim(a, site_of[param])
            dims = [d for d in range(a.dim()) if d != axis]
            if criterion == "act_l1":
                s = a.abs().sum(dims)
            elif criterion == "act_l2":
                s = a.pow(2).sum(dims).sqrt()
            else:
                s = (a * act.grad.float()).abs().sum(dims)
            total = s if total is None else total + s
        scores[param] = total.cpu()
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
        scores = _channel_scores(session, masks, cfg.refill_criterion)
        # Units of channels chosen together: a channel space of the graph (its pruned producers
        # share output channels through residual adds), or a pruned layer outside every space
        # (a matmul's [in, out] weight): refilled along its own output axis, nothing removed.
        units: dict[str, list[PrunableSite]] = {}
        removable: set[str] = set()
        in_space: dict[str, tuple[str, int]] = {}  # consumer -> (unit, features per channel)
        out_unit: dict[str, str] = {}
        for sp in graph.spaces:
            members = [site_of[p] for p in sp.producers if p in site_of]
            if not members:
                continue
            key = ",".join(sp.producers)
            units[key] = members
            # a space's channels can go only if every reader is masked (a site)
            if sp.removable and all(c.module in site_of for c in sp.consumers):
                removable.add(key)
                in_space.update({c.module: (key, c.factor) for c in sp.consumers})
        for key, members in units.items():
            out_unit.update({s.name: key for s in members})
        for site in session.sites:
            if site.name not in out_unit:
                units[site.name] = [site]
                out_unit[site.name] = site.name
        size = {u: members[0].shape[members[0].out_axis] for u, members in units.items()}
        density = {
            u: sum(int(masks[s.param].sum()) for s in members) / sum(s.numel for s in members)
            for u, members in units.items()
        }

        def plan(lam: float, extra: float) -> dict[str, int]:
            return {
                u: max(
                    1,
                    min(
                        size[u],
                        math.ceil(min(1.0, lam * density[u]) * size[u])
                        + math.ceil(extra * size[u]),
                    ),
                )
                for u in size
            }

        def kept(k: dict[str, int]) -> int:
            total = 0
            for site in session.sites:
                per_row = site.numel // site.shape[site.out_axis]
                if site.name in in_space:
                    unit, factor = in_space[site.name]
                    per_row = per_row // site.shape[site.group_axis] * k[unit] * factor
                total += k[out_unit[site.name]] * per_row
            return total

        # Keep the IMP ticket's weight count (s~ = s, Alg. 2): scale every unit's channel share
        # (its IMP density) by one factor, found by bisection, since removing a channel also
        # removes its consumers' columns.
        budget = sum(int(m.sum()) for m in masks.values())
        lo, hi = 0.0, max(1.0 / max(d, 1e-9) for d in density.values()) if density else 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept(plan(mid, 0.0)) <= budget else (lo, mid)
        k = plan(lo, cfg.refill_extra)
        alive: dict[str, torch.Tensor] = {}
        for u, members in units.items():
            score = sum(scores[s.param].to(torch.float64) for s in members)
            order = torch.argsort(score, descending=True, stable=True)
            keep = torch.zeros(size[u], dtype=torch.bool)
            keep[order[: k[u]]] = True
            alive[u] = keep
        for site in session.sites:  # rows: refill kept channels whole, empty the others
            m = masks[site.param]
            rows = alive[out_unit[site.name]].to(m.device)
            m = site.from_rows(rows[:, None].expand(site.rows(m).shape)).clone()
            if site.name in in_space:  # columns: stop reading removed channels
                unit, factor = in_space[site.name]
                cols = alive[unit].repeat_interleave(factor).to(m.device)
                shape = [1] * m.dim()
                shape[site.group_axis] = -1
                m = m & cols.reshape(shape)
            masks[site.param] = m
        return masks, {
            "refill": True,
            "refill_channels": {u: int(alive[u].sum()) for u in units},
            "removable_channels": sum(int((~alive[u]).sum()) for u in removable),
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
    (``passes/regroup.py``). ``regroup_parts`` (8), ``regroup_density_factor`` (t1 = 1.5: a block
    is 1.5x its part's densest row wide), ``regroup_min_rows`` (16) and ``regroup_block_rows``
    (32) are the authors' values; ``regroup_min_cols`` (8) is nmcompile's. ``regroup_col_fraction``
    (default 0: off) keeps only columns used by at least that share of a part's rows, a reading
    of Alg. 3's t2 that the authors' code does not have."""

    regroup_parts: int = 8
    regroup_min_rows: int = 16
    regroup_min_cols: int = 8
    regroup_col_fraction: float = 0.0
    regroup_density_factor: float = 1.5
    regroup_block_rows: int = 32
    regroup_neighbors: int = 16
    regroup_backend: str = "pymetis"

    def validate(self) -> None:
        super().validate()
        check_int(self, "regroup_parts", 1)
        check_int(self, "regroup_min_rows", 1)
        check_int(self, "regroup_min_cols", 1)
        check_float(self, "regroup_col_fraction", 0.0, 1.0, hi_open=True)
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
    """Regroup every site's mask: (new masks, blocks per site for the block-sparse runtime, each
    site's ``LayerRegroup.summary``). With ``keep_budget`` no layer ends with more weights than
    its mask had (group-aware IMP)."""
    blocks, new, layers = {}, {}, {}
    for site in engine.session.sites:
        mask = masks[site.param]
        m2d = site.rows(mask)  # one row per output channel, whatever the weight's layout
        budget = int(m2d.sum()) if keep_budget else None
        r = regroup_layer(m2d.cpu(), settings, budget=budget)
        new[site.param] = site.from_rows(r.mask).to(mask.device)
        blocks[site.param] = [[b.rows.tolist(), b.cols.tolist()] for b in r.blocks]
        layers[site.param] = r.summary()
    return new, blocks, layers


def _regroup_info(blocks: dict[str, list], layers: dict[str, dict]) -> dict[str, Any]:
    """History facts of one regroup step: blocks, and how many layers formed them."""
    done = sum(1 for s in layers.values() if s["regrouped"])
    return {
        "regrouped": done > 0,
        "regrouped_layers": done,
        "unregrouped_layers": len(layers) - done,
        "blocks": sum(len(b) for b in blocks.values()),
        "_blocks": blocks,
        "_layers": layers,
    }


class _IMPRegroup(_IMP):
    def __init__(self, config: IMPRegroupConfig, *, every_round: bool) -> None:
        super().__init__(config)
        self.config = config
        self.every_round = every_round
        self.regrouped = False
        self.blocks: dict[str, list] = {}
        self.layers: dict[str, dict] = {}
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
            new, blocks, layers = _regroup_all(engine, masks, settings, keep_budget=True)
            info.update(_regroup_info(blocks, layers), _imp=imp)
            return new, info
        if not super().done(engine):
            return super().propose(engine)
        new, blocks, layers = _regroup_all(engine, engine.masks(), settings)
        return new, {**_regroup_info(blocks, layers), "_final": True}

    def accept(self, engine, masks, info):
        self.blocks = info.pop("_blocks", self.blocks)
        self.layers = info.pop("_layers", self.layers)
        imp = info.pop("_imp", None)
        if imp is not None:
            self.imp_masks = imp
        final = info.pop("_final", False)
        if final or (self.every_round and self._imp_target_reached(engine)):
            self.regrouped = True
            if self.layers and not any(s["regrouped"] for s in self.layers.values()):
                warnings.warn(
                    f"{self.config.name}: no layer formed a dense block, so the ticket is IMP's "
                    f"unstructured mask; e.g. `{next(iter(self.layers))}`: "
                    f"{next(iter(self.layers.values()))['reason']}. Lower regroup_min_rows / "
                    "regroup_min_cols for narrow layers",
                    stacklevel=2,
                )

    def done(self, engine):
        return self.regrouped

    def rounds_needed(self, engine):
        if self.every_round:
            return None  # each regroup refills weights inside blocks: the count is data-dependent
        imp = super().rounds_needed(engine)
        return None if imp is None else imp + 1  # the regrouped ticket trains one more round

    def finish(self, engine):
        return {"blocks": self.blocks, "regroup_layers": self.layers}

    def state_dict(self):
        return {
            "regrouped": self.regrouped,
            "blocks": self.blocks,
            "layers": self.layers,
            "imp_masks": self.imp_masks,
        }

    def load_state_dict(self, state):
        self.regrouped = bool(state["regrouped"])
        self.blocks = state["blocks"]
        self.layers = state.get("layers", {})
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
