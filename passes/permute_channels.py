"""``permute_channels``: reorder channels so that magnitude N:M keeps more of the weights.

N:M groups are M consecutive input channels of a layer. Which channels share a group is an
accident of training; reordering the input channels of a layer, and with them the output channels
of the layers that produce them and everything tied to those channels, gives the same function
and other groups. This pass does it per *channel space* of the channel dependency graph
(``channel_graph``): a permutation ``p`` of a space's C channels is applied to

- every producer's output rows (weight and bias),
- every channel-wise module in the space (BatchNorm weight, bias, running mean and variance; a
  depthwise conv's filters and bias),
- every consumer's input channels (a conv's or linear's input axis; behind a ``flatten``, the
  consumer's blocks of ``H*W`` input features),
- the bool masks of pruned sites, on the same axes,

so the permuted model computes what it computed before (checked on the example inputs; the
largest difference is reported). Residual adds tie their operands into one space, so every layer
of a residual stream moves together; a space the graph *pins* (it reaches the network input or
output, a concatenation or an op the graph does not know) is left as it is, with the reason.

*The search* (apex's channel-swap search, bounded): starting from the identity it scores every
swap of two channels in different groups at once. For channel position ``a`` in group ``A`` and
any channel ``b``, the magnitude group ``A`` keeps with ``b`` in ``a``'s place is
``sum_rows [top_n(others) + relu(|w_b| - nth(others))]``, so the gain of all ``C^2`` swaps is one
batched tensor expression over ``[C, C, rows]`` (chunked), with the rows of every N:M consumer of
the space stacked. The best swaps whose groups do not overlap are applied together, and the
search repeats until no swap gains or ``max_iterations``. Cost per iteration: ``C^2 * rows``
multiply-adds. The objective is the magnitude N:M keeps (|w| summed over kept entries), the
criterion of magnitude ASP.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ._infra import PassError
from .channel_graph import ChannelGraph, ChannelSpace, build_channel_graph
from .find_sites import PrunableSite, get_sites

__all__ = ["apply_permutation", "permute_channels", "retained", "search_permutation"]


def retained(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-row magnitude N:M keeps of ``a`` ``[rows, C]`` (non-negative), groups of ``m``
    consecutive columns: ``[rows]``."""
    rows, c = a.shape
    return a.reshape(rows, c // m, m).topk(n, dim=2).values.sum((1, 2))


def _stats(a: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column position ``p`` (in group ``A``): the n-th largest entry of ``A`` without ``p``
    per row (``[C, rows]``), and what ``A`` keeps less without ``p`` and nothing in its place
    (``[C]``)."""
    rows, c = a.shape
    g = c // m
    grp = a.reshape(rows, g, m)
    full = grp.topk(n, dim=2).values.sum(2)  # [rows, G]
    idx = torch.arange(m, device=a.device)
    others = torch.stack([grp[:, :, idx != i] for i in range(m)], dim=2)  # [rows, G, m, m-1]
    top = others.topk(n, dim=3).values
    t_sum = top.sum(3).reshape(rows, c)
    t_nth = top[..., -1].reshape(rows, c)
    base = (t_sum - full.repeat_interleave(m, dim=1)).sum(0)
    return t_nth.T.contiguous(), base


def _replace_gain(tt: torch.Tensor, at: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``d[p, q]``: what position ``p``'s group keeps more with column ``q`` in ``p``'s place.
    Putting ``q`` in gains ``sum_rows relu(|w_q| - nth_p)``, which is ``(sum |w_q| - sum nth_p
    + ||w_q - nth_p||_1) / 2``: one L1 distance matrix (``cdist``), no ``[C, C, rows]`` tensor."""
    d = torch.cdist(tt.unsqueeze(0), at.unsqueeze(0), p=1)[0]
    d += at.sum(1).unsqueeze(0) - tt.sum(1).unsqueeze(1)
    d *= 0.5
    d += base.unsqueeze(1)
    return d


def search_permutation(
    a: torch.Tensor, n: int, m: int, *, max_iterations: int = 100, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A permutation of the columns of ``a`` (``[rows, C]``, magnitudes) that keeps more of it
    under N:M (module docstring): ``(perm, facts)``, ``a[:, perm]`` the permuted matrix.

    The swap gains are ``d[p, q] + d[q, p]`` (``_replace_gain``); after a batch of swaps only the
    rows and columns of ``d`` at the positions of the groups it touched are recomputed."""
    c = a.shape[1]
    perm = torch.arange(c)
    work = a.float().clone()
    before = float(retained(work, n, m).sum())
    current = before
    groups = c // m
    swaps = iterations = 0
    t0 = time.perf_counter()
    tt, base = _stats(work, n, m)
    at = work.T.contiguous()
    d = _replace_gain(tt, at, base)
    same = torch.arange(c) // m
    same = same.unsqueeze(0) == same.unsqueeze(1)
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        gain = (d + d.T).masked_fill_(same, float("-inf"))
        best, order = gain.flatten().topk(min(gain.numel(), 32 * c))
        positive = int((best > eps * max(before, 1e-30)).sum())
        if positive == 0:
            break
        used = [False] * groups
        chosen: list[tuple[int, int]] = []
        # a swap changes two groups only: those of disjoint pairs add up exactly
        for flat in order[:positive].tolist():
            p, q = divmod(flat, c)
            gp, gq = p // m, q // m
            if p < q and not used[gp] and not used[gq]:
                used[gp] = used[gq] = True
                chosen.append((p, q))
                if 2 * len(chosen) + 1 >= groups:
                    break
        ps = torch.tensor([p for p, _ in chosen])
        qs = torch.tensor([q for _, q in chosen])
        trial = work.clone()
        trial[:, ps], trial[:, qs] = work[:, qs], work[:, ps]
        # the gains are float32 differences of sums: keep the batch only if the exact
        # objective went up
        value = float(retained(trial, n, m).sum())
        if value <= current:
            break
        work, current = trial, value
        perm[ps], perm[qs] = perm[qs].clone(), perm[ps].clone()
        swaps += len(chosen)
        touched = torch.tensor([g for g in range(groups) if used[g]])
        s = (touched.unsqueeze(1) * m + torch.arange(m)).reshape(-1)
        tt, base = _stats(work, n, m)
        at = work.T.contiguous()
        d[s] = _replace_gain(tt[s], at, base[s])
        d[:, s] = _replace_gain(tt, at[s], base)
    after = float(retained(work, n, m).sum())
    total = float(a.float().sum()) or 1.0
    return perm, {
        "retained_before": before / total,
        "retained_after": after / total,
        "iterations": iterations,
        "swaps": swaps,
        "seconds": time.perf_counter() - t0,
    }


# -- applying a permutation ------------------------------------------------------------------------
def _index(t: torch.Tensor, axis: int, perm: torch.Tensor, block: int = 1) -> None:
    idx = perm if block == 1 else (perm.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
    with torch.no_grad():
        t.copy_(t.index_select(axis, idx.to(t.device)))


def apply_permutation(
    gm: fx.GraphModule, space: ChannelSpace, perm: torch.Tensor, sites: dict[str, PrunableSite]
) -> None:
    """Reorder the channels of ``space`` by ``perm`` everywhere they live (module docstring)."""
    for name in space.producers:
        mod = gm.get_submodule(name)
        _index(mod.weight, 0, perm)
        if getattr(mod, "bias", None) is not None:
            _index(mod.bias, 0, perm)
        mask = getattr(mod, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            _index(mask, 0, perm)
    for name in space.channelwise:
        mod = gm.get_submodule(name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(mod, attr, None)
            if isinstance(t, torch.Tensor):
                _index(t, 0, perm)
    for cons in space.consumers:
        mod = gm.get_submodule(cons.module)
        _index(mod.weight, 1, perm, cons.factor)
        mask = getattr(mod, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            _index(mask, 1, perm, cons.factor)


def _why_not(gm: fx.GraphModule, space: ChannelSpace, sites: dict[str, PrunableSite], m: int):
    if space.pinned:
        return "pinned: " + "; ".join(space.pinned[:3])
    for name in space.producers + [c.module for c in space.consumers]:
        mod = gm.get_submodule(name)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"{name} is a {type(mod).__name__}, not a conv or linear"
    for name in space.channelwise:
        mod = gm.get_submodule(name)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.weight.shape[1] != 1:
            return f"{name}: a grouped conv"
    pruned = [c for c in space.consumers if c.factor == 1 and f"{c.module}.weight" in sites]
    if not pruned:
        return "no N:M layer reads these channels directly"
    if space.size % m:
        return f"{space.size} channels, not a multiple of {m}"
    return None


def _magnitudes(gm: fx.GraphModule, space: ChannelSpace, sites: dict[str, PrunableSite]):
    """|w| of every N:M consumer of the space as ``[rows, C]`` (input channels last), stacked."""
    parts = []
    for cons in space.consumers:
        site = sites.get(f"{cons.module}.weight")
        if site is None or cons.factor != 1 or site.group_axis != 1:
            continue
        w = gm.get_parameter(site.param).detach().abs().float()
        parts.append(w.movedim(1, -1).reshape(-1, w.shape[1]).cpu())
    return torch.cat(parts, 0)


def permute_channels(
    gm: fx.GraphModule,
    example_inputs: tuple,
    n: int,
    m: int,
    *,
    graph: ChannelGraph | None = None,
    max_iterations: int = 100,
) -> dict[str, Any]:
    """Permute every space of ``gm`` that can be (module docstring); returns the report:
    ``spaces`` (per permuted space: layers, retained magnitude before / after, iterations,
    swaps, seconds), ``layers`` (per N:M layer: retained before / after), ``skipped`` (space ->
    why) and ``max_abs_diff`` of the outputs on ``example_inputs`` before and after."""
    sites = {s.param: s for s in get_sites(gm)}
    if graph is None:
        graph = build_channel_graph(gm, example_inputs)
    was = gm.training
    gm.eval()
    with torch.no_grad():
        before_out = gm(*example_inputs)
    layers_before = _layer_retained(gm, sites, n, m)
    report: dict[str, Any] = {"spaces": [], "skipped": {}, "search": "greedy channel swaps"}
    t0 = time.perf_counter()
    for space in graph.spaces:
        label = ",".join(space.producers)
        why = _why_not(gm, space, sites, m)
        if why is not None:
            report["skipped"][label] = why
            continue
        perm, facts = search_permutation(
            _magnitudes(gm, space, sites), n, m, max_iterations=max_iterations
        )
        if facts["swaps"]:
            apply_permutation(gm, space, perm, sites)
        readers = [c.module for c in space.consumers]
        report["spaces"].append({"producers": space.producers, "readers": readers, **facts})
    layers_after = _layer_retained(gm, sites, n, m)
    report["layers"] = {
        p: {"retained_before": layers_before[p], "retained_after": layers_after[p]}
        for p in layers_before
    }
    report["seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        after_out = gm(*example_inputs)
    gm.train(was)
    diff = _max_diff(before_out, after_out)
    report["max_abs_diff"] = diff
    scale = _max_abs(before_out)
    if diff > 1e-4 * max(1.0, scale):
        raise PassError(
            f"permute_channels: the permuted model's outputs differ from the original's by "
            f"{diff:.3g} (outputs up to {scale:.3g}); a channel tie the graph missed. Run without "
            "permute=True and report the model"
        )
    return report


def _layer_retained(gm, sites: dict[str, PrunableSite], n: int, m: int) -> dict[str, float]:
    out = {}
    for p, site in sites.items():
        if site.group_axis != 1 or site.kind == "matmul":
            continue
        w = gm.get_parameter(p).detach().abs().float()
        rows = w.movedim(1, -1).reshape(-1, w.shape[1])
        if rows.shape[1] % m:
            continue
        out[p] = float(retained(rows, n, m).sum() / rows.sum().clamp_min(1e-30))
    return out


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    return [t for v in getattr(x, "__dict__", {}).values() for t in _leaves(v)]


def _max_diff(a: Any, b: Any) -> float:
    pairs = list(zip(_leaves(a), _leaves(b)))
    return max((float((x - y).abs().max()) for x, y in pairs if x.numel()), default=0.0)


def _max_abs(a: Any) -> float:
    return max((float(x.abs().max()) for x in _leaves(a) if x.numel()), default=0.0)
