"""Calibrated one-shot N:M (SparseGPT, Wanda) and the channel permutation pass."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import nmcompile
from nmcompile import ConfigError, NMPattern, data, zoo
from nmcompile._methods.calibrated import sparsegpt_prune, wanda_mask
from nmcompile.passes.permute_channels import (
    permute_channels,
    retained,
    search_permutation,
)


def _groups_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


def _correlated_inputs(cols: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    return (torch.randn(tokens, cols, generator=g) @ mix) * scale


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8)])
def test_sparsegpt_nm_masks_and_smaller_output_error_than_magnitude(nm):
    n, m = nm
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    x = _correlated_inputs(96, 2048)
    h = x.T @ x / len(x)
    new, keep, facts = sparsegpt_prune(w, h, n=n, m=m, blocksize=32)
    assert _groups_ok(keep, n, m)
    assert torch.equal(new == 0, ~keep) or bool((new[~keep] == 0).all())
    magnitude = NMPattern(n, m).mask(w.abs(), 1)
    err_sgpt = ((new - w) @ x.T).pow(2).sum()
    err_mag = ((w * magnitude - w) @ x.T).pow(2).sum()
    assert err_sgpt < 0.8 * err_mag, (float(err_sgpt), float(err_mag))
    ref = float(err_sgpt / (w @ x.T).pow(2).sum())
    assert facts["output_error"] == pytest.approx(ref, rel=1e-3)


def test_sparsegpt_with_an_identity_hessian_is_magnitude_pruning():
    """Uncorrelated unit-variance inputs: no error to spread, the OBS score is |w|."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    new, keep, _ = sparsegpt_prune(w, torch.eye(32), n=2, m=4, blocksize=8)
    assert torch.equal(keep, NMPattern(2, 4).mask(w.abs(), 1))
    assert torch.allclose(new, w * keep)


def test_sparsegpt_unstructured_reaches_the_target():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(128, 1024)
    new, keep, _ = sparsegpt_prune(w, x.T @ x, n=None, m=None, sparsity=0.7, blocksize=64)
    assert abs(float((~keep).float().mean()) - 0.7) < 0.01
    assert bool((new[~keep] == 0).all())


def test_wanda_keeps_small_weights_on_loud_features():
    w = torch.ones(4, 8)
    w[:, 0] = 0.1  # small weights ...
    norms = torch.ones(8)
    norms[0] = 1e4  # ... on a feature a hundred times louder (squared norm 1e4)
    mask = wanda_mask(w, norms, NMPattern(2, 4), None)
    assert bool(mask[:, 0].all())
    assert _groups_ok(mask, 2, 4)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


def test_wanda_on_a_model_matches_the_score_computed_by_hand():
    ds = data.load("digits")
    x = ds.train.x[:96]
    model = _mlp()
    r = nmcompile.compile(
        model, "wanda", "2:4", example_inputs=(x[:2],), calibration=[x[:64], x[64:]],
        calibration_samples=80, prune_stem=True, sequential=False,
    )  # fmt: skip
    assert r.diagnostics["calibration_samples"] == 80
    feats = x[:80].flatten(1)
    score = model[1].weight.detach().abs() * feats.pow(2).sum(0).sqrt()
    assert torch.equal(r.masks["1.weight"], NMPattern(2, 4).mask(score, 1))
    # the second layer's features: the dense first layer's outputs (not sequential)
    h = torch.relu(model[1](feats)).detach()
    score = model[3].weight.detach().abs() * h.pow(2).sum(0).sqrt()
    assert torch.equal(r.masks["3.weight"], NMPattern(2, 4).mask(score, 1))


def test_sequential_sparsegpt_sees_the_pruned_layers_before():
    ds = data.load("digits")
    x = ds.train.x[:64]
    common = dict(example_inputs=(x[:2],), calibration=[x], prune_stem=True, blocksize=16)
    seq = nmcompile.compile(_mlp(), "sparsegpt", "2:4", **common)
    model = _mlp()
    feats = x.flatten(1)
    # by hand: layer 1 from the raw inputs, layer 3 from the outputs of the pruned layer 1
    w1, k1, _ = sparsegpt_prune(model[1].weight.detach(), feats.T @ feats / 64, n=2, m=4,
                                blocksize=16)  # fmt: skip
    h = torch.relu(feats @ w1.T + model[1].bias.detach())
    w3, k3, _ = sparsegpt_prune(model[3].weight.detach(), h.T @ h / 64, n=2, m=4, blocksize=16)
    assert torch.equal(seq.masks["1.weight"], k1) and torch.equal(seq.masks["3.weight"], k3)
    got = seq.module.get_parameter("3.weight").detach()
    assert torch.allclose(got, w3, atol=1e-5)
    par = nmcompile.compile(_mlp(), "sparsegpt", "2:4", sequential=False, **common)
    assert not torch.equal(par.masks["3.weight"], seq.masks["3.weight"])


