"""``check_nm``: the N:M invariant over a GraphModule's sites.

On a masked graph the effective weight is ``weight * mask``; on a finalized graph it is the weight
itself. A site satisfies ``n:m`` when no group of ``m`` consecutive weights along its reduction axis
holds more than ``n`` nonzeros. ``strict=True`` (masked graphs only) also requires every group's
*mask* to keep exactly ``n`` — the end state of mIMP and LBC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from nmcompile._errors import NMViolationError
from nmcompile._pattern import NMPattern, nm_group_counts

from .find_sites import get_sites
from .insert_masks import mask_value, masked_calls

__all__ = ["NMCheckEntry", "NMCheckReport", "check_nm", "nm_invariant"]


@dataclass(frozen=True)
class NMCheckEntry:
    param: str
    shape: tuple[int, ...]
    groups: int
    violations: int  # groups with more than n nonzeros
    inexact: int  # groups whose mask keeps other than exactly n (strict mode), else 0
    density: float  # nonzero fraction of the effective weight

    @property
    def ok(self) -> bool:
        return self.violations == 0 and self.inexact == 0


@dataclass(frozen=True)
class NMCheckReport:
    pattern: NMPattern
    entries: tuple[NMCheckEntry, ...]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    @property
    def failing(self) -> list[NMCheckEntry]:
        return [e for e in self.entries if not e.ok]

    def summary(self) -> str:
        bad = self.failing
        head = f"{len(self.entries) - len(bad)}/{len(self.entries)} weights satisfy {self.pattern}"
        if not bad:
            return head
        worst = ", ".join(
            f"{e.param} ({e.violations} of {e.groups} groups over {self.pattern.n}"
            + (f", {e.inexact} not exactly {self.pattern.n}" if e.inexact else "")
            + ")"
            for e in bad[:5]
        )
        return f"{head}; failing: {worst}"


_Effective = tuple[torch.Tensor, torch.Tensor | None, int]  # weight, mask, group axis


def _effective_weights(gm: fx.GraphModule) -> dict[str, _Effective]:
    out: dict[str, _Effective] = {}
    for call in masked_calls(gm):
        if call.site.param in out:
            continue
        w = gm.get_parameter(call.site.param).detach()
        mask = mask_value(gm, call)
        out[call.site.param] = (w * mask, mask, call.site.group_axis)
    if not out:  # finalized graph: the sites' weights themselves
        for site in get_sites(gm):
            out[site.param] = (gm.get_parameter(site.param).detach(), None, site.group_axis)
    return out


def check_nm(gm: fx.GraphModule, pattern: NMPattern, *, strict: bool = False) -> NMCheckReport:
    """Check every site of ``gm`` against ``pattern`` and return a per-weight report."""
    entries = []
    with torch.no_grad():
        for param, (w, mask, axis) in _effective_weights(gm).items():
            counts = nm_group_counts(w, pattern.m, axis=axis)
            inexact = 0
            if strict and mask is not None:
                inexact = int((nm_group_counts(mask, pattern.m, axis=axis) != pattern.n).sum())
            entries.append(
                NMCheckEntry(
                    param=param,
                    shape=tuple(w.shape),
                    groups=counts.numel(),
                    violations=int((counts > pattern.n).sum()),
                    inexact=inexact,
                    density=float((w != 0).sum()) / max(w.numel(), 1),
                )
            )
    return NMCheckReport(pattern, tuple(entries))


def nm_invariant(pattern: NMPattern, *, strict: bool = False):
    """An invariant for ``run_passes``: raises ``NMViolationError`` when ``check_nm`` fails."""

    def nm_invariant(gm: fx.GraphModule) -> None:
        report = check_nm(gm, pattern, strict=strict)
        if not report.ok:
            raise NMViolationError(report.summary())

    return nm_invariant
