"""A CPU stand-in for torch's 2:4 semi-structured kernels, so the GPU path runs without a GPU.

torch's ``SparseSemiStructuredTensor`` classes (the tensor subclass, its dispatch table, the
linear / mm / addmm handlers, padding, transposes, ``_FUSE_TRANSPOSE``) are plain Python; only the
kernels under them (``aten::_cslt_compress``, ``aten::_cslt_sparse_mm`` for cuSPARSELt,
``aten::_sparse_semi_structured_{mm,addmm,linear}`` for CUTLASS) and the "is it on CUDA" check are
CUDA-only. Inside :func:`cpu_semi_structured` those kernels get CPU implementations that compute
the same mathematical result from the compressed operand, and the device check accepts CPU
tensors, so torch's real classes and nmcompile's code on top of them (``to_semi_structured``, the
GPU latency script) run end to end on CPU.

What it proves: shapes, layouts, dtypes, dispatch paths, conversions and our own decisions work
and give the masked dense model's output. What it does not: anything about speed. Timings taken
inside it are CPU numbers of a decompress-then-matmul stand-in and are labelled so.

The cuSPARSELt stand-in's compressed layout follows the real one's contract as torch reads it
(the first ``m * k / 2`` elements are the kept values, row-major, the rest is metadata): here the
metadata is each kept value's position inside its group of four, stored in the same dtype. The
CUTLASS stand-in uses torch's own Python conversion (``sparse_semi_structured_to_dense_cutlass``),
so its packed / meta tensors are the real format.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["active", "cpu_semi_structured"]

_ACTIVE = 0


def active() -> bool:
    """Whether a :func:`cpu_semi_structured` block is open (nmcompile then accepts CPU modules)."""
    return _ACTIVE > 0


def _cslt_compress(dense: torch.Tensor) -> torch.Tensor:
    m, k = dense.shape
    groups = dense.reshape(m, k // 4, 4)
    # the two kept slots of each group: non-zeros first, then the earliest positions, in order
    priority = (groups != 0).to(torch.int8) * 4 - torch.arange(4, dtype=torch.int8)
    idx = priority.topk(2, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, idx)
    return torch.cat([values.reshape(-1), idx.to(dense.dtype).reshape(-1)])


def _cslt_decompress(packed: torch.Tensor, k: int) -> torch.Tensor:
    m = packed.numel() // k
    half = m * k // 2
    values = packed[:half].view(m, k // 2)
    idx = packed[half:].view(m, k // 2).long()
    base = torch.arange(k // 2, device=packed.device).div(2, rounding_mode="floor") * 4
    dense = torch.zeros(m, k, dtype=packed.dtype, device=packed.device)
    return dense.scatter_(1, base + idx, values)


def _cslt_sparse_mm(
    compressed_a: torch.Tensor,
    dense_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    transpose_result: bool = False,
    alg_id: int = 0,
    split_k: int = 1,
    split_k_mode: int = -1,
) -> torch.Tensor:
    a = _cslt_decompress(compressed_a, dense_b.shape[0])
    out = a @ dense_b  # [m, n]
    if alpha is not None:
        out = out * alpha
    if bias is not None:
        out = out + bias.unsqueeze(-1)  # one bias per row of A (an output feature)
    if out_dtype is not None:
        out = out.to(out_dtype)
    return out.t().contiguous() if transpose_result else out


def _cslt_sparse_mm_search(compressed_a, dense_b, bias=None, alpha=None, out_dtype=None,
                           transpose_result=False) -> int:  # fmt: skip
    return 0


def _cutlass_dense(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    return sparse_semi_structured_to_dense_cutlass(packed, meta)


def _ss_mm(mat1, mat1_meta, mat2, *, out_dtype=None) -> torch.Tensor:
    out = _cutlass_dense(mat1, mat1_meta) @ mat2
    return out if out_dtype is None else out.to(out_dtype)


def _ss_addmm(input, mat1, mat1_meta, mat2, *, alpha=1, beta=1, out_dtype=None) -> torch.Tensor:
    bias = input.unsqueeze(-1) if input.dim() == 1 else input
    out = beta * bias + alpha * (_cutlass_dense(mat1, mat1_meta) @ mat2)
    return out if out_dtype is None else out.to(out_dtype)


def _ss_linear(input, weight, meta, *, bias=None, activation=None, out_dtype=None):
    out = F.linear(input, _cutlass_dense(weight, meta), bias)
    if activation == "relu":
        out = F.relu(out)
    elif activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise NotImplementedError(f"stand-in: activation {activation!r}")
    return out if out_dtype is None else out.to(out_dtype)


_KERNELS = {
    "_cslt_compress": _cslt_compress,
    "_cslt_sparse_mm": _cslt_sparse_mm,
    "_cslt_sparse_mm_search": _cslt_sparse_mm_search,
    "_sparse_semi_structured_mm": _ss_mm,
    "_sparse_semi_structured_addmm": _ss_addmm,
    "_sparse_semi_structured_linear": _ss_linear,
}


def _validate_cpu_or_cuda(cls, original_tensor: torch.Tensor) -> None:
    """torch's checks (2-D, contiguous, dtype, shape) with CPU tensors accepted."""
    if original_tensor.dim() != 2:
        raise RuntimeError(f"Error original_tensor.dim = {original_tensor.dim()} is not supported!")
    if not original_tensor.is_contiguous():
        raise RuntimeError("Error original_tensor is not contiguous!")
    if original_tensor.dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise RuntimeError(f"Error original_tensor.dtype {original_tensor.dtype} not supported")
    m, n = original_tensor.shape
    c = cls._DTYPE_SHAPE_CONSTRAINTS[original_tensor.dtype]
    if m < c.sparse_min_rows or m % c.sparse_min_rows or n < c.sparse_min_cols:
        raise RuntimeError(f"Error original_tensor.shape {original_tensor.shape} is not supported!")
    if n % c.sparse_min_cols:
        raise RuntimeError(f"Error original_tensor.shape {original_tensor.shape} is not supported!")


@contextlib.contextmanager
def cpu_semi_structured() -> Iterator[None]:
    """Run torch's semi-structured classes on CPU tensors inside the block (module docstring).

    The kernel registrations live on a ``torch.library.Library`` destroyed on exit, and the
    device check is restored, so nothing leaks out of the block.
    """
    global _ACTIVE
    from torch.sparse import SparseSemiStructuredTensor

    lib = torch.library.Library("aten", "IMPL")
    original = SparseSemiStructuredTensor.__dict__["_validate_device_dim_dtype_shape"]
    try:
        with warnings.catch_warnings():
            # registering a CPU kernel for an op that has none is what we mean to do
            warnings.simplefilter("ignore", UserWarning)
            for name, fn in _KERNELS.items():
                lib.impl(name, fn, "CPU")
        SparseSemiStructuredTensor._validate_device_dim_dtype_shape = classmethod(
            _validate_cpu_or_cuda
        )
        _ACTIVE += 1
        yield
    finally:
        _ACTIVE = max(0, _ACTIVE - 1)
        SparseSemiStructuredTensor._validate_device_dim_dtype_shape = original
        lib._destroy()
