"""torch 2:4 semi-structured sparsity on NVIDIA GPUs.

``to_semi_structured(module)`` compresses every eligible weight with
``torch.sparse.to_sparse_semi_structured``: ``nn.Linear`` layers, and 1x1 convolutions (stride 1,
no padding, no groups) which run as a linear layer over channels-last activations. The kernels
are cuSPARSELt where available (required on Hopper, where CUTLASS's sparse kernels do not run)
and CUTLASS on SM8x.

A layer stays dense, with the reason recorded, when its weight does not satisfy 2:4 along the
input features, when the dtype has no sparse kernel in the chosen backend, or when its shape is
under the kernel's minimum or not a multiple of it (rows x cols of the weight, per backend and
dtype, read from torch's own table). :func:`plan_semi_structured` makes those decisions without a
GPU; :func:`to_semi_structured` applies them and, given example inputs, checks the converted
module against the masked dense one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcompile._errors import ConfigError, NMCompileError
from nmcompile._pattern import NMPattern, nm_violations

__all__ = [
    "SemiStructuredConv1x1",
    "SemiStructuredDecision",
    "SemiStructuredResult",
    "kernel_constraints",
    "plan_semi_structured",
    "to_semi_structured",
]

_P24 = NMPattern(2, 4)

# (sparse_min_rows, sparse_min_cols) per backend and dtype, as in torch/sparse/semi_structured.py
# (torch 2.11-2.14). Read from torch at run time when available; this is the fallback.
_FALLBACK = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {
        torch.float16: (32, 64),
        torch.bfloat16: (32, 64),
        torch.int8: (16, 128),
        torch.float32: (32, 32),
    },
}


def kernel_constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """Minimum (and multiple of) weight rows / cols per dtype for ``backend``."""
    try:
        from torch.sparse import semi_structured as ss

        cls = {
            "cusparselt": ss.SparseSemiStructuredTensorCUSPARSELT,
            "cutlass": ss.SparseSemiStructuredTensorCUTLASS,
        }[backend]
        return {
            dt: (cfg.sparse_min_rows, cfg.sparse_min_cols)
            for dt, cfg in cls._DTYPE_SHAPE_CONSTRAINTS.items()
        }
    except (ImportError, AttributeError, KeyError):
        return dict(_FALLBACK[backend])


def default_backend() -> str:
    """cuSPARSELt when torch has it, CUTLASS otherwise."""
    available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", None)
    return "cusparselt" if callable(available) and available() else "cutlass"


@dataclass(frozen=True)
class SemiStructuredDecision:
    name: str
    kind: str  # "linear" | "conv1x1"
    shape: tuple[int, ...]  # the weight as the kernel sees it: (out, in)
    convert: bool
    reason: str


def _is_1x1(mod: nn.Module) -> bool:
    return (
        isinstance(mod, nn.Conv2d)
        and mod.kernel_size == (1, 1)
        and mod.stride == (1, 1)
        and mod.dilation == (1, 1)
        and mod.groups == 1
        and mod.padding in ((0, 0), "valid")
        and mod.padding_mode == "zeros"
    )


def plan_semi_structured(
    module: nn.Module, *, dtype: torch.dtype, backend: str | None = None
) -> list[SemiStructuredDecision]:
    """Which layers of ``module`` would run 2:4 semi-structured, and why the others would not."""
    backend = backend or default_backend()
    if backend not in _FALLBACK:
        raise ConfigError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    limits = kernel_constraints(backend)
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            kind = "linear"
        elif _is_1x1(mod):
            kind = "conv1x1"
        else:
            continue
        w = mod.weight.detach()
        shape = (int(w.shape[0]), int(w.shape[1]))
        reason = ""
        if dtype not in limits:
            reason = (
                f"{str(dtype).removeprefix('torch.')} has no 2:4 kernel in {backend} "
                f"(supported: {sorted(str(d).removeprefix('torch.') for d in limits)})"
            )
        else:
            rows, cols = limits[dtype]
            if shape[1] % 4:
                reason = f"{shape[1]} input features, not a multiple of 4"
            elif nm_violations(w.reshape(shape), _P24):
                bad = nm_violations(w.reshape(shape), _P24)
                reason = f"weight is not 2:4 along its input features ({bad} groups break it)"
            elif shape[0] < rows or shape[0] % rows or shape[1] < cols or shape[1] % cols:
                reason = (
                    f"shape {shape[0]}x{shape[1]} is under the {backend} kernel minimum or "
                    f"not a multiple of it ({rows}x{cols} for "
                    f"{str(dtype).removeprefix('torch.')})"
                )
        out.append(SemiStructuredDecision(name, kind, shape, not reason, reason or "2:4"))
    return out


class SemiStructuredConv1x1(nn.Module):
    """A 1x1 convolution run as a 2:4 semi-structured linear layer over channels-last pixels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


