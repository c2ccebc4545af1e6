"""torch 2:4 semi-structured sparsity on NVIDIA GPUs.

``to_semi_structured(module)`` compresses every eligible weight with
``torch.sparse.to_sparse_semi_structured``: ``nn.Linear`` layers, products with a 2-D parameter
in a GraphModule (``F.linear`` / ``aten.linear`` on the packed qkv ``in_proj_weight`` of attention;
``aten.mm`` / ``aten.addmm`` with an ``[in, out]`` weight, GPT-2's ``Conv1D`` after torch.export,
stored transposed once converted), and 1x1 convolutions (stride 1, no padding, no groups) which run as a linear layer over
channels-last activations. The kernels are cuSPARSELt where available (required on Hopper, where
CUTLASS's sparse kernels do not run) and CUTLASS on SM8x.

torch's sparse linear views its input as 2-D (``A.view(-1, C)``) and, outside inference mode,
decomposes a batched ``F.linear`` into ops the sparse tensor refuses (``expand``); a permuted
NCHW activation breaks both. So every converted layer flattens its input to a contiguous
``[tokens, C]`` matrix itself (a view for contiguous and channels-last inputs, one copy
otherwise) and works under ``no_grad`` and ``inference_mode`` alike.

A layer stays dense, with the reason recorded, when its weight does not satisfy 2:4 along the
input features (1:2 for fp32, whose 32-bit elements the sparse tensor cores keep one in two of), when the dtype has no sparse kernel in the chosen backend, or when its shape is
under the kernel's minimum or not a multiple of it (rows x cols of the weight, per backend and
dtype, read from torch's own table). :func:`plan_semi_structured` makes those decisions without a
GPU; :func:`to_semi_structured` applies them and, given example inputs, checks the converted
module against the masked dense one.

Outputs are row-major: conversion turns on cuSPARSELt's fused transpose (torch <= 2.13 otherwise
returns a column-major view of the ``[out, tokens]`` product, which sends attention to SDPA's math
path and makes every norm and the next layer copy), and :func:`linear_2d` makes any other result
contiguous. Inside :func:`~nmcompile.runtime.semi_structured_standin.cpu_semi_structured` the same
code runs on CPU modules with stand-in kernels (tests, the GPU script's dry run).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nmcompile._errors import ConfigError, NMCompileError
from nmcompile._pattern import NMPattern, nm_violations

from .onnx_export import _flatten  # every tensor of a model output (tuples, dicts)

__all__ = [
    "SemiStructuredConv1x1",
    "SemiStructuredDecision",
    "SemiStructuredLinear",
    "SemiStructuredResult",
    "kernel_constraints",
    "linear_2d",
    "plan_semi_structured",
    "to_semi_structured",
]

_P24 = NMPattern(2, 4)
_P12 = NMPattern(1, 2)

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
    name: str  # module path, or the parameter's path for a "matmul" (F.linear on a parameter)
    kind: str  # "linear" | "conv1x1" | "matmul" ([out, in] parameter) | "matmul_t" ([in, out])
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
    candidates: list[tuple[str, str, torch.Tensor]] = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            candidates.append((name, "linear", mod.weight))
        elif _is_1x1(mod):
            candidates.append((name, "conv1x1", mod.weight))
    for p, kind in _matmul_params(module).items():
        w = module.get_parameter(p)
        # an [in, out] operand (x @ W, GPT-2's Conv1D as addmm) is the [out, in] weight transposed
        candidates.append((p, kind, w.t() if kind == "matmul_t" else w))
    out = []
    for name, kind, w in candidates:
        w = w.detach()
        shape = (int(w.shape[0]), int(w.shape[1]))
        reason = ""
        if dtype not in limits:
            reason = (
                f"{str(dtype).removeprefix('torch.')} has no 2:4 kernel in {backend} "
                f"(supported: {sorted(str(d).removeprefix('torch.') for d in limits)})"
            )
        else:
            rows, cols = limits[dtype]
            # 32-bit elements: the sparse tensor cores keep 1 of each 2 (the same 64 bits as
            # 2:4 of 16-bit ones), so an fp32 kernel needs 1:2 and a 2:4 weight is not one
            need = _P12 if dtype == torch.float32 else _P24
            bad = nm_violations(w.reshape(shape), need) if shape[1] % 4 == 0 else 0
            if shape[1] % 4:
                reason = f"{shape[1]} input features, not a multiple of 4"
            elif bad:
                reason = (
                    f"weight is not {need} along its input features ({bad} groups break it)"
                    + (
                        "; fp32 2:4 kernels take 1:2 (run fp16 / bf16 for 2:4)"
                        if need is _P12
                        else ""
                    )
                )
            elif shape[0] < rows or shape[0] % rows or shape[1] < cols or shape[1] % cols:
                reason = (
                    f"shape {shape[0]}x{shape[1]} is under the {backend} kernel minimum or "
                    f"not a multiple of it ({rows}x{cols} for "
                    f"{str(dtype).removeprefix('torch.')})"
                )
        out.append(SemiStructuredDecision(name, kind, shape, not reason, reason or "2:4"))
    return out


_LINEAR_OPS = (F.linear, torch.ops.aten.linear.default)  # (x, weight [out, in], bias)
_MM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)  # x @ weight [in, out]


def _product_use(node: fx.Node) -> tuple[str, fx.Node] | None:
    """(kind, weight node) when ``node`` multiplies by a get_attr weight we can run 2:4."""
    if node.op != "call_function":
        return None
    if node.target in (*_LINEAR_OPS, linear_2d):
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        kind = "matmul"
    elif node.target in _MM_OPS and not node.kwargs:
        # mm(x, W) / addmm(bias, x, W) with a plain (beta = alpha = 1) 1-D bias
        w = node.args[-1]
        kind = "matmul_t"
        if node.target is torch.ops.aten.addmm.default:
            bias = node.args[0]
            if len(node.args) != 3 or not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                return None
    else:
        return None
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return kind, w
    return None


def _matmul_params(module: nn.Module) -> dict[str, str]:
    """2-D parameters a GraphModule multiplies by itself (not through an ``nn.Linear``):
    ``F.linear`` / ``aten.linear`` (kind "matmul", stored ``[out, in]``) or ``aten.mm`` /
    ``aten.addmm`` with the weight second (kind "matmul_t", stored ``[in, out]``: GPT-2's
    ``Conv1D`` after torch.export). A parameter with any other use stays out: its stored tensor
    is replaced by the compressed one."""
    if not isinstance(module, fx.GraphModule):
        return {}
    kinds: dict[str, set[str]] = {}
    other: set[str] = set()
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            p = module.get_parameter(node.target)
        except AttributeError:
            continue
        if p.dim() != 2:
            continue
        for user in node.users:
            use = _product_use(user)
            if use is None or use[1] is not node or _operand_count(user, node) != 1:
                other.add(node.target)
            else:
                kinds.setdefault(node.target, set()).add(use[0])
    return {p: next(iter(k)) for p, k in kinds.items() if p not in other and len(k) == 1}


def _operand_count(user: fx.Node, node: fx.Node) -> int:
    return sum(a is node for a in (*user.args, *user.kwargs.values()))


def linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` over a contiguous ``[tokens, in]`` view of ``x``, with a row-major output
    (see the module docstring)."""
    lead = x.shape[:-1]
    y = F.linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    # torch <= 2.13's cuSPARSELt path returns the transposed (column-major) product unless the
    # transpose is fused into the kernel; a column-major activation sends attention to SDPA's
    # math path and makes every norm and the next layer copy. Conversion turns the fusion on; this
    # copy is the guard for a weight converted without it (a no-op when already row-major).
    return y.contiguous().reshape(*lead, y.shape[-1])