def test_sparsegpt_on_convs_exports_a_checked_nm_onnx(tmp_path):
    ds = data.load("digits")
    x = ds.train.x[:128]
    torch.manual_seed(0)
    model = zoo.create("resnet20", in_channels=1, image_size=8)
    loader = [(x[:64], ds.train.y[:64]), (x[64:], ds.train.y[64:])]  # (input, target) pairs
    r = nmcompile.compile(
        model, "sparsegpt", "2:4", example_inputs=(x[:2],), calibration=loader, prune_stem=True
    )
    assert r.diagnostics["calibration_samples"] == 128
    assert not r.diagnostics["calibration_fallback"]
    layers = r.diagnostics["calibration_layers"]
    assert len(layers) == len(r.masks) and all(0 <= v["output_error"] < 1 for v in layers.values())
    exported = r.export_onnx(tmp_path / "m.onnx")
    assert exported.nm_report.satisfied(set(r.masks)) and exported.nm_report.declared_ok


def test_calibration_fallback_is_named_and_options_are_checked():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    x = torch.randn(4, 6, 32)
    r = nmcompile.compile(layer, "wanda", "2:4", example_inputs=(x[:1],), calibration=[x])
    fallback = r.diagnostics["calibration_fallback"]
    assert all(isinstance(v, str) and v for v in fallback.values())
    assert set(fallback) | set(r.diagnostics["calibration_layers"]) == set(r.masks)
    assert set(r.diagnostics["calibration_layers"])  # the MLP linears read their inputs
    with pytest.raises(ConfigError, match="calibration= is read by"):
        nmcompile.compile(layer, "asp", example_inputs=(x[:1],), calibration=[x])
    with pytest.raises(ConfigError, match="needs calibration data"):
        nmcompile.compile(layer, "sparsegpt", example_inputs=(x[:1],))
    with pytest.raises(ConfigError, match="permute=True serves N:M"):
        nmcompile.compile(layer, "wanda", target_sparsity=0.5, permute=True,
                          example_inputs=(x[:1],), calibration=[x])  # fmt: skip


def test_hugging_face_gpt2_conv1d_layers_are_calibrated_not_fallen_back(tmp_path):
    """GPT-2's Conv1D weights are ``[in, out]`` parameters fed to ``addmm`` (traced by
    torch.export): their inputs are read at the product; keyword calibration batches."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    calib = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    r = nmcompile.compile(model, "sparsegpt", "2:4", example_inputs={"input_ids": ids[:2]},
                          calibration=calib)  # fmt: skip
    assert not r.diagnostics["calibration_fallback"]
    layers = r.diagnostics["calibration_layers"]
    assert set(layers) == set(r.masks) and len(layers) == 8
    assert all(v["tokens"] == 8 * 16 for v in layers.values())
    for p, mask in r.masks.items():  # [in, out] weights: N:M along the inputs (axis 0)
        assert _groups_ok(mask.T.contiguous(), 2, 4), p
    assert r.export_onnx(tmp_path / "gpt2.onnx").nm_report.satisfied(set(r.masks))


# -- permutations ----------------------------------------------------------------------------------
def test_search_finds_a_permutation_that_keeps_more():
    a = torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    a[:, :4] += 1.0  # the four large columns share one 2:4 group: half of them are lost
    perm, facts = search_permutation(a, 2, 4)
    assert sorted(perm.tolist()) == list(range(16))
    assert facts["retained_after"] > facts["retained_before"] + 0.1
    assert float(retained(a[:, perm], 2, 4).sum() / a.sum()) == pytest.approx(
        facts["retained_after"]
    )
    # at most two large columns per group afterwards
    big = (perm < 4).reshape(4, 4).sum(1)
    assert int(big.max()) <= 2


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "squeezenet1_1"])
def test_permuted_models_compute_the_same_function(name):
    torch.manual_seed(0)
    if name == "resnet20":
        model, x = zoo.create("resnet20"), torch.randn(2, 3, 32, 32)
    elif name == "mobilenet_v2":  # depthwise convs are channel-wise; a narrow one, for time
        model, x = torchvision.models.mobilenet_v2(width_mult=0.25), torch.randn(1, 3, 64, 64)
    else:
        model, x = getattr(torchvision.models, name)(), torch.randn(1, 3, 64, 64)
    model.eval()
    for mod in model.modules():  # trained-looking BatchNorm statistics, not the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    r = nmcompile.compile(model, "asp", "2:4", example_inputs=(x,), permute=True)
    report = r.diagnostics["permutation"]
    assert report["max_abs_diff"] <= 1e-5
    assert report["spaces"], report["skipped"]
    for s in report["spaces"]:
        assert s["retained_after"] >= s["retained_before"] - 1e-9
    if name == "squeezenet1_1":  # fire modules concatenate: those spaces stay as they are
        assert any("cat" in why for why in report["skipped"].values())
    assert any(v["retained_after"] > v["retained_before"] for v in report["layers"].values())


def test_permute_pass_on_a_graph_module_directly():
    """The pass alone: masks all ones, the function kept bit-close, retained magnitude up."""
    torch.manual_seed(0)
    model = zoo.create("resnet20")
    x = torch.randn(2, 3, 32, 32)
    r = nmcompile.compile(model, "asp", "2:4", example_inputs=(x,), trainer=None)
    gm = r.masked
    for name, buf in gm.named_buffers():
        if name.endswith("weight_mask"):
            buf.fill_(True)
    with torch.no_grad():
        before = gm.eval()(x)
    rep = permute_channels(gm, (x,), 2, 4)
    with torch.no_grad():
        after = gm(x)
    assert float((before - after).abs().max()) <= 1e-5
    assert rep["max_abs_diff"] <= 1e-5
