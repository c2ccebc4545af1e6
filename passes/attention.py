"""Traceable attention: ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` rewritten so
torch.fx can see (and nmcompile can prune) their weights.

torch.fx treats every ``torch.nn`` module as a leaf, and these three also branch on tensor
properties (the fused fast path), so they cannot be traced through. ``make_traceable`` swaps each
for a module with the **same parameters under the same names** (``in_proj_weight``,
``in_proj_bias``, ``out_proj``; ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ...) that
computes the same function with plain ops: the packed qkv projection is one
``F.linear(x, in_proj_weight, in_proj_bias)`` — a *matmul site* whose N:M groups run along its
input features (axis 1 of ``in_proj_weight``) — then ``scaled_dot_product_attention`` (or an
explicit softmax when attention dropout is on, so dropout follows train / eval mode) and
``out_proj``.

With ``need_weights=True`` (``nn.MultiheadAttention``'s default) the attention weights are
returned as PyTorch returns them (after dropout, averaged over heads unless
``average_attn_weights=False``), computed by an explicit softmax; ``attn_mask`` may be 2-D
``[L, S]`` or 3-D ``[batch * heads, L, S]``.

Not covered (left as they are, opaque): separate q/k/v projection weights (``kdim`` / ``vdim``
differing from ``embed_dim``), ``bias_k`` / ``bias_v``, ``add_zero_attn``. Unbatched (2-D) inputs
are not supported by the traced module. In cross-attention (query and key different tensors)
the packed weight is split into its q / k / v thirds, which are not prunable sites.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TracedEncoder", "TracedEncoderLayer", "TracedMHA", "make_traceable"]


def _supported(mha: nn.MultiheadAttention) -> bool:
    return (
        mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
    )


class TracedMHA(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention) with traceable ops."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.attn_drop = nn.Dropout(mha.dropout) if mha.dropout > 0 else None

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        # self-attention is decided before any transpose: three transposes of one tensor are
        # three different tensors, and the packed weight must reach F.linear whole to be a site
        same = query is key and key is value
        if not self.batch_first:
            query = query.transpose(0, 1)
            key, value = (query, query) if same else (key.transpose(0, 1), value.transpose(0, 1))
        if same:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w = self.in_proj_weight.chunk(3)
            b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (
                F.linear(query, w[0], b[0]),
                F.linear(key, w[1], b[1]),
                F.linear(value, w[2], b[2]),
            )
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        no_mask = attn_mask is None and key_padding_mask is None  # decided at trace time
        mask = (
            None if no_mask else _merge_masks(attn_mask, key_padding_mask, q.dtype, self.num_heads)
        )
        weights = None
        if self.attn_drop is None and not need_weights:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None
            )
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + _causal(scores)
            probs = scores.softmax(dim=-1)
            if self.attn_drop is not None:
                probs = self.attn_drop(probs)
            out = probs @ v
            if need_weights:
                weights = probs.mean(dim=1) if average_attn_weights else probs
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


@torch.fx.wrap
def _causal(scores):
    """An additive upper-triangular -inf mask for ``[..., L, S]`` scores."""
    l_, s_ = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(l_, s_, dtype=torch.bool, device=scores.device).tril()
    return torch.zeros(l_, s_, dtype=scores.dtype, device=scores.device).masked_fill(
        ~keep, float("-inf")
    )


@torch.fx.wrap
def _merge_masks(attn_mask, key_padding_mask, dtype, num_heads):
    """One additive float mask ``[B|1, 1|H, L, S]`` from PyTorch's two mask arguments (a 3-D
    ``attn_mask`` is PyTorch's ``[B * H, L, S]``)."""
    mask = None
    if attn_mask is not None:
        mask = (
            attn_mask
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
        )
        if mask.dim() == 3:
            mask = mask.reshape(-1, num_heads, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = (
            key_padding_mask
            if key_padding_mask.dtype != torch.bool
            else torch.zeros_like(key_padding_mask, dtype=dtype).masked_fill(
                key_padding_mask, float("-inf")
            )
        )
        kpm = kpm[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


class TracedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` without the fused fast path."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = (
            TracedMHA(layer.self_attn) if _supported(layer.self_attn) else layer.self_attn
        )
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.norm_first = layer.norm_first
        self.activation = layer.activation

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        return self.dropout1(
            self.self_attn(
                x,
                x,
                x,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                need_weights=False,
                is_causal=is_causal,
            )[0]
        )

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff(x))


class TracedEncoder(nn.Module):
    """``nn.TransformerEncoder`` without nested-tensor conversion."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TracedEncoderLayer(layer) if isinstance(layer, nn.TransformerEncoderLayer) else layer
            for layer in encoder.layers
        )
        self.norm = encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(
                x,
                src_mask=mask,
                src_key_padding_mask=src_key_padding_mask,
                is_causal=bool(is_causal),
            )
        return self.norm(x) if self.norm is not None else x


def _traceable(mod: nn.Module) -> nn.Module | None:
    if isinstance(mod, nn.TransformerEncoder):
        new: nn.Module = TracedEncoder(mod)
    elif isinstance(mod, nn.TransformerEncoderLayer):
        new = TracedEncoderLayer(mod)
    elif isinstance(mod, nn.MultiheadAttention) and _supported(mod):
        new = TracedMHA(mod)
    else:
        return None
    return new.train(mod.training)  # a new module starts in train mode: keep the original's


def make_traceable(model: nn.Module) -> nn.Module:
    """Replace the attention modules of ``model`` in place and return it (a new module when
    ``model`` itself is one of them)."""
    top = _traceable(model)
    if top is not None:
        return top
    for name, mod in list(model.named_modules()):
        new = _traceable(mod) if name else None
        if new is None:
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if getattr(owner, attr, None) is mod:  # not already replaced inside an encoder
            setattr(owner, attr, new)
    return model
