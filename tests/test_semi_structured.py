"""torch 2:4 semi-structured: which layers qualify, and the real conversion through torch's
classes: on a GPU with its kernels, and everywhere with the CPU stand-in kernels
(``semi_structured_standin``), which compute the same product from the compressed operand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import NMCompileError, NMPattern
from nmcompile.runtime.semi_structured import (
    SemiStructuredConv1x1,
    SemiStructuredLinear,
    kernel_constraints,
    linear_2d,
    plan_semi_structured,
    to_semi_structured,
)
from nmcompile.runtime.semi_structured_standin import active, cpu_semi_structured


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


def test_plan_covers_f_linear_on_a_parameter():
    # after nmcompile's tracing, attention's packed qkv is F.linear(x, in_proj_weight): listed
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    net = nn.Sequential(nn.Linear(32, 64), nn.TransformerEncoder(layer, 2), nn.Linear(64, 4))
    r = nmcompile.compile(net, "asp", "2:4", example_inputs=(torch.randn(2, 8, 32),))
    plan = {d.name: d for d in plan_semi_structured(r.module, dtype=torch.float16)}
    qkv = plan["1.layers.0.self_attn.in_proj_weight"]
    assert qkv.kind == "matmul" and qkv.shape == (192, 64) and qkv.convert, qkv


def _fake_cusparselt(rows: int, cols: int):
    """torch's real cuSPARSELt tensor class holding zeros, built on the CPU: every op before the
    kernel call runs here, so the layout handling can be tested without a GPU."""
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as C

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return C(
                torch.Size([rows, cols]),
                packed=torch.zeros(rows * cols // 2 + rows * cols // 8, dtype=torch.float16),
                meta=None, packed_t=None, meta_t=None, compressed_swizzled_bitmask=None,
                fuse_transpose_cusparselt=False, alg_id_cusparselt=0, requires_grad=False,
            )  # fmt: skip
        except TypeError as exc:  # a torch whose constructor differs
            pytest.skip(f"SparseSemiStructuredTensorCUSPARSELT signature changed: {exc}")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_converted_layers_reach_the_sparse_kernel_from_any_layout(mode):
    # torch's own sparse linear fails before its kernel on an NCHW-permuted (view error) or, out
    # of inference mode, any batched input (expand): ours must get to _cslt_sparse_mm every time
    w, b = _fake_cusparselt(64, 64), torch.zeros(64, dtype=torch.float16)
    conv, lin = SemiStructuredConv1x1(w, b), SemiStructuredLinear(w, b)
    nchw = torch.randn(2, 64, 7, 7, dtype=torch.float16)
    calls = [
        lambda: conv(nchw),
        lambda: conv(nchw.contiguous(memory_format=torch.channels_last)),
        lambda: lin(torch.randn(5, 2, 64, dtype=torch.half).transpose(0, 1)),
        lambda: linear_2d(torch.randn(2, 5, 64, dtype=torch.half), w, None),
    ]
    for call in calls:
        with getattr(torch, mode)(), pytest.raises(NotImplementedError, match="_cslt_sparse_mm"):
            call()
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (64, 64)


def test_conversion_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(NMCompileError, match="needs the module on a CUDA GPU"):
        to_semi_structured(_sparse(Net()))


@pytest.fixture(params=["standin", pytest.param("cuda", marks=pytest.mark.gpu)])
def where(request):
    """(device, dtype) with 2:4 kernels: the CPU stand-in (bf16: CPU fp16 GEMMs crawl) or a GPU."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        yield "cuda", torch.half
    else:
        with cpu_semi_structured():
            yield "cpu", torch.bfloat16


def test_semi_structured_matches_masked_dense(where):
    device, dtype = where
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
    model = r.module.to(device, dtype).eval()
    x = torch.randn(8, 64, 128, device=device, dtype=dtype)
    res = to_semi_structured(model, example_inputs=(x,))
    plan = plan_semi_structured(model, dtype=dtype)
    assert res.converted == [d.name for d in plan if d.convert] and len(res.converted) == 8
    assert res.max_rel_error < 2e-2
    from torch.sparse import SparseSemiStructuredTensor

    fc1 = res.module.get_submodule("blocks.0.fc1").weight
    assert isinstance(fc1, SparseSemiStructuredTensor)
    # cuSPARSELt writes the row-major product itself (torch <= 2.13 returned a column-major
    # view of it otherwise); the flag must survive on the converted weight
    assert fc1.fuse_transpose_cusparselt is (fc1.BACKEND == "cusparselt")
    with torch.inference_mode():
        assert res.module.get_submodule("blocks.0.fc1")(x).is_contiguous()


