"""Per pass: build a small graph, run the pass, assert node counts / modified / invariants, and
numerical equivalence against the original."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import nmcompile
from nmcompile import ConfigError, InputError, NMPattern, PassError, TraceError
from nmcompile.passes import (
    NMCompileWarning,
    PassResult,
    check_nm,
    finalize,
    find_sites,
    fingerprint,
    fold_batchnorm,
    get_excluded,
    get_masks,
    get_sites,
    insert_masks,
    masked_calls,
    nm_invariant,
    propagate_shapes,
    run_passes,
    trace,
)

P24 = NMPattern(2, 4)


class Net(nn.Module):
    """stem conv -> conv+BN -> conv(3 in-ch? no: 8) -> depthwise -> linear -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.odd = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.conv(x)))
        x = self.odd(self.dw(x))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics so folding is really tested
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net.eval(), torch.randn(2, 3, 4, 4)


def _traced(pattern=P24, **kw):
    net, x = _net()
    gm = trace(net).graph_module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NMCompileWarning)
        find_sites(gm, pattern, **kw)
    return net, x, gm


# -- trace ---------------------------------------------------------------------------------------
def test_trace_copies_and_keeps_outputs():
    net, x = _net()
    res = trace(net)
    assert res.modified
    assert res.graph_module is not net
    assert torch.equal(res.graph_module(x), net(x))
    res.graph_module.stem.weight.data.zero_()
    assert net.stem.weight.abs().sum() > 0  # the caller's model is untouched


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_trace(name):
    m = getattr(torchvision.models, name)(num_classes=10).eval()
    gm = trace(m).graph_module
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(gm(x), m(x))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value
            return self.lin(x)
        return -self.lin(x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.block = Untraceable()
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.block(self.a(x)))


def test_untraceable_module_is_named_with_the_fix():
    with pytest.raises(TraceError, match=r"`block` \(Untraceable\).*leaf_modules=\['block'\]"):
        trace(Outer())


def test_leaf_modules_make_it_traceable_and_stay_opaque():
    gm = trace(Outer(), leaf_modules=["block"]).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["a", "block", "b"]
    gm2 = trace(Outer(), leaf_modules=[Untraceable]).graph_module
    assert [n.target for n in gm2.graph.nodes if n.op == "call_module"] == targets
    with pytest.raises(TraceError, match="not submodules"):
        trace(Outer(), leaf_modules=["nope"])


def test_a_leaf_layer_with_its_own_forward_is_never_rewritten():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        Scaled(16, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )
    x = torch.randn(3, 8)
    with pytest.warns(NMCompileWarning, match=r"`2`: Scaled overrides nn.Linear.forward"):
        r = nmcompile.compile(net, "asp", "2:4", example_inputs=(x,), leaf_modules=[Scaled])
    assert sorted(r.masks) == ["4.weight"]
    assert any(e.name == "2" and "overrides" in e.reason for e in r.excluded)
    with torch.no_grad():  # all-ones masks: the compiled model computes what the original does
        r.masked.get_buffer("4.weight_mask").fill_(True)
        assert torch.allclose(r.masked(x), net(x), atol=1e-6)
    # traced through (not a leaf), the same layer's weight is pruned where F.linear uses it
    assert "2.weight" in nmcompile.compile(net, "asp", "2:4", example_inputs=(x,)).masks


def test_wrong_example_inputs_name_the_layer():
    net, _ = _net()
    gm = trace(net).graph_module
    with pytest.raises(InputError, match=r"layer `stem` \(Conv2d, in_channels=3\)"):
        propagate_shapes(gm, (torch.randn(2, 5, 4, 4),))
    with pytest.raises(InputError, match="takes 1 to 1 inputs"):
        propagate_shapes(gm, (torch.randn(2, 3, 4, 4), torch.randn(1)))


# -- find_sites ----------------------------------------------------------------------------------
def test_find_sites_excludes_stem_classifier_grouped_and_odd_channels():
    net, _ = _net()
    gm = trace(net).graph_module
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = find_sites(gm, NMPattern(2, 8))
    assert res.modified is False  # an analysis: only metadata
    sites = {s.name: s for s in get_sites(gm)}
    reasons = {e.name: e.reason for e in get_excluded(gm)}
    assert set(sites) == {"conv", "odd", "fc"}
    assert "stem" in reasons["stem"] and "classifier" in reasons["head"]
    assert "groups=16" in reasons["dw"]
    assert sites["conv"].param == "conv.weight" and sites["conv"].shape == (16, 8, 3, 3)
    assert not caught  # nothing warned: every reduction dim is a multiple of 8
    # with 1:32 the 8-channel conv is excluded, with a warning naming it and the fix
    gm = trace(net).graph_module
    with pytest.warns(
        NMCompileWarning,
        match=r"conv `conv` has 8 input channels, not a multiple of 32.*exclude=\['conv'\]",
    ):
        find_sites(gm, NMPattern(1, 32))
    assert "conv" not in {s.name for s in get_sites(gm)}


