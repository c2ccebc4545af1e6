"""NMPattern parsing and the N:M mask: exactly n kept per group, the kept are the largest, any shape."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmcompile import NMPattern, PatternError, nm_mask, nm_violations
from nmcompile._pattern import group_view, nm_group_counts


@pytest.mark.parametrize(
    "spec", ["4:2", "0:4", "2:3x", "2:2", "", "2", "a:b", "1:33", "-1:4", "2:4:8"]
)
def test_invalid_patterns_name_the_rule(spec):
    with pytest.raises(ValueError, match="0 < n < m <= 32"):
        NMPattern.parse(spec)


def test_pattern_is_a_value():
    p = NMPattern.parse(" 2 : 4 ")
    assert p == NMPattern(2, 4) == NMPattern.parse((2, 4)) == NMPattern.parse(p)
    assert hash(p) == hash(NMPattern(2, 4))
    assert str(p) == "2:4" and p.density == 0.5 and p.sparsity == 0.5
    with pytest.raises(PatternError):
        NMPattern(2.0, 4)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p.n = 3  # type: ignore[misc]


def _reference_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Slow but obviously right: per group, a stable sort by (-score, index)."""
    k, c = scores.shape[:2]
    s = scores.reshape(k, c // m, m, -1).permute(0, 1, 3, 2).reshape(-1, m)
    keep = torch.zeros_like(s, dtype=torch.bool)
    for g in range(s.shape[0]):
        order = sorted(range(m), key=lambda j, g=g: (-float(s[g, j]), j))
        keep[g, order[:n]] = True
    return keep.reshape(k, c // m, -1, m).permute(0, 1, 3, 2).reshape(scores.shape)


patterns = st.tuples(st.integers(2, 32), st.data()).map(lambda t: t)


@settings(max_examples=150, deadline=None)
@given(
    m=st.sampled_from([2, 3, 4, 5, 8, 16, 32]),
    data=st.data(),
)
def test_mask_keeps_exactly_n_largest_per_group(m, data):
    n = data.draw(st.integers(1, m - 1))
    k = data.draw(st.integers(1, 5))
    groups = data.draw(st.integers(1, 4))
    rest = data.draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    ties = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    shape = (k, groups * m, *rest)
    scores = torch.randn(shape, generator=gen)
    if ties:  # few distinct values: ties must resolve to the lower index
        scores = (scores * 2).round()
    mask = nm_mask(scores, NMPattern(n, m))
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    counts = nm_group_counts(mask, m)
    assert bool((counts == n).all())
    assert torch.equal(mask, _reference_mask(scores, n, m))
    # every kept score >= every pruned score within its group
    view_s = group_view(scores, m)
    view_k = group_view(mask, m)
    kept_min = torch.where(view_k, view_s, torch.full_like(view_s, float("inf"))).amin(2)
    pruned_max = torch.where(view_k, torch.full_like(view_s, float("-inf")), view_s).amax(2)
    assert bool((kept_min >= pruned_max).all())


def test_groups_run_along_input_channels_of_a_conv():
    # Weight [K=1, C=4, R=1, S=2]: make the input-channel groups and the last-axis groups disagree.
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    w[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = nm_mask(w, NMPattern(2, 4))
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]


def test_nan_scores_rank_lowest_and_infinities_work():
    s = torch.tensor(
        [[float("nan"), 1.0, float("inf"), float("-inf"), 0.0, float("nan"), 2.0, 3.0]]
    )
    mask = nm_mask(s, NMPattern(2, 4))
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    s16 = torch.tensor([[float("nan")] * 16])
    assert int(nm_mask(s16, NMPattern(4, 16)).sum()) == 4


def test_non_divisible_reduction_dim_is_an_error():
    with pytest.raises(PatternError, match="not a multiple of m=4"):
        nm_mask(torch.randn(3, 6), NMPattern(2, 4))


def test_violations_count_groups_over_n():
    w = torch.ones(2, 8)
    assert nm_violations(w, NMPattern(2, 4)) == 4
    w = w * nm_mask(torch.randn(2, 8), NMPattern(2, 4))
    assert nm_violations(w, NMPattern(2, 4)) == 0
    w[0, 0] = w[0, 1] = w[0, 2] = 1.0
    assert nm_violations(w, NMPattern(2, 4)) == 1


def test_mask_keeps_device_and_works_on_half():
    w = torch.randn(8, 16).half()
    assert nm_mask(w.abs(), NMPattern(1, 4)).sum() == 8 * 4
    w = torch.randn(8, 64).bfloat16()
    assert nm_mask(w.abs(), NMPattern(2, 16)).sum() == 8 * 8


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (5, 32)])
def test_mask_is_exact_across_cpu_chunk_boundaries(n, m):
    # Several of nm_mask's cache-sized CPU chunks, with the last one partial, and many ties.
    from nmcompile._pattern import _CHUNK

    k = 3 * _CHUNK // (64 * 9) + 7
    scores = torch.randn(k, 64, 3, 3, generator=torch.Generator().manual_seed(n * m))
    scores = (scores * 3).round()
    assert scores.numel() > 3 * _CHUNK
    view = group_view(scores, m)  # [k, 64/m, m, 9]
    order = view.sort(dim=2, descending=True, stable=True).indices  # ties: lower index first
    ref = torch.zeros_like(view, dtype=torch.bool).scatter_(2, order[:, :, :n], True)
    assert torch.equal(nm_mask(scores, NMPattern(n, m)), ref.reshape(scores.shape))
