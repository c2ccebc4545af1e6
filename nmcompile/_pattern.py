"""N:M patterns and the mask that realises them.

An N:M pattern keeps at most ``n`` nonzeros in every group of ``m`` consecutive weights along the
*reduction* axis of a layer: the input channels ``C`` of a conv weight ``[K, C, R, S]`` (for every
``k, r, s``) and the input features of a linear weight ``[out, in]``. That is the layout sparse
tensor cores, cuSPARSELt and TensorRT read; grouping along the last memory axis of a conv would be
wrong.

``nm_mask(scores, pattern)`` keeps, in each group, the ``n`` largest scores. Ties go to the lower
index, so the mask is a pure function of the scores. NaN scores rank below everything (a NaN
weight is pruned first).

Speed. A tensor ``[K, C, R, S]`` is viewed, without a copy, as ``[K*C/m, m, R*S]``. For ``m <= 16``
each weight's rank in its group comes from the ``m(m-1)/2`` pairwise comparisons between the ``m``
slices of that view (plain elementwise kernels over ``numel/m`` values); a weight is kept when
fewer than ``n`` of its group beat it. For larger ``m`` the ``n``-th largest value of each group is
found with ``topk`` and ties at that threshold are resolved by a cumulative count. Both are exact.
On CPU the view is processed in 4 MiB chunks so the intermediate passes run out of cache;
``benchmarks/mask_speed.py`` measures the result against ``torch.ao``'s sparsifier.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._errors import PatternError

__all__ = ["NMPattern", "group_view", "nm_group_counts", "nm_mask", "nm_violations"]

_MAX_M = 32
_PAIRWISE_MAX_M = 16
_CHUNK = 1 << 20  # elements per CPU chunk (4 MiB of fp32): intermediates stay in cache
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_VALID = "a valid pattern is 'n:m' with integers 0 < n < m <= 32, e.g. '2:4', '1:4', '2:8'"


@dataclass(frozen=True, slots=True)
class NMPattern:
    """Keep at most ``n`` of every ``m`` consecutive weights along the reduction axis.

    >>> p = NMPattern.parse("2:4")
    >>> p, p.density, str(p)
    (NMPattern(n=2, m=4), 0.5, '2:4')
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for field, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PatternError(f"NMPattern.{field} must be an int, got {value!r}; {_VALID}")
        if not 0 < self.n < self.m <= _MAX_M:
            raise PatternError(f"invalid N:M pattern {self.n}:{self.m}; {_VALID}")

    @classmethod
    def parse(cls, spec: str | NMPattern | tuple[int, int]) -> NMPattern:
        """Parse ``"2:4"`` (or pass an ``NMPattern`` / ``(n, m)`` through)."""
        if isinstance(spec, NMPattern):
            return spec
        if isinstance(spec, tuple) and len(spec) == 2:
            return cls(n=spec[0], m=spec[1])
        if not isinstance(spec, str):
            raise PatternError(f"cannot read an N:M pattern from {spec!r}; {_VALID}")
        match = _PATTERN_RE.match(spec)
        if match is None:
            raise PatternError(f"cannot read an N:M pattern from {spec!r}; {_VALID}")
        return cls(n=int(match.group(1)), m=int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def mask(
        self,
        scores: torch.Tensor,
        axis: int = 1,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The N:M mask of ``scores`` (see :func:`nm_mask`)."""
        return nm_mask(scores, self, axis=axis, transform=transform)

    def violations(self, tensor: torch.Tensor, axis: int = 1) -> int:
        """Number of groups of ``tensor`` with more than ``n`` nonzeros."""
        return nm_violations(tensor, self, axis=axis)


def group_view(tensor: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """View ``tensor`` as ``[pre, size(axis)/m, m, post]`` so groups of ``m`` run along ``axis``.

    Raises ``PatternError`` when ``size(axis)`` is not a multiple of ``m``.
    """
    axis = axis % tensor.dim() if tensor.dim() else 0
    if tensor.dim() == 0:
        raise PatternError("a scalar has no reduction axis to group")
    size = tensor.shape[axis]
    if size % m:
        raise PatternError(
            f"axis {axis} of a tensor of shape {tuple(tensor.shape)} has {size} elements, "
            f"not a multiple of m={m}"
        )
    pre = 1
    for d in tensor.shape[:axis]:
        pre *= d
    post = 1
    for d in tensor.shape[axis + 1 :]:
        post *= d
    return tensor.reshape(pre, size // m, m, post)


def nm_mask(
    scores: torch.Tensor,
    pattern: NMPattern,
    axis: int = 1,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Boolean mask keeping the ``pattern.n`` largest ``scores`` of every group of ``pattern.m``.

    Groups run along ``axis`` (1: conv input channels / linear input features). Ties keep the lower
    index; NaN ranks lowest. Exactly ``n`` entries per group are True. ``transform`` (e.g.
    ``torch.abs``) is applied to the scores chunk by chunk, which saves a full pass over memory
    compared with transforming the whole tensor first.

    >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    >>> nm_mask(w, NMPattern(2, 4), transform=torch.abs).int().tolist()
    [[0, 1, 1, 0, 1, 1, 0, 0]]
    """
    n, m = pattern.n, pattern.m
    view = group_view(scores, m, axis)
    pre, groups, _, post = view.shape
    flat = view.reshape(pre * groups, m, post)
    out = torch.empty(flat.shape, dtype=torch.bool, device=scores.device)
    kernel = _mask_pairwise if m <= _PAIRWISE_MAX_M else _mask_threshold
    # On CPU, work in cache-sized chunks: the ~m^2/2 elementwise passes then hit cache, not DRAM.
    rows = flat.shape[0] if scores.device.type != "cpu" else max(1, _CHUNK // (m * post))
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows]
        if transform is not None:
            chunk = transform(chunk)
        if chunk.is_floating_point() and bool(torch.isnan(chunk).any()):
            chunk = torch.nan_to_num(chunk, nan=float("-inf"))
        kernel(chunk, n, m, out[start : start + rows])
    return out.reshape(scores.shape)


def _mask_pairwise(s: torch.Tensor, n: int, m: int, out: torch.Tensor) -> None:
    # s: [rows, m, post]. beaten[i] counts the members of i's group that outrank i; keep i when
    # fewer than n do. It starts at m-1-i (every later member) and each comparison won against a
    # later member j takes one off; comparisons lost to an earlier member add one.
    cols = [s[:, j] for j in range(m)]
    beaten = [
        torch.full(cols[0].shape, m - 1 - i, dtype=torch.uint8, device=s.device) for i in range(m)
    ]
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = (cols[i] >= cols[j]).view(torch.uint8)  # ties go to the lower index i
            beaten[j] += i_wins
            beaten[i] -= i_wins
    for i in range(m):
        torch.lt(beaten[i], n, out=out[:, i])


def _mask_threshold(s: torch.Tensor, n: int, m: int, out: torch.Tensor) -> None:
    t = s.transpose(1, 2)  # [rows, post, m]
    thr = t.topk(n, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = t > thr
    at = t == thr
    room = n - above.sum(-1, keepdim=True, dtype=torch.int16)
    keep = above | (at & (at.cumsum(-1, dtype=torch.int16) <= room))
    out.copy_(keep.transpose(1, 2))


def nm_group_counts(tensor: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """Nonzeros per group of ``m`` along ``axis``: an int tensor ``[pre, size/m, post]``."""
    return (group_view(tensor, m, axis) != 0).sum(2, dtype=torch.int32)


def nm_violations(tensor: torch.Tensor, pattern: NMPattern, axis: int = 1) -> int:
    """Number of groups with more than ``pattern.n`` nonzeros (0 means the tensor satisfies N:M)."""
    return int((nm_group_counts(tensor, pattern.m, axis) > pattern.n).sum())
