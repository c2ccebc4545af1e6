"""``regroup``: turn an unstructured mask into dense blocks (Structure-LTH, §3.3 and Alg. 3).

Per layer, the mask is viewed as ``[rows = output channels, cols = C_in * kh * kw]`` (a site's
``rows``: a ``[in, out]`` weight is read along its output axis). Only rows with at least one
weight take part, as in the authors' code.

1. Row graph. The authors partition a hypergraph (rows are vertices, each column a hyperedge over
   the rows that use it) with hMETIS. pymetis partitions plain graphs, so rows are joined by the
   Jaccard similarity of their supports, ``|a & b| / |a | b|``, keeping each row's ``neighbors``
   strongest edges (made symmetric), with integer weights ``1 + round(1000 * J)``.
2. pymetis splits the rows into parts of similar size (seeded, so it is repeatable; imbalance
   10%, as the authors ran hMETIS). The number of parts is ``parts`` (8, the authors' setting)
   where the layer is wide enough, and fewer where it is not: a part needs more than
   ``min_rows`` rows to form a block, so ``R`` rows get ``min(parts, R // (min_rows + 1))``
   parts (a 64-channel conv: 3 parts of ~21 rows; with 8 it would get parts of 8 rows, all
   dropped). With ``backend="kahypar"`` (the ``kahypar`` package installed) the rows are
   partitioned as the authors do instead: a true hypergraph, one net per column over the rows
   using it, minimising the connectivity (km1) objective with KaHyPar's direct k-way mode,
   imbalance 3%. The configuration is nmcompile's own (``_KAHYPAR_INI``; the wheel ships none):
   no sparsifier or community detection, multilevel coarsening, a pool of recursive-bisection
   initial partitions, k-way FM refinement without flows — fast enough for every layer of a
   resnet.
3. Block of a part (the authors' code, ``regroup`` in their ``pruning_utils.py``). The part's
   columns are sorted by how many of its rows use them (most first, ties by column index); the
   block takes the first ``w = min(U, ceil(density_factor * d_max))`` of them, where ``d_max``
   is the weight count of the part's densest row, ``density_factor`` is the authors' ``t1 = 1.5``
   and ``U`` the number of columns the part uses at all (a column none of its rows uses would
   only add zeros). A block is *found* when the part has more than ``min_rows`` rows (the
   authors' ``B2 = 16``) and ``w >= min_cols``. The block is dense: every weight of the ticket
   outside it is dropped and every zero inside it becomes a weight ("refilled"). A block row
   gets up to ``density_factor`` times as many columns as the part's densest row has weights, so
   the layer's density goes *up*, as in Table A4 (after 5 IMP rounds, 0.8^5 = 32.8% of the
   weights, the regrouped ticket holds 58.54%). Blocks taller than ``block_rows`` are split into
   a multiple of ``block_rows`` plus the remainder (the row tiling of the authors' GEMM kernel).
4. "While a dense block can be found" (Alg. 3, line 1). Blocks of a layer must have disjoint row
   sets (one GEMM per row set, in the authors' kernel and in the block-sparse runtime); a second
   block over rows that already have one, on other columns, is the same as a wider first block.
   So each pass partitions the rows that have weights and no block yet, and forms a block in each
   part where one is found; the next pass takes the rows left over (parts of ``min_rows`` rows or
   fewer, parts with fewer than ``min_cols`` usable columns). The loop stops after a pass that
   finds no block, or when ``min_rows`` or fewer such rows remain; every pass that goes on has
   put more than ``min_rows`` rows into blocks, so it ends.
5. The new mask is 1 inside blocks and 0 outside (Alg. 3, line 12): rows left without a block lose
   their weights. A layer where no block is found keeps the ticket's mask and is reported as not
   regrouped, with the reason (``LayerRegroup.reason``; ``gm.meta["nm_regroup"]``): e.g. a layer
   of ``min_rows`` rows or fewer can never form one.

``col_fraction`` (default 0: off) keeps only columns used by at least that share of the part's
rows — one reading of Alg. 3's line 5 ("columns that have no less than t2 non-zero items"). The
paper gives no value for t2 and the authors' code has no such filter. With the share nmcompile
used before (0.5) a 20%-dense ticket has few such columns: narrow blocks or none, and the density
falls where Table A4's rises.

What to expect: on the convs of a resnet50 pruned to 20% density by global magnitude (the masks
of ``benchmarks/regroup_speed.py``) the default regroup ends at 34% density and keeps 67% of the
ticket's weights. On random masks at 20% density (64x576 to
256x2304) it ends at ~33% and keeps about half (so does the authors' code): without row or column
structure a block of ``1.5 * d_max`` columns holds little more than its share of the ticket. A
larger ``density_factor`` keeps more of the ticket, in wider blocks.

Parts never share rows, so the blocks of a layer have disjoint row sets, which is what the
block-sparse runtime relies on.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from nmcompile._errors import NMCompileError

from ._infra import PassResult
from .find_sites import get_sites

__all__ = [
    "Block",
    "LayerRegroup",
    "RegroupSettings",
    "block_columns",
    "hypergraph_partition",
    "parts_for",
    "regroup",
    "regroup_layer",
    "regroup_mask",
    "row_graph",
]


@dataclass(frozen=True)
class RegroupSettings:
    """Options of :func:`regroup` (see the module docstring). ``density_factor`` is the authors'
    ``t1``: a block is ``ceil(density_factor * d_max)`` columns wide, ``d_max`` the weight count
    of its part's densest row. ``col_fraction`` > 0 keeps only columns used by at least that share
    of a part's rows (a reading of Alg. 3's t2; not in the authors' code; 0 turns it off)."""

    parts: int = 8
    min_rows: int = 16
    min_cols: int = 8
    col_fraction: float = 0.0
    density_factor: float = 1.5
    block_rows: int = 32
    neighbors: int = 16
    seed: int = 0
    backend: str = "pymetis"  # or "kahypar"

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise NMCompileError(
                f"regroup backend must be one of {list(_BACKENDS)}, got {self.backend!r}"
            )
        if not 0.0 <= self.col_fraction < 1.0:
            raise NMCompileError(
                f"RegroupSettings.col_fraction must be in [0, 1), got {self.col_fraction!r}"
            )
        if self.density_factor < 1.0:
            raise NMCompileError(
                f"RegroupSettings.density_factor must be >= 1 (a block at least as wide as its "
                f"densest row), got {self.density_factor!r}"
            )


