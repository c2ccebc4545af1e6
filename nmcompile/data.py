"""Offline image-classification datasets held in memory, and a fast deterministic batch loader.

Two datasets are available, neither of which needs the network:

``"digits"``
    scikit-learn's ``load_digits()`` (1,797 8x8 grey images that ship inside scikit-learn),
    split 80/20 stratified with ``random_state=0``, scaled to ``[0, 1]`` and normalised with the
    train split's mean and std. Stored as float32 ``[N, 1, 8, 8]``.
``"fashion-mnist"`` (alias ``"fashion_mnist"``)
    The full 60,000/10,000 Fashion-MNIST set read from its four IDX gzip files. Images stay
    uint8 in memory and are converted to normalised float32 one batch at a time by the
    loader's ``transform`` (mean 0.2860, std 0.3530), which keeps memory at 47 MB instead of
    188 MB. Files are looked for in ``root=`` when given (and only there), else in
    ``$NMCOMPILE_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``).

:class:`TensorLoader` iterates over in-memory tensors without any per-sample Python work: it
draws one permutation per epoch, shards it across replicas and slices it into batches.

Nothing heavy happens at import time: scikit-learn is imported and files are read only when
:func:`load` is called.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._errors import ConfigError, DatasetNotFoundError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "Dataset",
    "DatasetCorruptError",
    "Normalize",
    "TensorLoader",
    "datasets",
    "load",
]

#: Environment variable naming a folder that holds the Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "NMCOMPILE_FASHION_MNIST"
#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FASHION_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_DATASETS: dict[str, str] = {"digits": "digits", "fashion-mnist": "fashion-mnist"}
_ALIASES: dict[str, str] = {"fashion_mnist": "fashion-mnist"}

# Parsed Fashion-MNIST arrays, keyed by the resolved file paths plus their size and mtime, so
# loading the same files twice does not decompress them again. The arrays are shared between
# the loaders of every load() call: treat TensorLoader.x / .y as read-only.
_FASHION_CACHE: dict[tuple[tuple[str, int, int], ...], tuple[np.ndarray, ...]] = {}


class DatasetCorruptError(DatasetNotFoundError, ValueError):
    """A dataset file that exists but cannot be parsed (bad gzip, magic number or size).

    It derives from :class:`~nmcompile.DatasetNotFoundError` (no usable copy of the dataset is
    on this machine) and from ``ValueError`` (the file's content is wrong).
    """


class Normalize:
    """Per-batch transform ``(x.float() * scale - mean) / std``, e.g. uint8 images to float32.

    A class rather than a lambda so loaders stay picklable (worker processes, checkpoints).
    """

    def __init__(self, mean: float, std: float, scale: float = 1.0) -> None:
        if not std > 0:
            raise ConfigError(f"Normalize: std must be > 0, got {std!r}; pass the data's std.")
        self.mean = float(mean)
        self.std = float(std)
        self.scale = float(scale)

    def __call__(self, x: Tensor) -> Tensor:
        out = x.to(torch.float32)
        if self.scale != 1.0:
            out = out * self.scale
        return (out - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, scale={self.scale})"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"TensorLoader: {name} must be an int >= {minimum}, got {value!r} "
            f"({type(value).__name__}); pass an integer."
        )
    if value < minimum:
        raise ConfigError(f"TensorLoader: {name} must be >= {minimum}, got {value}; raise it.")
    return value


class TensorLoader:
    """Deterministic batch iterator over in-memory tensors ``x`` and ``y``.

    Iterating yields ``(xb, yb)`` pairs, with ``transform`` (if given) applied to each ``xb``.
    No per-sample Python work is done: each epoch draws one index permutation and the batches
    are slices of it (plain tensor slices, i.e. views, when neither shuffling nor sharding).

    Epochs. With ``shuffle=True`` the permutation of an epoch is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))``. ``epoch`` is
    the epoch the *next* pass will use: it is read when a pass starts and incremented by one
    **at the end of each full pass** (when the iterator is exhausted; a pass abandoned with
    ``break`` does not advance it). :meth:`set_epoch` overrides it, as with
    ``torch.utils.data.DistributedSampler``, and :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it (``{"epoch": int}``) so a resumed run sees the same order.

    Sharding. With ``num_replicas > 1`` every replica computes the same permutation, pads it
    by wrapping around to a multiple of ``num_replicas`` (as ``DistributedSampler`` does with
    ``drop_last=False``) and takes the strided slice ``perm[rank::num_replicas]``. All replicas
    therefore see ``ceil(n / num_replicas)`` samples per epoch; shards are disjoint when
    ``num_replicas`` divides ``n``, otherwise at most ``num_replicas - 1`` samples are repeated.

    Attributes: ``x``, ``y`` (the stored tensors, as given; treat them as read-only),
    ``batch_size``, ``dataset_size`` (``len(x)``, the whole dataset), ``num_samples`` (samples
    this replica yields per epoch), ``epoch``, ``shuffle``, ``seed``, ``drop_last``,
    ``num_replicas``, ``rank``, ``transform``. ``len(loader)`` is the number of batches per epoch.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ConfigError(
                f"TensorLoader: x and y must be torch.Tensor, got {type(x).__name__} and "
                f"{type(y).__name__}; convert them with torch.as_tensor()."
            )
        if x.dim() == 0 or y.dim() == 0:
            raise ConfigError(
                "TensorLoader: x and y need a leading sample dimension, got 0-d tensors; "
                "pass tensors shaped [N, ...]."
            )
        if len(x) != len(y):
            raise ConfigError(
                f"TensorLoader: len(x) == {len(x)} but len(y) == {len(y)}; x and y must hold "
                "the same number of samples."
            )
        if len(x) == 0:
            raise ConfigError("TensorLoader: x and y are empty; pass at least one sample.")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ConfigError(
                f"TensorLoader: rank must be < num_replicas, got rank={rank} with "
                f"num_replicas={num_replicas}; ranks run from 0 to num_replicas - 1."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"TensorLoader: seed must be an int, got {seed!r}; pass an integer.")
        if transform is not None and not callable(transform):
            raise ConfigError(
                f"TensorLoader: transform must be callable or None, got {transform!r}."
            )
        self.x = x
        self.y = y
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.transform = transform
        self.epoch = 0
        self.dataset_size = len(x)
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)

    def to(self, device: str | torch.device) -> TensorLoader:
        """Move the stored tensors to ``device`` (in place; returns self): a GPU run then slices
        its batches on the GPU instead of copying each one over. The order of batches does not
        change (the permutation is drawn on the CPU generator either way)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next pass uses (its shuffle order is seeded with ``seed + epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"TensorLoader.set_epoch: epoch must be an int >= 0, got {epoch!r}.")
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Return ``{"epoch": epoch}``; everything else is fixed by the constructor arguments."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the epoch saved by :meth:`state_dict`."""
        if "epoch" not in state:
            raise ConfigError(
                f"TensorLoader.load_state_dict: missing key 'epoch' (got keys {sorted(state)}); "
                "pass the dict returned by TensorLoader.state_dict()."
            )
        self.set_epoch(state["epoch"])

    def indices(self, epoch: int | None = None) -> Tensor | None:
        """The sample indices this replica visits in ``epoch`` (default: the next one).

        Returns ``None`` when the order is simply ``0 .. n-1`` (no shuffle, no sharding).
        """
        epoch = self.epoch if epoch is None else epoch
        n = self.dataset_size
        if not self.shuffle and self.num_replicas == 1:
            return None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        if self.num_replicas > 1:
            total = self.num_samples * self.num_replicas
            if total > n:
                perm = perm.repeat(math.ceil(total / n))[:total]
            perm = perm[self.rank : total : self.num_replicas]
        return perm

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the current epoch from batch index ``batch`` on (resuming mid-epoch)."""
        idx = self.indices()
        stop = len(self) * self.batch_size if self.drop_last else self.num_samples
        for start in range(batch * self.batch_size, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            if idx is None:
                xb, yb = self.x[start:end], self.y[start:end]
            else:
                sel = idx[start:end]
                xb, yb = self.x[sel], self.y[sel]
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb
        self.epoch += 1

    def __repr__(self) -> str:
        return (
            f"TensorLoader(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
            f"num_replicas={self.num_replicas}, rank={self.rank}, epoch={self.epoch}, "
            f"x_dtype={self.x.dtype}, transform={self.transform!r})"
        )


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: train/val loaders plus what a model needs to know about its input.

    ``mean`` and ``std`` are the scalar statistics used to normalise the images (in the
    ``[0, 1]`` scale); ``input_shape`` is ``(C, H, W)`` without the batch dimension.
    """

    name: str
    train: TensorLoader
    val: TensorLoader
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float
    std: float

    def to(self, device: str | torch.device) -> Dataset:
        """Both splits on ``device`` (see :meth:`TensorLoader.to`); returns self.
        :meth:`example_input` stays on the CPU, where nmcompile traces models."""
        self.train.to(device)
        self.val.to(device)
        return self

    def example_input(self, batch: int = 1) -> Tensor:
        """The first ``batch`` validation images as a normalised float32 ``[batch, C, H, W]``.

        Real data (not noise), identical on every replica; a fresh tensor each call.
        """
        size = self.val.dataset_size
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= size:
            raise ConfigError(
                f"Dataset.example_input: batch must be an int in 1..{size} (the size of "
                f"{self.name!r}'s validation split), got {batch!r}."
            )
        xb = self.val.x[:batch].cpu()
        xb = self.val.transform(xb) if self.val.transform is not None else xb.clone()
        return xb.to(torch.float32)


