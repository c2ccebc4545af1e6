"""``regroup``: turn an unstructured mask into dense blocks (Structure-LTH, Alg. 3).

Per layer, the mask is viewed as ``[rows = output channels, cols = C_in * kh * kw]``.

1. Row graph. The authors partition a hypergraph (rows are vertices, each column a hyperedge over
   the rows that use it) with hMETIS. pymetis partitions plain graphs, so rows are joined by the
   Jaccard similarity of their supports, ``|a & b| / |a | b|``, keeping each row's ``neighbors``
   strongest edges (made symmetric), with integer weights ``1 + round(1000 * J)``.
2. pymetis splits the rows into parts of similar size (seeded, so it is repeatable; imbalance
   10%, as the authors ran hMETIS). The number of parts is ``parts`` (8, the authors' setting)
   where the layer is wide enough, and fewer where it is not: a part needs more than
   ``min_rows`` rows to form a block, so a layer of ``R`` rows gets
   ``min(parts, R // (min_rows + 1))`` parts (a 64-channel conv: 3 parts of ~21 rows; with 8 it
   would get parts of 8 rows, all dropped). A layer of ``min_rows`` rows or fewer keeps its mask.
   With ``backend="kahypar"`` (the ``kahypar`` package installed) the rows are partitioned as
   the authors do instead: a true hypergraph, one net per column over the rows using it,
   minimising the connectivity (km1) objective with KaHyPar's direct k-way mode, imbalance 3%.
   The configuration is nmcompile's own (``_KAHYPAR_INI``; the wheel ships none): no sparsifier
   or community detection, multilevel coarsening, a pool of recursive-bisection initial
   partitions, k-way FM refinement without flows — fast enough for every layer of a resnet.
3. Per part with more than ``min_rows`` rows: columns used by at least ``col_fraction`` of the
   part's rows are candidates, ranked by how many rows use them; the block keeps the top ones, at
   most ``density_factor`` times the part's mean nonzeros per row; a block needs ``min_cols``
   columns. Blocks taller than ``block_rows`` are split into a multiple of ``block_rows`` plus the
   remainder (the row tiling the authors' GEMM kernel uses).
4. The new mask is 1 inside blocks (pruned weights there come back: refilled) and 0 outside. When
   no block is found the old mask stays.

Algorithm 3 repeats "while a dense block can be found". Here each layer is partitioned once and
every part yields at most one block: a second pass over the same rows would give blocks whose
rows overlap the first ones, which neither the authors' kernel nor the block-sparse runtime can
run (one GEMM per row set), and the rows of dropped parts are too few to form blocks again.

Parts never share rows, so the blocks of a layer have disjoint row sets, which is what the
block-sparse runtime relies on.
"""

from __future__ import annotations

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
    "RegroupSettings",
    "hypergraph_partition",
    "parts_for",
    "regroup",
    "regroup_mask",
    "row_graph",
]


@dataclass(frozen=True)
class RegroupSettings:
    parts: int = 8
    min_rows: int = 16
    min_cols: int = 8
    col_fraction: float = 0.5
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


_BACKENDS = ("pymetis", "kahypar")


@dataclass(frozen=True)
class Block:
    rows: torch.Tensor  # long, sorted
    cols: torch.Tensor  # long, sorted


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
    """CSR (xadj, adjncy, eweights) of the Jaccard row graph, each row's strongest edges kept."""
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


def _blocks(mask2d: torch.Tensor, membership: np.ndarray, s: RegroupSettings) -> list[Block]:
    found = []
    member = torch.from_numpy(membership)
    for p in torch.unique(member).tolist():
        rows = (member == p).nonzero().flatten()
        if len(rows) <= s.min_rows:
            continue
        sub = mask2d[rows]
        count = sub.sum(0)
        candidates = (count >= s.col_fraction * len(rows)).nonzero().flatten()
        if len(candidates) < s.min_cols:
            continue
        cap = round(s.density_factor * float(sub.sum(1).float().mean()))
        order = torch.argsort(count[candidates], descending=True, stable=True)
        cols = candidates[order[: max(cap, 0)]]
        if len(cols) < s.min_cols:
            continue
        cols = torch.sort(cols).values
        split = len(rows) - len(rows) % s.block_rows if len(rows) > s.block_rows else len(rows)
        for chunk in (rows[:split], rows[split:]):
            if len(chunk):
                found.append(Block(chunk, cols))
    return found


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


def regroup_mask(
    mask2d: torch.Tensor,
    settings: RegroupSettings = RegroupSettings(),
    *,
    budget: int | None = None,
) -> tuple[torch.Tensor, list[Block]]:
    """(new mask, blocks) for one ``[rows, cols]`` bool mask (see the module docstring).

    ``budget``: at most this many weights inside the blocks (group-aware IMP keeps IMP's count);
    the columns the old mask filled least leave their blocks first.
    """
    if mask2d.dim() != 2:
        raise ValueError(f"regroup_mask takes a 2-D mask, got shape {tuple(mask2d.shape)}")
    mask2d = mask2d.to(torch.bool)
    membership = _partition(mask2d, settings)
    found = _blocks(mask2d, membership, settings)
    if found and budget is not None:
        found = _trim(mask2d, found, budget, settings.min_cols)
    if not found:
        return mask2d.clone(), []
    new = torch.zeros_like(mask2d)
    for b in found:
        new[b.rows[:, None], b.cols[None, :]] = True
    return new, found


def regroup(gm: fx.GraphModule, settings: RegroupSettings = RegroupSettings()) -> PassResult:
    """Regroup every masked site of ``gm`` in place; blocks go to ``gm.meta["nm_blocks"]``."""
    blocks: dict[str, list[Block]] = {}
    modified = False
    with torch.no_grad():
        for site in get_sites(gm):
            owner = gm.get_submodule(site.owner)
            mask = getattr(owner, f"{site.attr}_mask", None)
            if mask is None:
                continue
            m2d = site.rows(mask).cpu()  # one row per output channel
            new, found = regroup_mask(m2d, settings)
            blocks[site.param] = found
            if found and not torch.equal(new, m2d):
                mask.copy_(site.from_rows(new).to(mask.device))
                modified = True
    gm.meta["nm_blocks"] = blocks
    return PassResult(gm, modified)