_BACKENDS = ("pymetis", "kahypar")


@dataclass(frozen=True)
class Block:
    rows: torch.Tensor  # long, sorted
    cols: torch.Tensor  # long, sorted


@dataclass(frozen=True)
class LayerRegroup:
    """What :func:`regroup_layer` did to one ``[rows, cols]`` mask.

    ``reason`` is ``None`` when at least one block was found (``regrouped``); otherwise it says
    why not, and ``mask`` is the ticket's mask unchanged. ``ticket``: weights of the input mask;
    ``kept``: those of them inside blocks; ``weights``: weights of ``mask``; ``passes``: how many
    partition passes ran (module docstring, step 4)."""

    mask: torch.Tensor
    blocks: list[Block]
    reason: str | None
    ticket: int
    kept: int
    weights: int
    passes: int

    @property
    def regrouped(self) -> bool:
        return bool(self.blocks)

    def summary(self) -> dict:
        """JSON-ready counts (no tensors)."""
        return {
            "regrouped": self.regrouped,
            "reason": self.reason,
            "blocks": len(self.blocks),
            "ticket": self.ticket,
            "kept": self.kept,
            "weights": self.weights,
            "passes": self.passes,
        }


def _pymetis():
    try:
        import pymetis
    except ImportError as exc:
        raise NMCompileError(
            "regrouping needs pymetis (pip install pymetis); it is a dependency of nmcompile, so "
            "install nmcompile with its dependencies"
        ) from exc
    return pymetis


