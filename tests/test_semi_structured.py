"""torch 2:4 semi-structured: which layers qualify (CPU) and the real conversion (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import NMCompileError, NMPattern
from nmcompile.runtime.semi_structured import (
    kernel_constraints,
    plan_semi_structured,
    to_semi_structured,
)


def _sparse(mod: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[1] % 4 == 0:
                w = (
                    m.weight.reshape(m.weight.shape[0], -1)
                    if isinstance(m, nn.Linear)
                    else m.weight
                )
                m.weight.mul_(NMPattern(2, 4).mask(w.abs()).reshape(m.weight.shape))
    return mod


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(64, 128, 1)
        self.conv3x3 = nn.Conv2d(128, 128, 3, padding=1)
        self.big = nn.Linear(128, 256)
        self.tiny = nn.Linear(256, 8)
        self.dense = nn.Linear(256, 64)

    def forward(self, x):
        x = self.conv3x3(self.conv1x1(x)).mean((2, 3))
        return self.tiny(self.big(x)), self.dense(self.big(x))


def test_plan_names_every_decision():
    net = _sparse(Net())
    with torch.no_grad():
        net.dense.weight.normal_()  # not 2:4
    plan = {d.name: d for d in plan_semi_structured(net, dtype=torch.float16, backend="cusparselt")}
    assert set(plan) == {"conv1x1", "big", "tiny", "dense"}  # the 3x3 conv is not a GEMM here
    assert (
        plan["conv1x1"].convert
        and plan["conv1x1"].kind == "conv1x1"
        and plan["conv1x1"].shape == (128, 64)
    )
    assert plan["big"].convert
    assert not plan["tiny"].convert and "kernel minimum" in plan["tiny"].reason
    assert not plan["dense"].convert and "not 2:4" in plan["dense"].reason
    # CUTLASS needs 64 columns for fp16: the 64-input 1x1 conv still fits, fp32 has 32x32 tiles
    cut = {d.name: d for d in plan_semi_structured(net, dtype=torch.float16, backend="cutlass")}
    assert cut["conv1x1"].convert and cut["big"].convert
    f32 = {d.name: d for d in plan_semi_structured(net, dtype=torch.float32, backend="cusparselt")}
    assert not f32["big"].convert and "no 2:4 kernel in cusparselt" in f32["big"].reason


def test_kernel_constraints_come_from_torch():
    lt = kernel_constraints("cusparselt")
    assert lt[torch.float16] == (16, 16) and torch.float32 not in lt
    assert kernel_constraints("cutlass")[torch.float16] == (32, 64)


def test_conversion_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(NMCompileError, match="needs the module on a CUDA GPU"):
        to_semi_structured(_sparse(Net()))


@pytest.mark.gpu
def test_semi_structured_matches_masked_dense_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = nmcompile.zoo.create("bert_tiny", num_classes=4)
    r = nmcompile.compile(
        m,
        "asp",
        "2:4",
        example_inputs=(torch.randn(1, 32, 128),),
        prune_stem=True,
        finetune_iterations=0,
    )
    model = r.module.cuda().half().eval()
    x = torch.randn(8, 64, 128, device="cuda", dtype=torch.half)
    res = to_semi_structured(model, example_inputs=(x,))
    assert len(res.converted) == 8 and res.max_rel_error < 2e-2
    from torch.sparse import SparseSemiStructuredTensor

    assert isinstance(res.module.get_submodule("blocks.0.fc1").weight, SparseSemiStructuredTensor)
