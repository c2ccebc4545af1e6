"""Tests for nmcompile.zoo: every model builds, runs, traces with torch.fx; the CNN really learns."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from nmcompile import ConfigError, zoo
from nmcompile import data as nmdata

ALL = [
    "cnn", "mlp", "lenet300", "resnet20", "resnet56", "vgg16",
    "resnet18", "resnet50", "mobilenet_v2", "vit_b_16", "bert_base", "bert_tiny",
]  # fmt: skip
IMAGE_MODELS = ALL[:-2]

# (in_channels, image_size) per model: the model's natural size plus a 1-channel variant.
CASES = [
    ("cnn", 3, 32), ("cnn", 1, 8), ("cnn", 1, 28),
    ("mlp", 3, 32), ("mlp", 1, 8),
    ("lenet300", 1, 28), ("lenet300", 3, 8),
    ("resnet20", 3, 32), ("resnet20", 1, 28),
    ("resnet56", 3, 32), ("resnet56", 1, 8),
    ("vgg16", 3, 32), ("vgg16", 1, 28), ("vgg16", 1, 8),
    ("resnet18", 3, 32), ("resnet18", 1, 28),
    ("resnet50", 3, 32), ("resnet50", 1, 16),
    ("mobilenet_v2", 3, 32), ("mobilenet_v2", 1, 28),
    ("vit_b_16", 3, 32), ("vit_b_16", 1, 16),
]  # fmt: skip


def test_models_listed() -> None:
    assert zoo.models() == ALL
    assert {name for name, _, _ in CASES} == set(IMAGE_MODELS)


@pytest.mark.parametrize("name", ["bert_tiny", "bert_base"])
def test_encoders_build_forward_trace(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=3).eval()
    assert zoo.input_shape(name) == (128, 128 if name == "bert_tiny" else 768)
    x = zoo.example_input(name, batch=2)[:, :16]
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (2 if name == "bert_tiny" else 12) * 4 + 1


@pytest.mark.parametrize(("name", "in_channels", "image_size"), CASES)
def test_build_forward_trace(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    assert isinstance(model, nn.Module) and model.training
    x = zoo.example_input(name, batch=2, in_channels=in_channels, image_size=image_size)
    assert x.shape == (2, in_channels, image_size, image_size) and x.dtype == torch.float32
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        out_traced = traced(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_traced, out, rtol=0, atol=0)
    # the stem really takes in_channels inputs
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        assert first_conv.in_channels == in_channels


def test_cnn_reduction_dims_are_multiples_of_32() -> None:
    model = zoo.create("cnn", in_channels=1)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 5
    for layer in layers[1:-1]:  # not the stem, not the classifier
        reduction = layer.weight[0].numel()
        assert reduction % 32 == 0, (layer, reduction)


def test_cifar_resnet_structure() -> None:
    for name, depth in (("resnet20", 20), ("resnet56", 56)):
        model = zoo.create(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(convs) + len(linears) == depth
        shortcuts = [
            m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
        ]
        assert len(shortcuts) == 2  # option B, at the two stage transitions
        assert {c.out_channels for c in convs} == {16, 32, 64}


def test_vgg16_pools_adapt_to_image_size() -> None:
    def pools(size: int) -> int:
        model = zoo.create("vgg16", image_size=size)
        return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())

    assert (pools(32), pools(28), pools(8)) == (5, 4, 3)
    convs = [m for m in zoo.create("vgg16").modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13


def test_example_input_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = zoo.example_input("cnn", batch=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, zoo.example_input("cnn", batch=3))
    assert not torch.equal(a, zoo.example_input("cnn", batch=3, seed=1))


def test_errors() -> None:
    with pytest.raises(ConfigError) as info:
        zoo.create("resnet1000")
    for name in ALL:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="multiple of"):
        zoo.create("vit_b_16", image_size=28)
    with pytest.raises(ConfigError, match="num_classes"):
        zoo.create("cnn", num_classes=0)
    with pytest.raises(ConfigError, match="in_channels"):
        zoo.create("mlp", in_channels=0)
    with pytest.raises(ConfigError, match="valid names"):
        zoo.example_input("nope")


def test_cnn_trains_on_digits() -> None:
    torch.manual_seed(0)
    ds = nmdata.load("digits", batch_size=64, seed=0)
    model = zoo.create("cnn", num_classes=ds.num_classes, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in ds.val)
        model.train()
        return correct / ds.val.dataset_size

    assert accuracy() < 0.5  # untrained: chance level, so the test below can fail
    step = 0
    while step < 300:
        for xb, yb in ds.train:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            step += 1
            if step == 300:
                break
    assert accuracy() > 0.85
