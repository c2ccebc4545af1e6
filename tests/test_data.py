"""Tests for nmcompile.data: TensorLoader semantics, digits, and Fashion-MNIST discovery/parsing."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmcompile import ConfigError, DatasetNotFoundError
from nmcompile import data as nmdata
from nmcompile.data import TensorLoader

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _ids(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x holds each sample's own index so yielded batches reveal which samples they contain."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    return x, torch.arange(n)


def _epoch_ids(loader: TensorLoader) -> list[int]:
    out: list[int] = []
    for xb, yb in loader:
        assert torch.equal(xb[:, 0].long(), yb)  # x and y stay aligned
        out += yb.tolist()
    return out


# ---------------------------------------------------------------- import hygiene


def test_import_is_light() -> None:
    code = (
        "import sys, nmcompile.data, nmcompile.zoo\n"
        "bad = [m for m in ('torchvision', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not nmcompile.data._FASHION_CACHE\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- TensorLoader


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50),
    batch_size=st.integers(1, 17),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_loader_covers_every_sample_once(n: int, batch_size: int, shuffle: bool, seed: int) -> None:
    loader = TensorLoader(*_ids(n), batch_size, shuffle=shuffle, seed=seed)
    ids = _epoch_ids(loader)
    assert sorted(ids) == list(range(n))
    assert len(list(loader)) == len(loader) == -(-n // batch_size)
    assert loader.dataset_size == n and loader.batch_size == batch_size
    if not shuffle:
        assert ids == list(range(n))


def test_loader_drop_last() -> None:
    loader = TensorLoader(*_ids(10), 4, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert all(len(yb) == 4 for _, yb in batches)
    assert len(set(torch.cat([yb for _, yb in batches]).tolist())) == 8


def test_loader_determinism_and_epochs() -> None:
    a = TensorLoader(*_ids(100), 8, shuffle=True, seed=3)
    b = TensorLoader(*_ids(100), 8, shuffle=True, seed=3)
    first = _epoch_ids(a)
    assert first == _epoch_ids(b)
    assert first != list(range(100))
    # epoch advances at the end of a full pass, giving a new order
    assert a.epoch == 1 and a.state_dict() == {"epoch": 1}
    second = _epoch_ids(a)
    assert second != first
    # the order is a function of (seed, epoch) only
    c = TensorLoader(*_ids(100), 8, shuffle=True, seed=3)
    c.set_epoch(1)
    assert _epoch_ids(c) == second
    d = TensorLoader(*_ids(100), 8, shuffle=True, seed=3)
    d.load_state_dict({"epoch": 0})
    assert _epoch_ids(d) == first
    # another seed, another order
    assert _epoch_ids(TensorLoader(*_ids(100), 8, shuffle=True, seed=4)) != first


def test_abandoned_pass_does_not_advance_epoch() -> None:
    loader = TensorLoader(*_ids(20), 4, shuffle=True)
    for _ in loader:
        break
    assert loader.epoch == 0


def test_unshuffled_loader_is_the_same_every_epoch() -> None:
    loader = TensorLoader(*_ids(13), 5, shuffle=False)
    assert _epoch_ids(loader) == _epoch_ids(loader) == list(range(13))


def test_transform_is_applied_per_batch() -> None:
    x = torch.arange(12, dtype=torch.uint8).reshape(12, 1, 1, 1)
    calls: list[int] = []

    def tf(xb: torch.Tensor) -> torch.Tensor:
        calls.append(len(xb))
        return xb.float() / 255

    loader = TensorLoader(x, torch.zeros(12), 5, shuffle=False, transform=tf)
    out = [xb for xb, _ in loader]
    assert calls == [5, 5, 2]
    assert out[0].dtype == torch.float32 and loader.x.dtype == torch.uint8
    assert torch.allclose(torch.cat(out).flatten(), torch.arange(12) / 255)


@pytest.mark.parametrize("shuffle", [True, False])
def test_sharding_disjoint_equal(shuffle: bool) -> None:
    shards = [
        _epoch_ids(TensorLoader(*_ids(10), 3, shuffle=shuffle, seed=5, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_sharding_pads_by_wrapping() -> None:
    loaders = [TensorLoader(*_ids(11), 4, shuffle=True, num_replicas=3, rank=r) for r in range(3)]
    shards = [_epoch_ids(ld) for ld in loaders]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert all(ld.num_samples == 4 and len(ld) == 1 for ld in loaders)
    everything = shards[0] + shards[1] + shards[2]
    assert set(everything) == set(range(11))  # 12 slots, 11 samples: one repeated
    assert len(everything) - len(set(everything)) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"y": torch.zeros(9)}, r"len\(x\) == 10 but len\(y\) == 9"),
        ({"rank": 2, "num_replicas": 2}, "rank must be < num_replicas"),
        ({"rank": -1}, "rank"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"x": [1, 2]}, "torch.Tensor"),
        ({"x": torch.zeros(0), "y": torch.zeros(0)}, "empty"),
        ({"transform": 3}, "transform"),
    ],
)
def test_loader_validation(kwargs: dict, match: str) -> None:
    args = {"x": torch.zeros(10, 2), "y": torch.zeros(10), "batch_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        TensorLoader(args.pop("x"), args.pop("y"), args.pop("batch_size"), shuffle=True, **args)


def test_state_dict_validation() -> None:
    loader = TensorLoader(*_ids(4), 2, shuffle=True)
    with pytest.raises(ConfigError, match="epoch"):
        loader.load_state_dict({})
    with pytest.raises(ConfigError, match="epoch"):
        loader.set_epoch(-1)


# ---------------------------------------------------------------- digits


def test_digits() -> None:
    ds = nmdata.load("digits", batch_size=32, seed=1)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.train.dataset_size == 1437 and ds.val.dataset_size == 360
    assert ds.train.x.shape == (1437, 1, 8, 8) and ds.train.x.dtype == torch.float32
    assert ds.train.shuffle and not ds.val.shuffle and ds.train.seed == 1
    assert ds.val.batch_size == 32 and len(ds.train) == 45
    # normalised with the train split's statistics
    assert abs(ds.train.x.mean().item()) < 1e-4
    assert abs(ds.train.x.std().item() - 1) < 1e-3
    assert abs(ds.val.x.mean().item()) < 0.1
    # mean/std are in the [0, 1] scale: un-normalising gives back images/16 in [0, 1]
    raw = ds.train.x * ds.std + ds.mean
    assert raw.min().item() > -1e-5 and raw.max().item() < 1 + 1e-5
    # stratified split: every class holds ~20% of its samples in val
    tr = torch.bincount(ds.train.y, minlength=10)
    va = torch.bincount(ds.val.y, minlength=10)
    assert ((va.float() / (tr + va).float() - 0.2).abs() < 0.02).all()
    # example_input is real val data, float32, a fresh tensor
    ex = ds.example_input(4)
    assert ex.shape == (4, 1, 8, 8) and ex.dtype == torch.float32
    assert torch.equal(ex, ds.val.x[:4]) and ex.data_ptr() != ds.val.x.data_ptr()
    with pytest.raises(ConfigError, match="batch"):
        ds.example_input(0)


def test_digits_split_is_fixed_and_loader_options() -> None:
    a = nmdata.load("digits", batch_size=16, val_batch_size=100, num_replicas=2, rank=1)
    b = nmdata.load("digits")
    assert torch.equal(a.val.x, b.val.x)  # the split does not depend on options
    assert a.val.batch_size == 100 and a.val.num_replicas == 2 and a.val.rank == 1
    assert a.train.num_samples == 719 and a.val.num_samples == 180


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError) as info:
        nmdata.load("cifar10")
    for name in nmdata.datasets():
        assert name in str(info.value)
    assert nmdata.datasets() == ["digits", "fashion-mnist"]


# ---------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, magic: int, arr: np.ndarray, *, gz: bool = True) -> None:
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    payload += arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(folder: Path, *, n_train: int = 12, n_test: int = 6, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", 2051, images, gz=gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, labels, gz=gz)


@pytest.fixture
def no_system_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide every real copy of Fashion-MNIST: env var unset, default dir pointed at nothing."""
    monkeypatch.delenv(nmdata.FASHION_MNIST_ENV, raising=False)
    missing = tmp_path / "no-such-default"
    monkeypatch.setattr(nmdata, "DEFAULT_FASHION_MNIST_DIR", missing)
    return missing