def datasets() -> list[str]:
    """The dataset names :func:`load` accepts (aliases not included)."""
    return list(_DATASETS)


def load(
    name: str,
    *,
    batch_size: int = 64,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    val_batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> Dataset:
    """Load dataset ``name`` (see :func:`datasets`) into memory and wrap it in loaders.

    The train loader shuffles (seeded with ``seed``, see :class:`TensorLoader`), the val loader
    does not; both are sharded with ``num_replicas`` / ``rank``. ``val_batch_size`` defaults to
    ``batch_size``. ``root`` is only used by Fashion-MNIST: a folder holding the four IDX files,
    or a torchvision root containing ``FashionMNIST/raw/``.

    Raises :class:`~nmcompile.ConfigError` for an unknown name or bad option and
    :class:`~nmcompile.DatasetNotFoundError` when the files are not on this machine.
    """
    if not isinstance(name, str):
        raise ConfigError(f"load: name must be a str, got {name!r}; choose one of {datasets()}.")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _DATASETS:
        raise ConfigError(
            f"load: unknown dataset {name!r}; valid names are {datasets()} "
            f"(aliases: {sorted(_ALIASES)})."
        )
    if val_batch_size is None:
        val_batch_size = batch_size
    if key == "digits":
        return _load_digits(batch_size, val_batch_size, seed, num_replicas, rank)
    return _load_fashion_mnist(root, batch_size, val_batch_size, seed, num_replicas, rank)


def _make_dataset(
    name: str,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    num_classes: int,
    mean: float,
    std: float,
    transform: Callable[[Tensor], Tensor] | None,
    batch_size: int,
    val_batch_size: int,
    seed: int,
    num_replicas: int,
    rank: int,
) -> Dataset:
    x_tr, y_tr, x_va, y_va = tensors
    common: dict[str, Any] = {
        "seed": seed,
        "num_replicas": num_replicas,
        "rank": rank,
        "transform": transform,
    }
    train = TensorLoader(x_tr, y_tr, batch_size, shuffle=True, **common)
    val = TensorLoader(x_va, y_va, val_batch_size, shuffle=False, **common)
    return Dataset(
        name=name,
        train=train,
        val=val,
        num_classes=num_classes,
        input_shape=tuple(x_tr.shape[1:]),
        mean=mean,
        std=std,
    )


def _load_digits(
    batch_size: int, val_batch_size: int, seed: int, num_replicas: int, rank: int
) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    mean = float(x_tr.mean(dtype=np.float64))
    std = float(x_tr.std(dtype=np.float64))
    x_tr = torch.from_numpy(((x_tr - mean) / std).astype(np.float32))
    x_va = torch.from_numpy(((x_va - mean) / std).astype(np.float32))
    return _make_dataset(
        "digits",
        (x_tr, torch.from_numpy(y_tr), x_va, torch.from_numpy(y_va)),
        num_classes=10,
        mean=mean,
        std=std,
        transform=None,
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )


# ---------------------------------------------------------------- Fashion-MNIST


def _find_in_dir(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each gzipped or unpacked), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _fashion_search_dirs(root: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    dirs: list[tuple[str, Path]] = []
    if root is not None:  # an explicit root is the only place looked at: no silent fallback
        r = Path(root).expanduser()
        return [("root=", r), ("root=", r / "FashionMNIST" / "raw")]
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        e = Path(env).expanduser()
        dirs += [
            (f"${FASHION_MNIST_ENV}", e),
            (f"${FASHION_MNIST_ENV}", e / "FashionMNIST" / "raw"),
        ]
    dirs.append(("default", Path(DEFAULT_FASHION_MNIST_DIR)))
    return dirs


def _locate_fashion_mnist(root: str | os.PathLike[str] | None) -> dict[str, Path]:
    searched = _fashion_search_dirs(root)
    for _, folder in searched:
        files = _find_in_dir(folder)
        if files is not None:
            return files
    env_note = "" if os.environ.get(FASHION_MNIST_ENV) else f" (${FASHION_MNIST_ENV} is not set)"
    places = "\n".join(f"  - {folder}  [{origin}]" for origin, folder in searched)
    names = ", ".join(f"{stem}.gz" for stem in _FASHION_FILES.values())
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: no folder holds all four IDX files ({names}; gzipped or "
        f"unpacked). Searched, in order{env_note}:\n{places}\n"
        "Fix: on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` (installs to "
        f"{DEFAULT_FASHION_MNIST_DIR}), or pass root= to a folder holding the four files or to a "
        "torchvision FashionMNIST root (the folder containing FashionMNIST/raw/), or set "
        f"${FASHION_MNIST_ENV} to such a folder. This project never downloads data."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {path} vanished while reading it."
            ) from exc
        raise DatasetCorruptError(
            f"Fashion-MNIST file {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "delete it and reinstall the dataset (`apt-get install --reinstall "
            "dataset-fashion-mnist`, or copy the original file again)."
        ) from exc


def _parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 2051: images [N, rows, cols], 2049: labels)."""
    buf = _read_bytes(path)
    header = 4 * (1 + ndim)
    fix = (
        "delete it and reinstall the dataset (`apt-get install --reinstall "
        "dataset-fashion-mnist`, or copy the original file again)"
    )
    if len(buf) < header:
        raise DatasetCorruptError(
            f"Fashion-MNIST file {path} is corrupt: {len(buf)} bytes, shorter than the "
            f"{header}-byte IDX header; {fix}."
        )
    fields = np.frombuffer(buf, dtype=">u4", count=1 + ndim)
    got_magic, dims = int(fields[0]), [int(d) for d in fields[1:]]
    if got_magic != magic:
        raise DatasetCorruptError(
            f"Fashion-MNIST file {path} is corrupt: IDX magic number {got_magic}, expected "
            f"{magic} ({'images' if magic == _IDX_IMAGES_MAGIC else 'labels'}); {fix}."
        )
    expected = header + math.prod(dims)
    if len(buf) != expected:
        raise DatasetCorruptError(
            f"Fashion-MNIST file {path} is corrupt: header says {dims} -> {expected} bytes, the "
            f"file holds {len(buf)}; {fix}."
        )
    # bytearray -> writable array (torch.from_numpy warns on read-only buffers).
    arr = np.frombuffer(bytearray(memoryview(buf)[header:]), dtype=np.uint8)
    return arr.reshape(dims)


def _read_fashion_arrays(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    resolved = {k: p.resolve() for k, p in files.items()}
    key = tuple(
        (str(p), (st := p.stat()).st_size, st.st_mtime_ns)
        for p in (resolved[k] for k in _FASHION_FILES)
    )
    cached = _FASHION_CACHE.get(key)
    if cached is not None:
        return cached
    out: list[np.ndarray] = []
    for split in ("train", "test"):
        img_path, lbl_path = resolved[f"{split}_images"], resolved[f"{split}_labels"]
        images = _parse_idx(img_path, _IDX_IMAGES_MAGIC, 3)
        labels = _parse_idx(lbl_path, _IDX_LABELS_MAGIC, 1)
        if images.shape[1:] != (28, 28):
            raise DatasetCorruptError(
                f"Fashion-MNIST file {img_path} holds {images.shape[1]}x{images.shape[2]} images, "
                "expected 28x28; point root= at the Fashion-MNIST files."
            )
        if len(images) != len(labels):
            raise DatasetCorruptError(
                f"Fashion-MNIST files {img_path} ({len(images)} images) and {lbl_path} "
                f"({len(labels)} labels) disagree; reinstall the dataset."
            )
        if labels.size and int(labels.max()) > 9:
            raise DatasetCorruptError(
                f"Fashion-MNIST file {lbl_path} holds label {int(labels.max())}, expected 0..9; "
                "reinstall the dataset."
            )
        out += [images.reshape(-1, 1, 28, 28), labels.astype(np.int64)]
    result = tuple(out)
    _FASHION_CACHE[key] = result
    return result


def _load_fashion_mnist(
    root: str | os.PathLike[str] | None,
    batch_size: int,
    val_batch_size: int,
    seed: int,
    num_replicas: int,
    rank: int,
) -> Dataset:
    files = _locate_fashion_mnist(root)
    x_tr, y_tr, x_va, y_va = _read_fashion_arrays(files)
    tensors = (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_va),
        torch.from_numpy(y_va),
    )
    return _make_dataset(
        "fashion-mnist",
        tensors,
        num_classes=10,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        transform=Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD, scale=1.0 / 255.0),
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
