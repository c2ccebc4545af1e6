"""A small zoo of image classifiers, randomly initialised, all traceable with ``torch.fx``.

:func:`create` builds a model by name (see :func:`models`); :func:`example_input` makes a
matching random input. No weights are downloaded: every model starts from random init.

Models
------
``"cnn"``
    A small CNN for 8x8 (digits) up to 32x32 inputs: conv(C->32)+BN+ReLU, conv(32->64)+BN+ReLU,
    maxpool 2, conv(64->64)+BN+ReLU, adaptive avg pool 2x2, Linear(256->128)+ReLU,
    Linear(128->num_classes). Every reduction dimension except the stem's (288, 576, 256, 128)
    is a multiple of 32, so 2:4, 1:4, 2:8, 4:16 and 8:32 all apply.
``"mlp"``
    Flatten, Linear(C*H*W->256)+ReLU, Linear(256->128)+ReLU, Linear(128->num_classes).
``"lenet300"``
    LeNet-300-100, the lottery-ticket papers' MLP: Flatten, Linear(C*H*W->300)+ReLU,
    Linear(300->100)+ReLU, Linear(100->num_classes) (784-300-100-10 on 28x28 grey images).
``"resnet20"``, ``"resnet56"``
    CIFAR ResNets (He et al. 2016): stem conv(C->16), three stages of 16/32/64 channels with
    3 / 9 basic blocks each, option-B shortcuts (1x1 conv + BN, real modules, when the shape
    changes), global average pool, Linear(64->num_classes). Kaiming-normal conv init.
``"vgg16"``
    CIFAR VGG-16 with BN, cfg ``[64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M]``,
    adaptive avg pool 1x1, Linear(512->num_classes). A max-pool that would shrink the feature
    map below 1x1 is left out, so 32x32 keeps all five pools, 28x28 keeps four (28->14->7->3->1)
    and 8x8 keeps three.
``"bert_base"``, ``"bert_tiny"``
    Transformer encoders over token embeddings ``[batch, seq, dim]`` for latency work: 12 layers of
    768 / 3072 with 12 heads (BERT-base sized) and 2 layers of 128 / 512 with 2 heads, pre-norm,
    explicit ``nn.Linear`` qkv / proj / fc1 / fc2 layers (every one prunable) and
    ``scaled_dot_product_attention``; logits from the first token.
``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"``, ``"vit_b_16"``
    torchvision's architectures with ``weights=None``. For ``in_channels != 3`` the stem conv
    (``conv1``, ``features[0][0]``, ``conv_proj``) is replaced by one taking ``in_channels``
    inputs with the same other hyper-parameters and torchvision's init. ``vit_b_16`` is built
    for ``image_size`` (a multiple of 16; 32 gives 2x2 patches + class token).

torchvision is imported only when one of its models is created.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._errors import ConfigError

__all__ = ["Encoder", "EncoderBlock", "create", "example_input", "input_shape", "models"]


def _check_int(where: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


# ---------------------------------------------------------------- small models


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """The ``"cnn"`` model: three 3x3 conv+BN+ReLU blocks, a 2x2 adaptive pool and a 2-layer head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 64),
            nn.AdaptiveAvgPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _mlp(
    num_classes: int, in_channels: int, image_size: int, hidden: tuple[int, int] = (256, 128)
) -> nn.Module:
    a, b = hidden
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, a),
        nn.ReLU(inplace=True),
        nn.Linear(a, b),
        nn.ReLU(inplace=True),
        nn.Linear(b, num_classes),
    )


# ---------------------------------------------------------------- CIFAR ResNet


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block with an option-B (1x1 conv + BN) shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): 16/32/64 channels, ``n`` basic blocks per stage."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Sequential] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


# ---------------------------------------------------------------- CIFAR VGG-16

_VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


class CifarVGG(nn.Module):
    """CIFAR VGG with BN; max-pools that would shrink the map below 1x1 are left out."""

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size // 2 >= 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                assert isinstance(v, int)
                layers += _conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


# ---------------------------------------------------------------- torchvision models