def test_semi_structured_1x1_convs_and_attention_qkv(where):
    device, dtype = where
    torch.manual_seed(0)
    net = _sparse(Net()).to(device, dtype).eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 64, 14, 14, device=device, dtype=dtype).contiguous(memory_format=fmt)
        res = to_semi_structured(net, example_inputs=(x,))
        assert "conv1x1" in res.converted and res.max_rel_error < 2e-2
    layer = nn.TransformerEncoderLayer(256, 4, 512, batch_first=True, dropout=0.0)
    enc = nn.Sequential(nn.Linear(64, 256), nn.TransformerEncoder(layer, 2), nn.Linear(256, 4))
    r = nmcompile.compile(enc, "asp", "2:4", example_inputs=(torch.randn(2, 16, 64),))
    x = torch.randn(8, 128, 64, device=device, dtype=dtype)
    res = to_semi_structured(r.module.to(device, dtype).eval(), example_inputs=(x,))
    assert "1.layers.0.self_attn.in_proj_weight" in res.converted and res.max_rel_error < 2e-2


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_standin_kernels_compute_the_product_of_the_compressed_weight(backend):
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    w = w * NMPattern(2, 4).mask(w.abs().float()).to(w.dtype)
    bias = torch.randn(64, dtype=torch.bfloat16)
    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        with cpu_semi_structured(), torch.inference_mode():
            assert active()
            ws = to_sparse_semi_structured(w)
            assert backend == ws.BACKEND
            for shape in [(32, 128), (2, 7, 128), (5, 128)]:  # 5 rows: torch pads to the minimum
                x = torch.randn(*shape, dtype=torch.bfloat16)
                for b in (None, bias):
                    got, ref = F.linear(x, ws, b), F.linear(x, w, b)
                    assert got.shape == ref.shape
                    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before
    # nothing outlives the block: torch's device check and the missing CPU kernels are back
    assert not active()
    with pytest.raises(RuntimeError, match="not supported"):
        to_sparse_semi_structured(w)
    with pytest.raises(NotImplementedError):
        torch.ops.aten._cslt_compress(w)


def test_linear_2d_gives_a_row_major_output_whatever_the_kernel_returns(monkeypatch):
    # torch <= 2.13's cuSPARSELt path hands back a transposed view of [out, tokens]
    real = torch.nn.functional.linear

    def column_major(x, w, b=None):
        return real(x, w, b).t().contiguous().t()

    monkeypatch.setattr(torch.nn.functional, "linear", column_major)
    assert not column_major(torch.randn(6, 8), torch.randn(4, 8)).is_contiguous()
    y = linear_2d(torch.randn(2, 3, 8), torch.randn(4, 8))
    assert y.shape == (2, 3, 4) and y.is_contiguous()


def test_gpt2_conv1d_products_run_2_4_after_export():
    # torch.export turns GPT-2's Conv1D into addmm(bias, x, W) with W stored [in, out]: the
    # weight is the transposed operand, 2:4 along its rows (the input features)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    # an exported graph keeps its traced dtype (it casts to fp32 inside), so fp32 on CUTLASS,
    # the one backend with fp32 kernels, whose 32-bit pattern is 1:2
    r = nmcompile.compile(model, "asp", "1:2", example_inputs={"input_ids": ids})
    with cpu_semi_structured():
        res = to_semi_structured(r.module.eval(), example_inputs=(ids,), backend="cutlass")
        kinds = {d.name: d.kind for d in res.decisions if d.convert}
        conv1d = {s.param for s in r.sites}
        assert conv1d <= set(kinds) and {kinds[p] for p in conv1d} == {"matmul_t"}
        assert res.max_rel_error < 2e-2
        targets = [n.target for n in res.module.graph.nodes if n.op == "call_function"]
        assert targets.count(linear_2d) == len(conv1d)
        assert torch.ops.aten.addmm.default not in targets


def test_fp32_kernels_take_1_2_so_a_2_4_weight_stays_dense():
    # CUTLASS's fp32 semi-structured kernel keeps 1 of every 2 elements: handing it a 2:4 weight
    # silently drops half the kept weights (relative error ~0.4 through the stand-in)
    lin = _sparse(nn.Linear(64, 64))
    (d,) = plan_semi_structured(lin, dtype=torch.float32, backend="cutlass")
    assert not d.convert and "not 1:2" in d.reason and "fp16 / bf16" in d.reason
    with torch.no_grad():
        lin.weight.mul_(NMPattern(1, 2).mask(lin.weight.abs()))
    (d,) = plan_semi_structured(lin, dtype=torch.float32, backend="cutlass")
    assert d.convert
    with cpu_semi_structured():
        x = torch.randn(32, 64)
        res = to_semi_structured(lin, example_inputs=(x,), backend="cutlass")
        assert res.max_rel_error < 1e-4