@dataclass
class SemiStructuredResult:
    module: nn.Module
    decisions: list[SemiStructuredDecision]
    max_rel_error: float | None

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.decisions if d.convert]

    def summary(self) -> str:
        dense = [d for d in self.decisions if not d.convert]
        lines = [f"{len(self.converted)} of {len(self.decisions)} linear / 1x1 layers run 2:4"]
        lines += [
            f"  dense: {d.name} ({d.kind} {d.shape[0]}x{d.shape[1]}): {d.reason}" for d in dense
        ]
        return "\n".join(lines)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def to_semi_structured(
    module: nn.Module,
    *,
    backend: str | None = None,
    example_inputs: Sequence[Any] | None = None,
    rtol: float = 2e-2,
    inplace: bool = False,
) -> SemiStructuredResult:
    """Compress the eligible weights of a CUDA fp16/bf16 ``module`` to 2:4 semi-structured form.

    ``example_inputs``: when given, the converted module must reproduce the input module's output
    within ``rtol`` (relative L2 error). Returns the module, the per-layer decisions and the error.
    """
    params = list(module.parameters())
    if not params or not params[0].is_cuda:
        raise NMCompileError(
            "to_semi_structured needs the module on a CUDA GPU: torch's 2:4 semi-structured "
            "kernels (cuSPARSELt / CUTLASS) have no CPU implementation. Move it with "
            "module.cuda().half() first"
        )
    backend = backend or default_backend()
    major, _ = torch.cuda.get_device_capability(params[0].device)
    if backend == "cutlass" and major >= 9:
        raise NMCompileError(
            "CUTLASS 2:4 kernels run on SM8x only; this GPU is SM"
            f"{major}x: use backend='cusparselt' (torch.backends.cusparselt.is_available() is "
            f"{default_backend() == 'cusparselt'})"
        )
    dtype = params[0].dtype
    decisions = plan_semi_structured(module, dtype=dtype, backend=backend)
    reference = None
    if example_inputs is not None:
        with torch.no_grad():
            reference = module(*example_inputs)
    target = module if inplace else copy.deepcopy(module)
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        for d in decisions:
            if not d.convert:
                continue
            mod = target.get_submodule(d.name)
            w = mod.weight.detach().reshape(d.shape).contiguous()
            sparse = to_sparse_semi_structured(w)
            if d.kind == "linear":
                mod.weight = nn.Parameter(sparse, requires_grad=False)
            else:
                bias = None if mod.bias is None else mod.bias.detach()
                _set_submodule(target, d.name, SemiStructuredConv1x1(sparse, bias))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    err = None
    if reference is not None:
        with torch.no_grad():
            got = target(*example_inputs)
        err = float(
            (got.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)
        )
        if not err <= rtol:
            raise NMCompileError(
                f"2:4 semi-structured module differs from the dense one: relative error {err:.3g} "
                f"> {rtol:g}"
            )
    return SemiStructuredResult(target, decisions, err)