def row_graph(mask2d: torch.Tensor, neighbors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (xadj, adjncy, eweights) of the Jaccard row graph, each row's strongest edges kept.
    ``mask2d``: bool or 0/1 float."""
    from scipy import sparse

    m = mask2d.to(torch.float32)
    rows = m.shape[0]
    inter = m @ m.T
    nnz = m.sum(1)
    union = nnz[:, None] + nnz[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    jac.fill_diagonal_(0)
    k = min(neighbors, rows - 1)
    if k <= 0:
        return np.zeros(rows + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    val, idx = jac.topk(k, dim=1)
    keep = val > 0
    r = torch.arange(rows)[:, None].expand_as(idx)[keep].numpy()
    c = idx[keep].numpy()
    w = (1 + torch.round(val[keep] * 1000)).to(torch.int64).numpy()
    a = sparse.csr_matrix((w, (r, c)), shape=(rows, rows))
    a = a.maximum(a.T).tocsr()
    a.sort_indices()
    return a.indptr.astype(np.int64), a.indices.astype(np.int64), a.data.astype(np.int64)


# KaHyPar options (the names of its command-line flags); values chosen for speed on the small
# hypergraphs of one layer (hundreds to thousands of rows), see the module docstring.
_KAHYPAR_OPTIONS = {
    "mode": "direct",
    "objective": "km1",
    "seed": "0",
    "cmaxnet": "-1",
    "vcycles": "0",
    "p-use-sparsifier": "false",
    "p-detect-communities": "false",
    "p-reuse-communities": "false",
    "p-max-louvain-pass-iterations": "100",
    "p-min-eps-improvement": "0.0001",
    "p-louvain-edge-weight": "hybrid",
    "p-large-he-threshold": "1000",
    "p-smallest-maxnet-threshold": "50000",
    "p-maxnet-removal-factor": "0.01",
    "c-type": "ml_style",
    "c-s": "1",
    "c-t": "160",
    "c-rating-score": "heavy_edge",
    "c-rating-use-communities": "false",
    "c-rating-heavy_node_penalty": "no_penalty",
    "c-rating-acceptance-criterion": "best_prefer_unmatched",
    "c-fixed-vertex-acceptance-criterion": "fixed_vertex_allowed",
    "i-mode": "recursive",
    "i-technique": "multi",
    "i-c-type": "ml_style",
    "i-c-s": "1",
    "i-c-t": "150",
    "i-c-rating-score": "heavy_edge",
    "i-c-rating-use-communities": "false",
    "i-c-rating-heavy_node_penalty": "no_penalty",
    "i-c-rating-acceptance-criterion": "best_prefer_unmatched",
    "i-c-fixed-vertex-acceptance-criterion": "fixed_vertex_allowed",
    "i-algo": "pool",
    "i-runs": "5",
    "i-bp-algorithm": "worst_fit",
    "i-bp-heuristic-prepacking": "false",
    "i-bp-early-restart": "true",
    "i-bp-late-restart": "true",
    "i-r-type": "twoway_fm",
    "i-r-runs": "-1",
    "i-r-fm-stop": "simple",
    "i-r-fm-stop-i": "50",
    "r-type": "kway_fm_km1",
    "r-runs": "-1",
    "r-fm-stop": "adaptive_opt",
    "r-fm-stop-alpha": "1",
    "r-fm-stop-i": "350",
    "r-flow-execution-policy": "exponential",
}
_kahypar_ini: str | None = None


def _kahypar():
    try:
        import kahypar
    except ImportError as exc:
        raise NMCompileError(
            "regroup backend 'kahypar' needs the kahypar package: pip install kahypar (or "
            "nmcompile[kahypar]); or use the default backend 'pymetis'"
        ) from exc
    return kahypar


def _kahypar_config_path() -> str:
    global _kahypar_ini
    if _kahypar_ini is None or not os.path.exists(_kahypar_ini):
        fd, path = tempfile.mkstemp(prefix="nmcompile-kahypar-", suffix=".ini")
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{k}={v}\n" for k, v in _KAHYPAR_OPTIONS.items()))
        _kahypar_ini = path
    return _kahypar_ini


def hypergraph_partition(mask2d: torch.Tensor, parts: int, seed: int = 0) -> np.ndarray:
    """Rows of ``mask2d`` in ``parts`` parts by KaHyPar (km1), one net per column of >= 2 rows."""
    kp = _kahypar()
    rows = mask2d.shape[0]
    m = mask2d.to(torch.bool)
    counts = m.sum(0)
    used = m[:, counts >= 2]  # nets of one pin cut nothing
    if used.shape[1] == 0:
        return np.arange(rows) % parts
    cols_major = used.T.contiguous()  # [nets, rows]
    net_idx, pin = cols_major.nonzero(as_tuple=True)
    sizes = torch.bincount(net_idx, minlength=cols_major.shape[0])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    nets = cols_major.shape[0]
    hg = kp.Hypergraph(rows, nets, offsets.tolist(), pin.tolist(), parts, [1] * nets, [1] * rows)
    ctx = kp.Context()
    ctx.loadINIconfiguration(_kahypar_config_path())
    ctx.setK(parts)
    ctx.setEpsilon(0.03)
    ctx.setSeed(seed)
    ctx.suppressOutput(True)
    kp.partition(hg, ctx)
    return np.fromiter((hg.blockID(i) for i in range(rows)), dtype=np.int64, count=rows)


def parts_for(rows: int, s: RegroupSettings) -> int:
    """Parts for a layer of ``rows`` rows: ``s.parts``, fewer when parts would be too small to
    hold a block (see the module docstring)."""
    return max(1, min(s.parts, rows // (s.min_rows + 1)))


def _partition(mask2d: torch.Tensor, s: RegroupSettings) -> np.ndarray:
    rows = mask2d.shape[0]
    parts = parts_for(rows, s)
    if parts <= 1:
        return np.zeros(rows, dtype=np.int64)
    if s.backend == "kahypar":
        return hypergraph_partition(mask2d, parts, s.seed)
    xadj, adjncy, eweights = row_graph(mask2d, s.neighbors)
    if len(adjncy) == 0:  # no two rows share a column: any split is as good
        return np.arange(rows) % parts
    pm = _pymetis()
    # ufactor: allowed imbalance in 1/1000 (100 = 10%, the authors' hMETIS imbalance)
    options = pm.Options(seed=s.seed, ufactor=100) if hasattr(pm, "Options") else None
    if hasattr(pm, "CSRAdjacency"):
        adjacency = pm.CSRAdjacency(adj_starts=xadj.tolist(), adjacent=adjncy.tolist())
        result = pm.part_graph(
            parts, adjacency=adjacency, eweights=eweights.tolist(), options=options
        )
    else:  # pymetis < 2025
        result = pm.part_graph(
            parts, xadj=xadj.tolist(), adjncy=adjncy.tolist(), eweights=eweights.tolist()
        )
    membership = getattr(result, "vertex_part", None)
    if membership is None:
        membership = result[1]
    return np.asarray(membership, dtype=np.int64)


def block_columns(part: torch.Tensor, s: RegroupSettings) -> torch.Tensor:
    """The columns of the block of one part (``part``: its rows of the mask, ``[r, cols]``): the
    ``min(U, ceil(density_factor * d_max))`` columns its rows use most (module docstring, step
    3), sorted. May be fewer than ``s.min_cols``: then the part forms no block."""
    p = part.to(torch.float32)
    return _columns(p.sum(0), float(p.sum(1).max()), part.shape[0], s)


def _columns(count: torch.Tensor, d_max: float, rows: int, s: RegroupSettings) -> torch.Tensor:
    """:func:`block_columns` from the part's column counts and its densest row's count."""
    eligible = count > 0
    if s.col_fraction > 0:
        eligible &= count >= s.col_fraction * rows
    width = min(int(eligible.sum()), math.ceil(s.density_factor * d_max))
    if width <= 0:
        return torch.zeros(0, dtype=torch.long)
    # eligible columns have the largest counts, so they come first; ties by column index
    order = torch.argsort(count, descending=True, stable=True)
    return torch.sort(order[:width]).values


def _split_rows(rows: torch.Tensor, block_rows: int) -> list[torch.Tensor]:
    """A multiple of ``block_rows`` rows, then the remainder (the authors' GEMM tiling)."""
    split = len(rows) - len(rows) % block_rows if len(rows) > block_rows else len(rows)
    return [chunk for chunk in (rows[:split], rows[split:]) if len(chunk)]


def _blocks(
    mf: torch.Tensor, membership: np.ndarray, s: RegroupSettings
) -> tuple[list[Block], list[str]]:
    """(blocks, why each part without one has none) for one partition of the rows of ``mf`` (the
    mask as 0/1 float)."""
    found: list[Block] = []
    misses: list[str] = []
    member = torch.from_numpy(membership)
    parts, member = torch.unique(member, return_inverse=True)
    onehot = torch.zeros(len(parts), mf.shape[0])
    onehot[member, torch.arange(mf.shape[0])] = 1.0
    counts = onehot @ mf  # [parts, cols]: how many of a part's rows use each column
    nnz = mf.sum(1)
    for p in range(len(parts)):
        rows = (member == p).nonzero().flatten()
        if len(rows) <= s.min_rows:
            misses.append(f"a part of {len(rows)} rows (min_rows={s.min_rows})")
            continue
        cols = _columns(counts[p], float(nnz[rows].max()), len(rows), s)
        if len(cols) < s.min_cols:
            misses.append(f"{len(cols)} block columns (min_cols={s.min_cols})")
            continue
        found += [Block(chunk, cols) for chunk in _split_rows(rows, s.block_rows)]
    return found, misses


def _trim(mask2d: torch.Tensor, found: list[Block], budget: int, min_cols: int) -> list[Block]:
    """Drop the block columns the old mask filled least until the blocks hold <= ``budget``."""
    cols = {i: set(b.cols.tolist()) for i, b in enumerate(found)}
    fill = []
    for i, b in enumerate(found):
        ratio = mask2d[b.rows][:, b.cols].float().mean(0)
        fill += [(float(r), i, int(c)) for r, c in zip(ratio, b.cols)]
    total = sum(len(b.rows) * len(b.cols) for b in found)
    for _, i, c in sorted(fill):
        if total <= budget:
            break
        if i not in cols:
            continue
        rows = len(found[i].rows)
        if len(cols[i]) - 1 < min_cols:  # too thin to stay a block: drop it
            total -= rows * len(cols.pop(i))
            continue
        cols[i].remove(c)
        total -= rows
    return [
        Block(found[i].rows, torch.tensor(sorted(c), dtype=torch.long)) for i, c in cols.items()
    ]


def regroup_layer(
    mask2d: torch.Tensor,
    settings: RegroupSettings = RegroupSettings(),
    *,
    budget: int | None = None,
) -> LayerRegroup:
    """Regroup one ``[rows, cols]`` mask (see the module docstring).

    ``budget``: at most this many weights inside the blocks (group-aware IMP keeps IMP's count);
    the columns the old mask filled least leave their blocks first.
    """
    if mask2d.dim() != 2:
        raise ValueError(f"regroup_layer takes a 2-D mask, got shape {tuple(mask2d.shape)}")
    s = settings
    mask2d = mask2d.to(torch.bool)
    mf = mask2d.to(torch.float32)  # counts as float sums: torch sums bools slowly
    ticket = int(torch.count_nonzero(mask2d))
    has_weights = mf.sum(1) > 0
    remaining = has_weights.nonzero().flatten()  # rows with weights and no block yet
    found: list[Block] = []
    misses: list[str] = []
    passes = 0
    while len(remaining) > s.min_rows:
        passes += 1
        sub = mf[remaining]
        new, misses = _blocks(sub, _partition(sub, s), s)
        if not new:
            break
        new = [Block(remaining[b.rows], b.cols) for b in new]
        found += new
        taken = torch.zeros(mask2d.shape[0], dtype=torch.bool)
        for b in new:
            taken[b.rows] = True
        remaining = remaining[~taken[remaining]]
    if not found:
        rows = int(has_weights.sum())
        if rows == 0:
            reason = "no weights"
        elif rows <= s.min_rows:
            reason = (
                f"{rows} rows with weights, not more than min_rows={s.min_rows}: too few to form "
                "a block"
            )
        else:
            reason = "no part formed a block: " + ", ".join(sorted(set(misses)))
        return LayerRegroup(mask2d.clone(), [], reason, ticket, ticket, ticket, passes)
    if budget is not None:
        found = _trim(mask2d, found, budget, s.min_cols)
        if not found:
            reason = f"every block was trimmed away to keep the budget of {budget} weights"
            return LayerRegroup(mask2d.clone(), [], reason, ticket, ticket, ticket, passes)
    new_mask = torch.zeros_like(mask2d)
    true = torch.ones((), dtype=torch.bool)
    for b in found:
        new_mask.index_put_((b.rows[:, None], b.cols[None, :]), true)
    kept = int(torch.count_nonzero(new_mask & mask2d))
    weights = int(torch.count_nonzero(new_mask))
    return LayerRegroup(new_mask, found, None, ticket, kept, weights, passes)


def regroup_mask(
    mask2d: torch.Tensor,
    settings: RegroupSettings = RegroupSettings(),
    *,
    budget: int | None = None,
) -> tuple[torch.Tensor, list[Block]]:
    """(new mask, blocks) of :func:`regroup_layer`: no blocks and the old mask when none formed."""
    r = regroup_layer(mask2d, settings, budget=budget)
    return r.mask, r.blocks


def regroup(gm: fx.GraphModule, settings: RegroupSettings = RegroupSettings()) -> PassResult:
    """Regroup every masked site of ``gm`` in place. Blocks go to ``gm.meta["nm_blocks"]`` and
    each layer's :meth:`LayerRegroup.summary` (regrouped or not, and why) to
    ``gm.meta["nm_regroup"]``."""
    blocks: dict[str, list[Block]] = {}
    report: dict[str, dict] = {}
    modified = False
    with torch.no_grad():
        for site in get_sites(gm):
            owner = gm.get_submodule(site.owner)
            mask = getattr(owner, f"{site.attr}_mask", None)
            if mask is None:
                continue
            m2d = site.rows(mask).cpu()  # one row per output channel
            r = regroup_layer(m2d, settings)
            blocks[site.param] = r.blocks
            report[site.param] = r.summary()
            if r.regrouped and not torch.equal(r.mask, m2d):
                mask.copy_(site.from_rows(r.mask).to(mask.device))
                modified = True
    gm.meta["nm_blocks"] = blocks
    gm.meta["nm_regroup"] = report
    return PassResult(gm, modified)
