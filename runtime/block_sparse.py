"""Block-sparse layers: a regrouped conv / linear computed as dense GEMMs over its blocks.

A regrouped weight is zero outside a few dense blocks ``W[rows_b][:, cols_b]`` whose row sets are
disjoint (``passes/regroup.py``). The layer then computes, per block, one dense GEMM on the
gathered input columns, and places the block outputs back by one gather::

    x_b = x[..., cols_b]            (linear)   or   unfold(x)[:, cols_b, :]   (conv, im2col)
    y_b = x_b @ W_b^T
    y   = cat(y_1, ..., y_B, 0)[..., inverse_permutation] + bias

which equals the masked dense layer exactly (up to float summation order). Everything is plain
``index_select`` / ``matmul`` / ``cat``, so the module exports to ONNX. ``mode="batched"`` pads the
blocks to one shape and runs a single batched GEMM (better on GPUs with many small blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcompile._errors import ConfigError

__all__ = ["BlockSparseConv2d", "BlockSparseLinear", "to_block_sparse"]


def _as_blocks(blocks: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for b in blocks:
        rows, cols = (b.rows, b.cols) if hasattr(b, "rows") else b
        out.append(
            (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
        )
    return out


class _BlockGemm(nn.Module):
    """Shared block machinery over a 2-D weight ``[out, K]``."""

    def __init__(self, weight2d: torch.Tensor, blocks: Sequence[Any], mode: str) -> None:
        super().__init__()
        if mode not in ("loop", "batched"):
            raise ConfigError(f"block-sparse mode must be 'loop' or 'batched', got {mode!r}")
        self.mode = mode
        out_features = weight2d.shape[0]
        pairs = _as_blocks(blocks)
        seen = torch.zeros(out_features, dtype=torch.bool)
        for rows, _ in pairs:
            if seen[rows].any():
                raise ConfigError("block row sets overlap: blocks must come from one partition")
            seen[rows] = True
        self.n_blocks = len(pairs)
        order = torch.cat([r for r, _ in pairs] + [(~seen).nonzero().flatten()])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(out_features)
        self.register_buffer("inverse", inverse, persistent=True)
        self.uncovered = int((~seen).sum())
        if mode == "loop":
            for i, (rows, cols) in enumerate(pairs):
                self.register_buffer(f"cols_{i}", cols, persistent=True)
                self.register_parameter(
                    f"w_{i}", nn.Parameter(weight2d[rows][:, cols].detach().clone())
                )
        elif pairs:
            r_max = max(len(r) for r, _ in pairs)
            c_max = max(len(c) for _, c in pairs)
            w = torch.zeros(len(pairs), r_max, c_max, dtype=weight2d.dtype)
            idx = torch.zeros(len(pairs), c_max, dtype=torch.long)
            for i, (rows, cols) in enumerate(pairs):
                w[i, : len(rows), : len(cols)] = weight2d[rows][:, cols]
                idx[i, : len(cols)] = cols
            self.w_batched = nn.Parameter(w)
            self.register_buffer("cols_batched", idx, persistent=True)
            self.rows_per_block = [len(r) for r, _ in pairs]

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [N, K] -> [N, out]."""
        n = x.shape[0]
        if self.mode == "batched" and self.n_blocks:
            xb = x[:, self.cols_batched]  # [N, B, c_max]
            yb = torch.einsum("nbc,brc->nbr", xb, self.w_batched)
            parts = [yb[:, i, :r] for i, r in enumerate(self.rows_per_block)]
        else:
            parts = [
                x.index_select(1, getattr(self, f"cols_{i}")) @ getattr(self, f"w_{i}").t()
                for i in range(self.n_blocks)
            ]
        if self.uncovered:
            parts.append(x.new_zeros(n, self.uncovered))
        return torch.cat(parts, dim=1).index_select(1, self.inverse)


class BlockSparseLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: Sequence[Any], *, mode: str = "loop") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.core = _BlockGemm(linear.weight.detach(), blocks, mode)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.core.gemm(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class BlockSparseConv2d(nn.Module):
    """A conv (groups == 1, zero padding) as im2col + block GEMMs."""

    def __init__(self, conv: nn.Conv2d, blocks: Sequence[Any], *, mode: str = "loop") -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError("block-sparse convs need groups=1, zero padding given as numbers")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.core = _BlockGemm(conv.weight.detach().reshape(conv.out_channels, -1), blocks, mode)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(
            x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride
        )  # [N, K, L]
        oh = (
            h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1
        ) // self.stride[0] + 1
        ow = (
            w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1
        ) // self.stride[1] + 1
        flat = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N*L, K]
        y = self.core.gemm(flat)  # [N*L, out]
        if self.bias is not None:
            y = y + self.bias
        return (
            y.reshape(n, oh * ow, self.out_channels)
            .transpose(1, 2)
            .reshape(n, self.out_channels, oh, ow)
        )


def to_block_sparse(
    module: nn.Module, blocks: Mapping[str, Sequence[Any]], *, mode: str = "loop"
) -> nn.Module:
    """Replace every layer named in ``blocks`` (``{"layer.weight": [(rows, cols), ...]}``, as in
    ``CompileResult.diagnostics["blocks"]``) by its block-sparse twin, in place. Layers with no
    block are left as they are."""
    for param, bl in blocks.items():
        if not bl:
            continue
        name = param.removesuffix(".weight")
        layer = module.get_submodule(name)
        if isinstance(layer, nn.Linear):
            new = BlockSparseLinear(layer, bl, mode=mode)
        elif isinstance(layer, nn.Conv2d):
            new = BlockSparseConv2d(layer, bl, mode=mode)
        else:
            raise ConfigError(
                f"{name} is a {type(layer).__name__}: only Linear / Conv2d have a block-sparse form"
            )
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, new)
    return module