def _replace_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A Conv2d like ``old`` (same hyper-parameters) but with ``in_channels`` inputs."""
    if old.groups != 1:
        raise ConfigError(f"cannot change the input channels of grouped stem conv {old}.")
    return nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )


def _tv_resnet(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    from torchvision import models as tvm

    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        conv = _replace_conv(model.conv1, in_channels)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv
    return model


def _tv_mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        conv = _replace_conv(model.features[0][0], in_channels)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        model.features[0][0] = conv
    return model


def _tv_vit_b_16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size % 16 != 0:
        raise ConfigError(
            f"zoo.create('vit_b_16'): image_size must be a multiple of the patch size 16, got "
            f"{image_size}; resize the inputs (e.g. image_size=32 or 224)."
        )
    from torchvision.models import vit_b_16

    model = vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)
    if in_channels != 3:
        conv = _replace_conv(model.conv_proj, in_channels)
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        model.conv_proj = conv
    return model


# ---------------------------------------------------------------- registry

_Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size)

_MODELS: dict[str, _Builder] = {
    "cnn": lambda k, c, s: SmallCNN(k, c),
    "mlp": _mlp,
    "lenet300": lambda k, c, s: _mlp(k, c, s, hidden=(300, 100)),
    "resnet20": lambda k, c, s: CifarResNet(3, k, c),
    "resnet56": lambda k, c, s: CifarResNet(9, k, c),
    "vgg16": lambda k, c, s: CifarVGG(_VGG16_CFG, k, c, s),
    "resnet18": lambda k, c, s: _tv_resnet("resnet18", k, c),
    "resnet50": lambda k, c, s: _tv_resnet("resnet50", k, c),
    "mobilenet_v2": lambda k, c, s: _tv_mobilenet_v2(k, c),
    "vit_b_16": _tv_vit_b_16,
}


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with separate, prunable linear layers."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff)
        self.fc2 = nn.Linear(ff, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` over token embeddings; logits from the first token."""

    def __init__(self, num_classes: int, layers: int, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.dim = dim
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x))[:, 0])


_MODELS["bert_base"] = lambda k, c, s: Encoder(k, 12, 768, 12, 3072)
_MODELS["bert_tiny"] = lambda k, c, s: Encoder(k, 2, 128, 2, 512)
_SEQUENCE_MODELS = {"bert_base": 768, "bert_tiny": 128}


def input_shape(
    name: str, *, in_channels: int = 3, image_size: int | None = None, seq_len: int = 128
) -> tuple[int, ...]:
    """The per-sample input shape of ``name``: ``(C, H, W)`` for images (``image_size`` default:
    224 for the torchvision models, 32 otherwise) and ``(seq_len, dim)`` for the encoders."""
    _check_name("zoo.input_shape", name)
    if name in _SEQUENCE_MODELS:
        return (seq_len, _SEQUENCE_MODELS[name])
    if image_size is None:
        image_size = 224 if name in ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16") else 32
    return (in_channels, image_size, image_size)


def models() -> list[str]:
    """The model names :func:`create` accepts."""
    return list(_MODELS)


def _check_name(where: str, name: object) -> str:
    if not isinstance(name, str) or name not in _MODELS:
        raise ConfigError(f"{where}: unknown model {name!r}; valid names are {models()}.")
    return name


def create(
    name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build model ``name`` (see :func:`models`) with random weights, in train mode.

    ``image_size`` is the (square) input side the model will see: it sizes the MLPs' first
    layer, ``"vgg16"``'s pools and ``"vit_b_16"``'s position embeddings; the other models work
    for any reasonable size. Raises :class:`~nmcompile.ConfigError` for an unknown name or a bad
    option.
    """
    _check_name("zoo.create", name)
    _check_int("zoo.create", "num_classes", num_classes, 1)
    _check_int("zoo.create", "in_channels", in_channels, 1)
    _check_int("zoo.create", "image_size", image_size, 1)
    return _MODELS[name](num_classes, in_channels, image_size)


def example_input(
    name: str, *, batch: int = 1, in_channels: int = 3, image_size: int = 32, seed: int = 0
) -> Tensor:
    """A random-normal float32 input ``[batch, in_channels, image_size, image_size]`` for ``name``.

    Drawn from a local ``torch.Generator`` seeded with ``seed``, so it is reproducible and leaves
    the global RNG alone.
    """
    _check_name("zoo.example_input", name)
    _check_int("zoo.example_input", "batch", batch, 1)
    _check_int("zoo.example_input", "in_channels", in_channels, 1)
    _check_int("zoo.example_input", "image_size", image_size, 1)
    if name == "vit_b_16" and image_size % 16 != 0:
        raise ConfigError(
            f"zoo.example_input('vit_b_16'): image_size must be a multiple of 16, got {image_size}."
        )
    gen = torch.Generator().manual_seed(seed)
    if name in _SEQUENCE_MODELS:  # token embeddings [batch, 128, dim]
        return torch.randn(batch, *input_shape(name), generator=gen)
    return torch.randn(batch, in_channels, image_size, image_size, generator=gen)