def test_fashion_mnist_real(monkeypatch: pytest.MonkeyPatch) -> None:
    if not SYSTEM_FMNIST.is_dir():
        # CI installs the Debian package and sets this, so a missing copy fails there
        assert not os.environ.get("NMCOMPILE_REQUIRE_FASHION_MNIST"), (
            f"{SYSTEM_FMNIST} absent although NMCOMPILE_REQUIRE_FASHION_MNIST is set"
        )
        pytest.skip(f"{SYSTEM_FMNIST} absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.delenv(nmdata.FASHION_MNIST_ENV, raising=False)
    ds = nmdata.load("fashion-mnist", batch_size=256)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train.dataset_size == 60000 and ds.val.dataset_size == 10000
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (60000, 1, 28, 28)
    for split in (ds.train, ds.val):
        assert split.y.min().item() == 0 and split.y.max().item() == 9
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10
    # the first training label, read independently from the file's byte 8 (after the header)
    with gzip.open(SYSTEM_FMNIST / "train-labels-idx1-ubyte.gz", "rb") as fh:
        first = fh.read(9)[8]
    assert first == 9  # an ankle boot
    assert ds.train.y[0].item() == first
    # per-batch conversion to normalised float32, stats consistent with the documented constants
    xb, yb = next(iter(ds.train))
    assert xb.shape == (256, 1, 28, 28) and xb.dtype == torch.float32 and yb.shape == (256,)
    pixel_mean = ds.train.x.sum(dtype=torch.float64).item() / ds.train.x.numel() / 255
    assert abs(pixel_mean - ds.mean) < 1e-3
    ex = ds.example_input(2)
    assert ex.dtype == torch.float32 and ex.shape == (2, 1, 28, 28)
    assert torch.allclose(ex, (ds.val.x[:2].float() / 255 - 0.2860) / 0.3530)
    # a second load (via the alias) reuses the parsed arrays
    again = nmdata.load("fashion_mnist")
    assert again.train.x.data_ptr() == ds.train.x.data_ptr()


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_fashion_mnist_root_layouts(tmp_path: Path, no_system_fashion: Path, layout: str) -> None:
    if layout == "flat-gz":
        _fake_fashion(tmp_path / "fm")
        root = tmp_path / "fm"
    else:
        _fake_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
        root = tmp_path / "tv"
    ds = nmdata.load("fashion-mnist", root=root, batch_size=5)
    assert ds.train.dataset_size == 12 and ds.val.dataset_size == 6
    assert ds.train.y.tolist() == [i % 10 for i in range(12)]
    assert len(ds.train) == 3 and ds.example_input(6).shape == (6, 1, 28, 28)


def test_fashion_mnist_env_var(
    tmp_path: Path, no_system_fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_fashion(tmp_path / "env", n_train=7)
    monkeypatch.setenv(nmdata.FASHION_MNIST_ENV, str(tmp_path / "env"))
    ds = nmdata.load("fashion-mnist")
    assert ds.train.dataset_size == 7
    # an explicit root= is the only place looked at: a wrong one is an error, not a fallback
    with pytest.raises(DatasetNotFoundError, match="empty"):
        nmdata.load("fashion-mnist", root=tmp_path / "empty")


@pytest.mark.parametrize("corruption", ["magic", "size", "not-gzip", "truncated-gzip"])
def test_fashion_mnist_corrupt_file_named(
    tmp_path: Path, no_system_fashion: Path, corruption: str
) -> None:
    _fake_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    if corruption == "magic":
        _write_idx(tmp_path / "train-images-idx3-ubyte", 2049, np.zeros((12, 28, 28)))
    elif corruption == "size":
        _write_idx(tmp_path / "train-images-idx3-ubyte", 2051, np.zeros((12, 28, 27)))
        with gzip.open(bad, "rb") as fh:
            payload = fh.read()
        with gzip.open(bad, "wb") as fh:  # header says 28x27, so 12*28*27 bytes expected
            fh.write(payload[:8] + struct.pack(">II", 28, 28) + payload[16:])
    elif corruption == "not-gzip":
        bad.write_bytes(b"this is not a gzip file at all")
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(nmdata.DatasetCorruptError) as info:
        nmdata.load("fashion-mnist", root=tmp_path)
    assert str(bad) in str(info.value)
    assert "reinstall" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DatasetNotFoundError)


def test_fashion_mnist_absent(tmp_path: Path, no_system_fashion: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        nmdata.load("fashion-mnist", root=empty)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(empty) in msg and "root=" in msg
    with pytest.raises(DatasetNotFoundError) as info:
        nmdata.load("fashion-mnist")
    msg = str(info.value)
    assert str(no_system_fashion) in msg and nmdata.FASHION_MNIST_ENV in msg


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dataset_to_device_keeps_the_batch_order(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ref = nmdata.load("digits", batch_size=32, seed=3)
    ds = nmdata.load("digits", batch_size=32, seed=3)
    assert ds.to(device) is ds and ds.train.x.device.type == device
    for (xa, ya), (xb, yb) in zip(ref.train, ds.train):
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
    assert ds.example_input(2).device.type == "cpu"  # where models are traced