def test_blocks_whose_outputs_are_also_returned_are_no_classifier():
    """A model that returns every block's hidden state (``output_hidden_states``) as well as its
    head: each block's last projection reaches the output through a residual add, but it also
    feeds the next block, so only the head is the classifier."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.up, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.head = nn.Linear(16, 32), nn.Linear(32, 8)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            h = self.inp(x)
            hs = [h]
            for b in self.blocks:
                h = b(h)
                hs.append(h)
            return self.head(h), tuple(hs)

    gm = trace(Net()).graph_module
    find_sites(gm, NMPattern(2, 4))
    reasons = {e.name: e.reason for e in get_excluded(gm)}
    assert set(reasons) == {"inp", "head"} and "classifier" in reasons["head"]
    assert {s.name for s in get_sites(gm)} == {
        f"blocks.{i}.{p}" for i in range(3) for p in ["up", "down"]
    }


def test_find_sites_options():
    _, _, gm = _traced(prune_stem=True, prune_classifier=True, exclude=["fc"])
    names = {s.name for s in get_sites(gm)}
    assert "head" in names and "fc" not in names and "conv" in names
    assert "stem" not in names  # 3 input channels: not a multiple of 4
    _, _, gm = _traced(include=["conv"])
    assert [s.name for s in get_sites(gm)] == ["conv"]
    with pytest.raises(ConfigError, match="matches no module"):
        _traced(exclude=["nonexistent*"])
    with pytest.raises(ConfigError, match="not a string"):
        _traced(exclude="fc")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # tied
        self.last = nn.Linear(8, 2)

    def forward(self, x):
        x = self.first(x)
        return self.last(self.b(self.a(x)) + self.a(x))


def test_tied_weights_are_one_site_sharing_one_mask():
    m = Tied().eval()
    gm = trace(m).graph_module
    find_sites(gm, P24)
    sites = get_sites(gm)
    assert [(s.name, s.aliases) for s in sites] == [("a", ("b",))]
    insert_masks(gm)
    calls = list(masked_calls(gm))
    assert len(calls) == 3 and {c.source.args[1].target for c in calls} == {"a.weight_mask"}
    gm.a.weight_mask.copy_(P24.mask(gm.a.weight.abs()))
    x = torch.randn(3, 8)
    out = gm(x)
    finalize(gm)
    assert torch.allclose(gm(x), out, atol=1e-6)
    assert gm.b.weight is gm.a.weight and check_nm(gm, P24).ok


# -- insert_masks --------------------------------------------------------------------------------
def test_insert_masks_node_counts_buffers_and_identity():
    net, x, gm = _traced()
    ref = net(x)
    n_sites = len(get_sites(gm))
    res = insert_masks(gm)
    assert res.modified
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.mul]
    assert len(muls) == n_sites == len(list(masked_calls(gm))) == 3
    site_modules = {s.name for s in get_sites(gm)}
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target in site_modules]
    sd = gm.state_dict()
    for s in get_sites(gm):
        assert sd[s.mask_target].dtype == torch.bool and bool(sd[s.mask_target].all())
    assert torch.equal(gm(x), ref)  # all-ones masks: bit-identical
    # idempotent: a second run changes nothing
    assert insert_masks(gm).modified is False


def test_masked_weights_get_no_gradient():
    _, x, gm = _traced()
    insert_masks(gm)
    gm.train()
    mask = P24.mask(torch.randn(gm.conv.weight.shape))
    gm.conv.weight_mask.copy_(mask)
    gm(x).sum().backward()
    grad = gm.conv.weight.grad
    assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


class HalfMask(nn.Module):
    """A learned-mask stand-in: keeps the entries whose score is positive."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.randn_like(weight))

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scores > 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask(weight)


def test_insert_masks_with_a_mask_module():
    _, x, gm = _traced()
    insert_masks(gm, mask_module=lambda site, w: HalfMask(w))
    maskers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("masker")]
    assert len(maskers) == 3
    masks = get_masks(gm)
    assert torch.equal(masks["conv.weight"], gm.conv.weight_masker.scores > 0)
    out = gm(x)
    finalize(gm)
    assert torch.allclose(gm(x), out, atol=1e-6)
    assert not hasattr(gm.conv, "weight_masker")
    assert bool((gm.conv.weight[~masks["conv.weight"]] == 0).all())


# -- finalize ------------------------------------------------------------------------------------
def test_finalize_folds_masks_and_restores_modules():
    _, x, gm = _traced()
    insert_masks(gm)
    for s in get_sites(gm):
        gm.get_submodule(s.name).weight_mask.copy_(P24.mask(gm.get_parameter(s.param).abs()))
    out = gm(x)
    fin = copy.deepcopy(gm)
    res = run_passes(fin, [finalize], check_modified=True)
    assert res.modified
    assert not [n for n in fin.graph.nodes if n.target is torch.mul]
    assert not [k for k in fin.state_dict() if k.endswith("weight_mask")]
    assert [n.target for n in fin.graph.nodes if n.op == "call_module"] == [
        "stem",
        "conv",
        "bn",
        "dw",
        "odd",
        "fc",
        "head",
    ]
    assert torch.allclose(fin(x), out, atol=1e-6)
    assert check_nm(fin, P24).ok and len(check_nm(fin, P24).entries) == 3
    # a finalized graph has nothing left to fold
    assert run_passes(fin, [finalize], check_modified=True).modified is False


