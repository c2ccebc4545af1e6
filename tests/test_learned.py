"""LBC, SR-STE, STE, and prunable attention (MultiheadAttention / TransformerEncoder)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import nmcompile
from nmcompile import ConfigError, NMPattern, SupervisedTrainer, data, zoo
from nmcompile._methods.learned import LBCMasker, SRSTEMasker, alive_count, combinations
from nmcompile._pattern import nm_group_counts
from nmcompile.data import TensorLoader
from nmcompile.passes import check_nm, trace


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (1, 16)])
def test_combinations(n, m):
    c = combinations(n, m)
    assert c.shape == (math.comb(m, n), m) and bool((c.sum(1) == n).all())
    assert len({tuple(r.tolist()) for r in c}) == len(c)


def test_lbc_initialisation_and_gradients_reach_the_scores():
    w = torch.randn(6, 8, requires_grad=True)
    masker = LBCMasker(w, NMPattern(2, 4))
    assert masker.scores.shape == (12, 6)
    # each weight's summed score starts at 1 (NOTES: 1 / C(M-1, N-1))
    per_weight = masker.scores.detach() @ masker.combos.float()
    assert torch.allclose(per_weight, torch.ones_like(per_weight))
    out = masker(w)
    assert torch.equal(out, w)  # every candidate alive: every weight kept
    g = torch.randn_like(w)
    (out * g).sum().backward()
    # Eq. 9: dL/dS_gj = sum over the weights i of candidate j of dL/dB_gi, dL/dB = g * w
    dldb = (g * w.detach()).reshape(12, 4)
    expect = dldb @ masker.combos.float().t()
    assert torch.allclose(masker.scores.grad, expect, atol=1e-6)


def test_lbc_mask_is_the_best_remaining_combination():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    masker = LBCMasker(w, NMPattern(2, 4))
    with torch.no_grad():
        masker.scores.normal_()
    best = masker.scores.argmax(1)
    masker.keep(3)
    assert bool((masker.alive.sum(1) == 3).all())
    masker.keep(1)
    assert not masker.scores.requires_grad  # frozen once one candidate is left
    mask = masker.mask(w)
    groups = mask.reshape(4, 4, 4).reshape(-1, 4)
    assert torch.equal(groups, masker.combos[best])
    assert bool((nm_group_counts(mask, 4) == 2).all())


def test_lbc_schedule_counts_follow_the_cubic_formula():
    c = 28
    assert [alive_count(t, 0, 100, c) for t in (0, 1, 50, 99, 100, 150)] == [
        28,
        1 + math.ceil(27 * 0.99**3),
        1 + math.ceil(27 * 0.125),
        1 + math.ceil(27 * 1e-6),
        1,
        1,
    ]
    ds = data.load("digits", batch_size=64, seed=0)
    trainer = SupervisedTrainer(ds.train, ds.val, lr=0.05, progress=False)
    r = nmcompile.compile(
        zoo.create("cnn", in_channels=1, image_size=8),
        "lbc",
        "2:8",
        example_inputs=(ds.example_input(2),),
        trainer=trainer,
        total_iterations=60,
        removal_window=(0.25, 0.75),
        removal_interval=1,
    )
    counts = r.diagnostics["alive_per_step"]
    assert counts == [alive_count(t, 15, 45, 28) for t in range(1, 61)]
    assert check_nm(r.masked, NMPattern(2, 8), strict=True).ok  # exact N:M at the end
    assert check_nm(r.module, NMPattern(2, 8)).ok
    assert r.history[-1]["accuracy"] > 0.5


def test_lbc_removes_once_per_epoch_by_default():
    # Eq. 6 steps per epoch: nothing goes during the first epoch, and the count changes only
    # where an epoch starts (the old per-iteration removal cut candidates from iteration 1)
    ds = data.load("digits", batch_size=64, seed=0)
    loader = TensorLoader(ds.train.x, ds.train.y, 64, shuffle=True, drop_last=True)
    epoch = len(loader)
    trainer = SupervisedTrainer(loader, ds.val, lr=0.05, progress=False)
    r = nmcompile.compile(
        zoo.create("cnn", in_channels=1, image_size=8),
        "lbc",
        "2:4",
        example_inputs=(ds.example_input(2),),
        trainer=trainer,
        total_iterations=6 * epoch,
        removal_window=(0.0, 0.5),
    )
    counts = r.diagnostics["alive_per_step"]
    assert r.diagnostics["removal_interval"] == epoch
    assert counts[:epoch] == [6] * epoch  # the first epoch trains every candidate
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert changes and all(i % epoch == 0 for i in changes)
    # epochs 1, 2, 3 (t_f = 3 epochs): the cubic schedule at each epoch's start
    assert [counts[e * epoch] for e in range(4)] == [alive_count(e, 0, 3, 6) for e in range(4)]
    assert counts[-1] == 1


def test_lbc_flops_follow_the_mask_density():
    ds = data.load("digits", batch_size=64, seed=0)
    loader = TensorLoader(ds.train.x, ds.train.y, 64, shuffle=True, drop_last=True)
    t = SupervisedTrainer(loader, ds.val, lr=0.05, progress=False)
    lbc = nmcompile.compile(
        zoo.create("cnn", in_channels=1, image_size=8),
        "lbc",
        "1:4",
        example_inputs=(ds.example_input(2),),
        trainer=t,
        total_iterations=40,
        removal_window=(0.0, 0.5),
    )
    sr = nmcompile.compile(
        zoo.create("cnn", in_channels=1, image_size=8),
        "sr-ste",
        "1:4",
        example_inputs=(ds.example_input(2),),
        trainer=t,
        total_iterations=40,
    )
    fm = sr.flops
    quarter = {p: 0.25 for p in fm.sites}
    samples = 40 * 64
    # SR-STE: dense weight gradients throughout
    assert sr.history[-1]["train_flops"] == pytest.approx(
        fm.train_step(quarter, dense_weight_grad=True) * samples, rel=1e-9
    )
    # LBC: between a dense start and 3 zeta_P at 1:4
    assert (
        fm.train_step(quarter) * samples
        < lbc.history[-1]["train_flops"]
        < fm.train_step() * samples
    )
    # next to the counter, the paper's Table 1 convention: SR-STE zeta_P + 2 zeta_D, LBC
    # 2 zeta_P + zeta_D (0.75x and 0.5x of dense training at 1:4 for all-pruned models)
    zp, zd = fm.forward(quarter), fm.dense
    assert sr.diagnostics["flops_table1_per_sample"] == pytest.approx(zp + 2 * zd)
    assert lbc.diagnostics["flops_table1_per_sample"] == pytest.approx(2 * zp + zd)
    assert sr.diagnostics["flops_counter_per_sample"] == pytest.approx(2 * zp + zd)


def test_sr_ste_backward():
    w = torch.randn(4, 8, requires_grad=True)
    masker = SRSTEMasker(NMPattern(2, 4), 2e-4)
    mask = masker.mask(w)
    out = masker(w)
    assert torch.equal(out, w.detach() * mask)
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.allclose(w.grad, g + 2e-4 * (~mask) * w.detach())
    ste = SRSTEMasker(NMPattern(2, 4), 0.0)
    w.grad = None
    ste(w).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("method", ["sr-ste", "ste"])
def test_ste_methods_end_exact_nm(method):
    ds = data.load("digits", batch_size=64, seed=0)
    t = SupervisedTrainer(ds.train, ds.val, lr=0.05, progress=False)
    r = nmcompile.compile(
        zoo.create("cnn", in_channels=1, image_size=8),
        method,
        "2:4",
        example_inputs=(ds.example_input(2),),
        trainer=t,
        total_iterations=30,
    )
    assert check_nm(r.module, NMPattern(2, 4)).ok and r.sparsity == pytest.approx(0.5)


def test_learned_option_errors():
    with pytest.raises(ConfigError, match=r"LBCConfig.removal_window must be \(t_i, t_f\)"):
        nmcompile.compile(
            zoo.create("cnn"),
            "lbc",
            example_inputs=(torch.randn(1, 3, 8, 8),),
            removal_window=(0.6, 0.4),
        )
    with pytest.raises(ConfigError, match=r"STEConfig.total_iterations must be >= 1, got 0"):
        nmcompile.compile(
            zoo.create("cnn"), "ste", example_inputs=(torch.randn(1, 3, 8, 8),), total_iterations=0
        )


# -- attention -------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x))[:, 0])


def test_transformer_encoder_becomes_prunable_with_in_proj_grouped_by_input_features(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(2, 5, 16)
    gm = trace(model).graph_module
    assert torch.allclose(gm(x), model(x), atol=1e-5)  # same function, same parameter names
    assert set(gm.state_dict()) == set(model.state_dict())
    r = nmcompile.compile(
        model, "asp", "2:4", example_inputs=(x,), finetune_iterations=0, prune_stem=True
    )
    names = set(r.masks)
    assert "encoder.layers.0.self_attn.in_proj_weight" in names
    assert (
        "encoder.layers.1.linear2.weight" in names
        and "encoder.layers.0.self_attn.out_proj.weight" in names
    )
    mask = r.masks["encoder.layers.0.self_attn.in_proj_weight"]
    assert mask.shape == (192, 64)
    assert bool((nm_group_counts(mask, 4, axis=1) == 2).all())  # along input features
    assert not bool((nm_group_counts(mask.t().contiguous(), 4, axis=1) == 2).all())
    assert torch.allclose(r.module.eval()(x), r.masked.eval()(x), atol=1e-5)
    e = r.export_onnx(tmp_path / "tiny.onnx")
    assert e.nm_report.satisfied([s.param for s in r.sites])


@pytest.mark.parametrize("batch_first", [True, False])
def test_traced_attention_equals_multihead_attention(batch_first):
    from nmcompile.passes.attention import TracedMHA

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ours = TracedMHA(mha).eval()
    b, length = 3, 6
    x = torch.randn(b, length, 32) if batch_first else torch.randn(length, b, 32)
    y = torch.randn(b, 4, 32) if batch_first else torch.randn(4, b, 32)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    per_head = torch.randn(b * 4, length, length)  # a 3-D float mask, [batch * heads, L, S]
    cases = [
        dict(),  # need_weights=True by default: the weights come back, averaged over heads
        dict(need_weights=False),
        dict(average_attn_weights=False),
        dict(key_padding_mask=pad, attn_mask=causal),
        dict(attn_mask=per_head),
    ]
    with torch.no_grad():
        for kw in cases:
            want, want_w = mha(x, x, x, **kw)
            got, got_w = ours(x, x, x, **kw)
            assert torch.allclose(got, want, atol=1e-5), kw
            assert (got_w is None) == (want_w is None), kw
            if want_w is not None:
                assert torch.allclose(got_w, want_w, atol=1e-6), kw
        want, _ = mha(y, x, x)  # cross-attention
        assert torch.allclose(ours(y, x, x)[0], want, atol=1e-5)


def test_in_proj_is_pruned_whatever_the_batch_layout():
    for batch_first in (True, False):
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
        net = nn.Sequential(nn.Linear(16, 64), nn.TransformerEncoder(layer, 1), nn.Linear(64, 3))
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        r = nmcompile.compile(net, "asp", "2:4", example_inputs=(x,), finetune_iterations=0)
        assert "1.layers.0.self_attn.in_proj_weight" in r.masks, batch_first
        assert torch.allclose(r.module.eval()(x), r.masked.eval()(x), atol=1e-5)


def test_lbc_on_a_vision_transformer():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    m.conv_proj = nn.Conv2d(1, 32, 4, 4)
    ds = data.load("digits", batch_size=64, seed=0)
    t = SupervisedTrainer(ds.train, ds.val, lr=0.05, progress=False)
    r = nmcompile.compile(
        m, "lbc", "2:4", example_inputs=(ds.example_input(2),), trainer=t, total_iterations=30
    )
    assert sum("in_proj_weight" in k for k in r.masks) == 2
    assert check_nm(r.masked, NMPattern(2, 4), strict=True).ok
