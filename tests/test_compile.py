"""The public API: compile(), methods, configs, history, FLOPs, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import nmcompile
from nmcompile import (
    ConfigError,
    FlopModel,
    InputError,
    NMPattern,
    SupervisedTrainer,
    UnknownMethodError,
    UnknownOptionError,
    data,
    zoo,
)
from nmcompile._config import RUN_CONTROL
from nmcompile.passes import check_nm, find_sites, trace


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


X = torch.randn(4, 8)


def test_methods_registry():
    names = nmcompile.methods()
    assert {"asp", "omp", "random"} <= set(names)
    assert names == sorted(names)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(
        UnknownMethodError, match=r"unknown method 'aspx'; registered methods: \[.*'asp'"
    ):
        nmcompile.compile(_mlp(), "aspx", example_inputs=(X,))


def test_unknown_option_lists_valid_options():
    with pytest.raises(UnknownOptionError) as exc:
        nmcompile.compile(_mlp(), "asp", example_inputs=(X,), finetune_iters=3)
    msg = str(exc.value)
    assert "finetune_iters" in msg and "finetune_iterations" in msg and "exclude" in msg
    assert isinstance(exc.value, TypeError)


@pytest.mark.parametrize("bad", ["4:2", "0:4", "2:3x"])
def test_invalid_pattern(bad):
    with pytest.raises(ValueError, match="valid pattern is 'n:m'"):
        nmcompile.compile(_mlp(), "asp", bad, example_inputs=(X,))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("finetune_iterations", -1, r"ASPConfig.finetune_iterations must be >= 0, got -1"),
        ("finetune_iterations", 2.5, r"ASPConfig.finetune_iterations must be an int, got 2.5"),
        ("seed", -3, r"ASPConfig.seed must be >= 0"),
    ],
)
def test_option_out_of_range_names_the_field(option, value, message):
    with pytest.raises(ConfigError, match=message):
        nmcompile.compile(_mlp(), "asp", example_inputs=(X,), **{option: value})


def test_omp_target_sparsity_range():
    with pytest.raises(
        ConfigError, match=r"OMPConfig.target_sparsity must be in \[0.0, 1.0\), got 1.5"
    ):
        nmcompile.compile(_mlp(), "omp", example_inputs=(X,), target_sparsity=1.5)


@pytest.mark.parametrize("name", nmcompile.methods())
def test_every_config_round_trips_through_json(name):
    cls = nmcompile.get_method(name).config_cls
    cfg = cls()
    text = json.dumps(cfg.to_json())
    assert cls.from_json(text) == cfg
    # a non-default value survives too
    field = next(
        f
        for f in dataclasses.fields(cls)
        if f.name != "seed" and type(f.default) in (int, float) and f.name not in RUN_CONTROL
    )
    changed = dataclasses.replace(
        cfg,
        **{field.name: field.default + 1 if isinstance(field.default, int) else field.default / 2},
    )
    assert cls.from_json(json.loads(json.dumps(changed.to_json()))) == changed


def test_example_inputs_errors():
    with pytest.raises(InputError, match="needs example_inputs"):
        nmcompile.compile(_mlp(), "asp")
    with pytest.raises(InputError, match=r"layer `0` \(Linear, in_features=8\)"):
        nmcompile.compile(_mlp(), "asp", example_inputs=(torch.randn(4, 9),))
    with pytest.raises(InputError, match="tuple of inputs"):
        nmcompile.compile(_mlp(), "asp", example_inputs=[X].__iter__())
    # keyword inputs are bound to the forward's parameters; a name it does not take is refused
    with pytest.raises(InputError, match=r"names \['x'\].*it takes \['input'\]"):
        nmcompile.compile(_mlp(), "asp", example_inputs={"x": X})
    r = nmcompile.compile(_mlp(), "asp", example_inputs={"input": X})
    assert torch.equal(r.module(input=X), r.module(X))


def test_no_prunable_layer_is_explained():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ConfigError, match=r"no prunable layer.*stem layer.*classifier"):
        nmcompile.compile(net, "asp", example_inputs=(X,))


def test_asp_without_trainer_is_exact_nm_and_leaves_the_input_alone():
    net = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-shot without a trainer: nothing to warn about
        r = nmcompile.compile(net, "asp", "2:4", example_inputs=(X,), debug=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert sorted(r.masks) == ["2.weight", "4.weight"]
    for name, mask in r.masks.items():
        assert mask.dtype == torch.bool and mask.shape == net.get_parameter(name).shape
        w = r.module.get_parameter(name)
        assert bool((w[~mask] == 0).all())
        # the mask keeps the 2 largest |w| of each group of 4 input features
        assert torch.equal(mask, NMPattern(2, 4).mask(net.get_parameter(name).abs()))
    assert check_nm(r.masked, NMPattern(2, 4), strict=True).ok
    assert check_nm(r.module, NMPattern(2, 4)).ok
    assert r.sparsity == pytest.approx(0.5)
    assert [h["round"] for h in r.history] == [0]
    assert {"round", "sparsity", "accuracy", "train_flops"} <= set(r.history[0])
    assert r.history[0]["train_flops"] == 0.0
    # the masked module is still trainable with the masks enforced
    r.masked.train()
    r.masked(X).sum().backward()
    g = r.masked.get_parameter("2.weight").grad
    assert bool((g[~r.masks["2.weight"]] == 0).all())
    assert "| 2 | linear | 32x16 | 0.5 | yes |" in r.report()


def test_asp_resnet18_2_4_invariant():
    m = torchvision.models.resnet18(num_classes=10)
    r = nmcompile.compile(
        m, "asp", "2:4", example_inputs=(torch.randn(1, 3, 32, 32),), finetune_iterations=0
    )
    assert len(r.masks) == 19  # 20 convs minus the stem; the classifier excluded
    report = check_nm(r.masked, NMPattern(2, 4), strict=True)
    assert report.ok and len(report.entries) == 19
    assert check_nm(r.module, NMPattern(2, 4)).ok
    x = torch.randn(2, 3, 32, 32)
    r.module.eval()
    r.masked.eval()
    assert torch.allclose(r.module(x), r.masked(x), atol=1e-5)


def test_asp_vit_b_16_1_4_invariant():
    m = torchvision.models.vit_b_16(num_classes=10, image_size=32)
    r = nmcompile.compile(
        m, "asp", "1:4", example_inputs=(torch.randn(1, 3, 32, 32),), finetune_iterations=0
    )
    # per encoder block: the packed qkv in_proj_weight (a matmul site), out_proj, and the two
    # MLP linears; the patch embedding (stem) and the head stay dense
    assert len(r.masks) == 48
    assert sum(k.endswith("self_attention.in_proj_weight") for k in r.masks) == 12
    assert {e.name for e in r.excluded} == {"conv_proj", "heads.head"}
    assert check_nm(r.masked, NMPattern(1, 4), strict=True).ok
    assert r.sparsity == pytest.approx(0.75)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(r.module.eval()(x), r.masked.eval()(x), atol=1e-5)


def test_omp_prunes_exactly_the_global_budget():
    net = _mlp()
    r = nmcompile.compile(
        net,
        "omp",
        example_inputs=(X,),
        target_sparsity=0.7,
        prune_stem=True,
        prune_classifier=True,
        finetune_iterations=0,
    )
    assert r.pattern is None
    total = sum(m.numel() for m in r.masks.values())
    pruned = sum(int((~m).sum()) for m in r.masks.values())
    assert pruned == round(0.7 * total)
    # global: the threshold is shared, every kept |w| >= every pruned |w|
    kept = torch.cat([net.get_parameter(k).abs()[m] for k, m in r.masks.items()])
    gone = torch.cat([net.get_parameter(k).abs()[~m] for k, m in r.masks.items()])
    assert kept.min() >= gone.max()
    densities = [float(m.float().mean()) for m in r.masks.values()]
    assert max(densities) - min(densities) > 0.05  # layers differ: not a per-layer budget


def test_random_is_seeded():
    a = nmcompile.compile(_mlp(), "random", example_inputs=(X,), seed=1, finetune_iterations=0)
    b = nmcompile.compile(_mlp(), "random", example_inputs=(X,), seed=1, finetune_iterations=0)
    c = nmcompile.compile(_mlp(), "random", example_inputs=(X,), seed=2, finetune_iterations=0)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert check_nm(a.masked, NMPattern(2, 4), strict=True).ok


def test_flop_model_counts_by_hand():
    net = _mlp()
    gm = trace(net).graph_module
    find_sites(gm, NMPattern(2, 4))
    fm = FlopModel.build(gm, (torch.randn(5, 8),))
    # per sample: 2 * (8*16 + 16*32 + 32*16 + 16*3)
    assert fm.dense == pytest.approx(2 * (8 * 16 + 16 * 32 + 32 * 16 + 16 * 3))
    assert fm.sites == {"2.weight": 2 * 16 * 32, "4.weight": 2 * 32 * 16}
    half = {"2.weight": 0.5, "4.weight": 0.5}
    assert fm.forward(half) == pytest.approx(fm.dense - 0.5 * (2 * 16 * 32 + 2 * 32 * 16))
    assert fm.train_step(half) == pytest.approx(3 * fm.forward(half))
    assert fm.train_step(half, dense_weight_grad=True) == pytest.approx(
        2 * fm.forward(half) + fm.dense
    )


def test_flop_model_conv_matches_torch_counter():
    m = zoo.create("resnet20", num_classes=10)
    gm = trace(m).graph_module
    find_sites(gm, NMPattern(2, 4))
    fm = FlopModel.build(gm, (torch.randn(2, 3, 32, 32),))
    # resnet20 on 32x32 is about 41 MMACs = 82 MFLOPs per image
    assert 75e6 < fm.dense < 90e6
    assert sum(fm.sites.values()) < fm.dense  # stem and classifier are not sites


def test_asp_with_trainer_on_digits_trains_and_counts_flops():
    ds = data.load("digits", batch_size=64, seed=0)
    model = zoo.create("cnn", num_classes=10, in_channels=1, image_size=8)
    trainer = SupervisedTrainer(ds.train, ds.val, lr=0.05, progress=False)
    samples = []
    orig_train = trainer.train

    def counting_train(model, iterations, on_step=None):
        def hook(info):
            samples.append(info.batch_size)
            return on_step(info) if on_step else None

        return orig_train(model, iterations, hook)

    trainer.train = counting_train  # type: ignore[method-assign]
    r = nmcompile.compile(
        model,
        "asp",
        "2:4",
        example_inputs=(ds.example_input(2),),
        trainer=trainer,
        pretrain_iterations=200,
        finetune_iterations=100,
    )
    assert [h["phase"] for h in r.history] == ["dense", "pruned"]
    dense, pruned = r.history
    assert dense["sparsity"] == 0.0 and pruned["sparsity"] == pytest.approx(0.5)
    assert pruned["accuracy"] > 0.8  # a real training run on real data
    assert len(samples) == 300
    fm = r.flops
    expected_dense = sum(samples[:200]) * 3 * fm.dense
    assert dense["train_flops"] == pytest.approx(expected_dense)
    densities = {k: 0.5 for k in fm.sites}
    expected = expected_dense + sum(samples[200:]) * fm.train_step(densities)
    assert pruned["train_flops"] == pytest.approx(expected)
    assert pruned["iterations"] == 300


class _NoHookTrainer:
    """A user trainer that never calls on_step: FLOPs fall back to iterations x example batch."""

    def __init__(self):
        self.calls = []

    def train(self, model, iterations, on_step=None):
        self.calls.append(iterations)

    def evaluate(self, model):
        return 0.5


def test_untraceable_model_error_from_compile():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) if x.mean() > 0 else x

    net = nn.Sequential(nn.Linear(8, 8), Gate(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(nmcompile.TraceError, match=r"`1` \(Gate\).*leaf_modules=\['1'\]"):
        nmcompile.compile(net, "asp", example_inputs=(X,))
    r = nmcompile.compile(net, "asp", example_inputs=(X,), leaf_modules=["1"])
    assert list(r.masks) == ["2.weight"]  # the leaf's own linear stays dense


def test_session_warns_when_a_method_needs_training_without_trainer():
    from nmcompile._session import Session

    gm = trace(_mlp()).graph_module
    find_sites(gm, NMPattern(2, 4))
    fm = FlopModel.build(gm, (X,))
    s = Session(gm, [], pattern=NMPattern(2, 4), trainer=None, flops=fm, fallback_batch=4)
    with pytest.warns(UserWarning, match="no trainer given: skipping 5 training iterations"):
        assert s.train(5) == 0


class _StepTrainer:
    """Reports every step with a fixed batch size."""

    def train(self, model, iterations, on_step=None):
        for i in range(iterations):
            if on_step is not None and on_step(nmcompile.StepInfo(i + 1, 10, torch.zeros(()), 0.1)):
                break

    def evaluate(self, model):
        return None


def test_flops_follow_masks_rewritten_during_training():
    from nmcompile._session import Session

    gm = trace(_mlp()).graph_module
    find_sites(gm, NMPattern(2, 4))
    fm = FlopModel.build(gm, (X,))
    from nmcompile.passes import get_sites, insert_masks

    insert_masks(gm)
    sites = get_sites(gm)
    s = Session(
        gm, sites, pattern=NMPattern(2, 4), trainer=_StepTrainer(), flops=fm, fallback_batch=4
    )
    half = {site.param: 0.5 for site in sites}

    def prune_at_step_2(info):
        if info.iteration == 2:
            for site in sites:
                s.set_mask(site, NMPattern(2, 4).mask(s.weight(site).detach().abs()))
        return info.iteration == 4  # stop early after 4 steps

    assert s.train(10, prune_at_step_2) == 4
    # steps 1 and 2 ran dense; the mask written at step 2 is charged from step 3 on
    expected = 2 * 10 * fm.train_step() + 2 * 10 * fm.train_step(half)
    assert s.train_flops == pytest.approx(expected)
    assert s.densities() == pytest.approx(half) and s.sparsity() == pytest.approx(0.5)


def test_user_trainer_protocol():
    t = _NoHookTrainer()
    assert isinstance(t, nmcompile.Trainer)
    r = nmcompile.compile(_mlp(), "asp", example_inputs=(X,), trainer=t, finetune_iterations=7)
    assert t.calls == [7]
    assert r.history[-1]["accuracy"] == 0.5
    assert r.history[-1]["train_flops"] == pytest.approx(
        7 * X.shape[0] * r.flops.train_step({k: 0.5 for k in r.flops.sites})
    )
    with pytest.raises(ConfigError, match="trainer must implement"):
        nmcompile.compile(_mlp(), "asp", example_inputs=(X,), trainer=object())


def test_trainer_validation_and_empty_loader():
    with pytest.raises(ConfigError, match="milestones"):
        SupervisedTrainer([], milestones=(1.5,))
    with pytest.raises(ConfigError, match="momentum"):
        SupervisedTrainer([], momentum=1.0)
    t = SupervisedTrainer([], progress=False)
    with pytest.raises(InputError, match="train_loader yielded no batches"):
        t.train(_mlp(), 3)


def test_trainer_milestones_and_early_stop():
    xb = torch.randn(16, 8)
    yb = torch.randint(0, 3, (16,))
    t = SupervisedTrainer([(xb, yb)], lr=0.1, milestones=(0.5, 8), progress=False)
    lrs = []
    t.train(_mlp(), 10, lambda info: lrs.append(info.lr))
    assert lrs == pytest.approx([0.1] * 5 + [0.01] * 3 + [0.001] * 2)
    steps = []
    t.train(_mlp(), 10, lambda info: steps.append(info.iteration) or info.iteration == 4)
    assert steps == [1, 2, 3, 4]


def test_trainer_adamw_and_warmup():
    with pytest.raises(ConfigError, match="optimizer must be 'sgd' or 'adamw'"):
        SupervisedTrainer([], optimizer="adam")
    with pytest.raises(ConfigError, match="warmup"):
        SupervisedTrainer([], warmup=1.5)
    torch.manual_seed(0)
    xb = torch.randn(32, 8)
    yb = torch.randint(0, 3, (32,))
    t = SupervisedTrainer(
        [(xb, yb)], lr=0.01, optimizer="adamw", warmup=0.4, milestones=(0.8,), progress=False
    )
    lrs, losses = [], []
    t.train(_mlp(), 10, lambda info: lrs.append(info.lr) or losses.append(info.loss.item()))
    # warm-up over the first 4 of 10 steps, then the milestone at step 8
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01, 1e-3, 1e-3])
    assert losses[-1] < losses[0]
    # AdamW, not SGD: the first step of Adam moves every weight by about lr, whatever its grad
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    SupervisedTrainer([(xb, yb)], lr=0.01, optimizer="adamw", weight_decay=0.0).train(model, 1)
    step = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(model.parameters(), before)])
    moved = step[step > 0]
    assert moved.numel() > 0 and torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-2)


def test_trainer_cosine_schedule_anneals_to_zero_after_warmup():
    with pytest.raises(ConfigError, match="schedule must be 'step' or 'cosine'"):
        SupervisedTrainer([], schedule="linear")
    with pytest.raises(ConfigError, match="milestones belong to schedule='step'"):
        SupervisedTrainer([], schedule="cosine", milestones=(0.5,))
    xb, yb = torch.randn(8, 8), torch.randint(0, 3, (8,))
    t = SupervisedTrainer([(xb, yb)], lr=0.1, warmup=2, schedule="cosine", progress=False)
    lrs = []
    t.train(_mlp(), 10, lambda info: lrs.append(info.lr))
    expect = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expect)


def test_dict_batches_reach_data_driven_methods_by_name():
    """A trainer yielding ``({"scale": s, "x": x}, y)`` (keys not in forward's order) to an
    fx-traced model: the batch a method scores on (RigL's dense gradient) is placed by name."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)

        def forward(self, x, scale):
            return self.head(self.body(x)) * scale

    torch.manual_seed(0)
    x, s, y = torch.randn(32, 8), torch.rand(32, 1) + 0.5, torch.randint(0, 3, (32,))
    batches = [({"scale": s[i : i + 8], "x": x[i : i + 8]}, y[i : i + 8]) for i in range(0, 32, 8)]
    trainer = SupervisedTrainer(batches, lr=0.05, progress=False)
    r = nmcompile.compile(
        TwoInputs(),
        "rigl",
        "2:4",
        example_inputs={"scale": s[:2], "x": x[:2]},
        trainer=trainer,
        total_iterations=20,
        update_interval=5,
        prune_stem=True,
    )
    assert r.tracer == "fx" and r.sparsity == pytest.approx(0.5)
    assert torch.equal(r.module(x[:4], s[:4]), r.module(scale=s[:4], x=x[:4]))