def test_fold_batchnorm_equivalence_and_nm_kept():
    _, x, gm = _traced()
    insert_masks(gm)
    for s in get_sites(gm):
        gm.get_submodule(s.name).weight_mask.copy_(P24.mask(gm.get_parameter(s.param).abs()))
    out = gm(x)
    finalize(gm, fold_bn=True)
    assert "bn" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert not hasattr(gm, "bn")
    assert torch.allclose(gm(x), out, atol=1e-5)
    assert check_nm(gm, P24).ok


def test_fold_batchnorm_resnet18():
    m = torchvision.models.resnet18(num_classes=10)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))  # real running statistics
    m.eval()
    gm = trace(m).graph_module
    x = torch.randn(2, 3, 32, 32)
    res = fold_batchnorm(gm)
    assert res.modified
    assert not [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
    ]
    assert torch.allclose(gm(x), m(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_training_mode():
    gm = trace(_net()[0].train()).graph_module
    with pytest.raises(ConfigError, match="eval mode"):
        fold_batchnorm(gm)


# -- infra ---------------------------------------------------------------------------------------
def test_run_passes_catches_a_pass_that_lies():
    _, _, gm = _traced()

    def liar(g):
        g.conv.weight.data.mul_(2.0)
        return PassResult(g, False)

    with pytest.raises(
        PassError, match="liar reported modified=False but the graph module changed"
    ):
        run_passes(gm, [insert_masks, liar], check_modified=True)


def test_run_passes_names_the_passes_before_a_failure_and_checks_invariants():
    _, _, gm = _traced()

    def broken(g):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match=r"pass broken failed after \['insert_masks'\]"):
        run_passes(gm, [insert_masks, broken])

    def densify(g):
        for s in get_sites(g):
            g.get_submodule(s.name).weight_mask.fill_(True)
        return PassResult(g, True)

    with pytest.raises(PassError, match=r"invariant nm_invariant broken after pass densify"):
        run_passes(gm, [densify], invariants=[nm_invariant(P24)])


def test_fingerprint_sees_inplace_writes():
    _, _, gm = _traced()
    before = fingerprint(gm)
    assert fingerprint(gm) == before
    gm.conv.weight.data.mul_(2.0)  # .data bypasses the version counter; the checksum sees it
    assert fingerprint(gm) != before
    before = fingerprint(gm)
    with torch.no_grad():
        gm.conv.weight.mul_(1.0)  # same values, but an in-place write autograd records
    assert fingerprint(gm) != before


def test_weights_read_by_keyword_twice_or_beside_their_module_call():
    """``mm(h, mat2=W)`` is a product along W's axis 0; ``mm(V, V)`` uses V along both axes;
    a linear's weight also read by ``F.linear`` outside its module call cannot be masked in the
    call alone. Each is a site or excluded with its reason, and a root-module parameter's site is
    named after the parameter."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.W = nn.Parameter(torch.randn(16, 16))
            self.V = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            h = self.a(x)
            h = self.b(h) + F.linear(h, self.b.weight)
            h = torch.mm(h, mat2=self.W)
            return self.c(h + torch.mm(self.V, self.V)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(Net(), "asp", example_inputs=(torch.randn(2, 8),))
    assert [(s.name, s.kind, s.group_axis) for s in r.sites] == [("W", "matmul", 0)]
    reasons = {e.name: e.reason for e in r.excluded}
    assert "both by its module call and directly" in reasons["b"]
    assert "different axes" in reasons["V"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(r.masked(x), r.module(x), atol=1e-5)
    assert (r.module.W == 0).sum() == r.module.W.numel() // 2


def test_export_traced_module_refuses_a_flag_other_than_the_one_traced():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, double: bool = False):
            y = self.fc(x)
            return y * 2 if double else y

    x = torch.randn(4, 8)
    gm = trace(Scaled(), example_inputs=(x, True), tracer="export").graph_module
    assert torch.allclose(gm(x), gm(x, double=True))  # the traced flag, also when left out
    with pytest.raises(InputError, match=r"`double`=False, but the module was traced with True"):
        gm(x, False)


def _linear_twice(x, w):  # wrapped below: an opaque call to torch.fx, as swin's attention is
    return F.linear(F.linear(x, w), w)


torch.fx.wrap("_linear_twice")


def test_flops_of_a_weight_used_twice_inside_an_opaque_call_add_up():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return self.head(_linear_twice(self.inp(x), self.w))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nmcompile.compile(Net(), "asp", example_inputs=(torch.randn(2, 8),))
    assert [s.name for s in r.sites] == ["w"]
    assert r.flops.sites["w"] == pytest.approx(2 * 2 * 16 * 16)  # two products, batch 1