class SemiStructuredLinear(nn.Linear):
    """An ``nn.Linear`` holding a 2:4 semi-structured weight; same attributes, so code that reads
    ``.weight`` / ``.bias`` directly (``F.multi_head_attention_forward``) still finds them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_2d(x, self.weight, self.bias)


class SemiStructuredConv1x1(nn.Module):
    """A 1x1 convolution run as a 2:4 semi-structured linear layer over channels-last pixels
    (a free view when the activation is channels-last, one copy when it is NCHW)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_2d(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


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


def _route_through_linear_2d(gm: fx.GraphModule, params: set[str]) -> None:
    """Point the products with the converted parameters at :func:`linear_2d` (which takes the
    weight as ``[out, in]``, as the converted parameters now are)."""
    for node in list(gm.graph.nodes):
        use = _product_use(node)
        if use is None or use[1].target not in params:
            continue
        kind, w = use
        if kind == "matmul":
            x = node.args[0] if node.args else node.kwargs["input"]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif node.target is torch.ops.aten.addmm.default:
            bias, x = node.args[0], node.args[1]
        else:
            bias, x = None, node.args[0]
        node.target, node.args, node.kwargs = linear_2d, (x, w, bias), {}
    gm.graph.lint()
    gm.recompile()


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _convert(target: nn.Module, decisions: list[SemiStructuredDecision]) -> None:
    """Swap in the 2:4 weights / modules the decisions allow, in place."""
    from torch.sparse import to_sparse_semi_structured

    for d in decisions:
        if not d.convert:
            continue
        if d.kind in ("matmul", "matmul_t"):
            owner, _, attr = d.name.rpartition(".")
            holder = target.get_submodule(owner) if owner else target
            w = getattr(holder, attr).detach()
            w = (w.t() if d.kind == "matmul_t" else w).contiguous()  # [out, in]
            setattr(holder, attr, nn.Parameter(to_sparse_semi_structured(w), False))
            continue
        mod = target.get_submodule(d.name)
        w = mod.weight.detach().reshape(d.shape).contiguous()
        sparse = to_sparse_semi_structured(w)
        bias = None if mod.bias is None else mod.bias.detach()
        if d.kind == "linear" and type(mod).forward is not nn.Linear.forward:
            # a subclass with its own forward keeps it (and its hooks): only the weight
            # changes, and that forward must feed F.linear a 2-D or contiguous input
            mod.weight = nn.Parameter(sparse, requires_grad=False)
            continue
        cls = SemiStructuredLinear if d.kind == "linear" else SemiStructuredConv1x1
        _set_submodule(target, d.name, cls(sparse, bias))


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
    from . import semi_structured_standin

    params = list(module.parameters())
    on_cpu_standin = bool(params) and not params[0].is_cuda and semi_structured_standin.active()
    if not params or not (params[0].is_cuda or on_cpu_standin):
        raise NMCompileError(
            "to_semi_structured needs the module on a CUDA GPU: torch's 2:4 semi-structured "
            "kernels (cuSPARSELt / CUTLASS) have no CPU implementation. Move it with "
            "module.cuda().half() first"
        )
    backend = backend or default_backend()
    major = 8 if on_cpu_standin else torch.cuda.get_device_capability(params[0].device)[0]
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
        with torch.inference_mode():  # the mode the latency harness times in
            reference = _flatten(module(*example_inputs))
    target = module if inplace else copy.deepcopy(module)
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS, SparseSemiStructuredTensor._FUSE_TRANSPOSE
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    # cuSPARSELt writes the transposed product itself (row-major [tokens, out]) instead of torch
    # returning a column-major view of [out, tokens]; torch >= 2.14 fuses it on its own
    SparseSemiStructuredTensor._FUSE_TRANSPOSE = True
    try:
        with warnings.catch_warnings():
            # torch warns "prototype stage" for every tensor it builds; one conversion, one warning less
            warnings.filterwarnings("ignore", "The PyTorch API of SparseSemiStructuredTensor")
            _convert(target, decisions)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS, SparseSemiStructuredTensor._FUSE_TRANSPOSE = (
            previous
        )
    matmuls = {d.name for d in decisions if d.kind in ("matmul", "matmul_t") and d.convert}
    if matmuls:
        _route_through_linear_2d(target, matmuls)
    err = None
    if reference is not None:
        with torch.inference_mode():
            got = _flatten(target(*example_inputs))
        err = max(
            float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12))
            for g, r in zip(got, reference)
        )
        if not err <= rtol:
            raise NMCompileError(
                f"2:4 semi-structured module differs from the dense one: relative error {err:.3g} "
                f"> {rtol:g}"
            )
    return SemiStructuredResult(target, decisions, err)
