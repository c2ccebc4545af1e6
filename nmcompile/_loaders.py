"""What decides the batches a training loader yields, so a resumed run can replay them exactly.

A ``torch.utils.data.DataLoader`` draws an epoch's order and its workers' seeds when an iterator
is created: from ``generator=`` when given (the base seed of the workers, and the shuffle of the
``RandomSampler`` built for ``shuffle=True``), from the sampler's own ``generator`` (a
``RandomSampler`` / ``SubsetRandomSampler`` / ``WeightedRandomSampler`` built by the user), from
a ``DistributedSampler``'s ``seed + epoch``, or else from the global torch RNG. The trainer
snapshots all of them when an epoch begins (:func:`epoch_state`); to resume in the middle of an
epoch it puts them back (:func:`restore_epoch_state`) and replays the epoch's first batches
through the same loader, which leaves every generator, and every worker's RNG stream, where the
uninterrupted run had it.

:func:`inexact_reason` says when that cannot be bit-exact, and why: state nmcompile cannot see (an
``IterableDataset``, a sampler or batch sampler of the user's own class, workers that persist
across epochs, an iterator that can be walked once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "epoch_state",
    "generators",
    "inexact_reason",
    "restore_epoch_state",
    "set_epoch",
    "untouched",
]


def _samplers(loader: Any) -> list[Any]:
    """The sampler objects of a DataLoader that draw its order, outermost first."""
    out = []
    for s in (
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if s is not None and all(s is not o for o in out):
            out.append(s)
    return out


def generators(loader: Any) -> list[torch.Generator]:
    """Every distinct ``torch.Generator`` the loader and its samplers draw from (by identity:
    ``DataLoader(shuffle=True, generator=g)`` hands ``g`` to its RandomSampler too)."""
    loader = (
        getattr(loader, "loader", loader) if type(loader).__name__ == "_ShardedLoader" else loader
    )
    out: list[torch.Generator] = []
    for owner in (loader, *_samplers(loader)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not o for o in out):
            out.append(g)
    return out


def _is_dataloader(loader: Any) -> bool:
    from torch.utils.data import DataLoader

    return isinstance(loader, DataLoader)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a DataLoader's epoch-aware samplers (``DistributedSampler``) which epoch begins, as
    PyTorch asks every training loop to. Loaders that keep their own epoch (nmcompile's
    ``TensorLoader``, the trainer's sharded loader) are left to do it themselves."""
    if not _is_dataloader(loader):
        return
    for s in _samplers(loader):
        if callable(getattr(s, "set_epoch", None)):
            s.set_epoch(epoch)


def epoch_state(loader: Any) -> dict[str, Any]:
    """What the next ``iter(loader)`` draws from: the global RNG and the loader's generators."""
    return {
        "rng": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators(loader)],
    }


def restore_epoch_state(loader: Any, state: dict[str, Any]) -> None:
    """Put the loader's generators back as :func:`epoch_state` found them (the global RNG is
    the caller's, who replays inside ``torch.random.fork_rng``)."""
    gens = generators(loader)
    saved = state.get("generators", [])
    if len(gens) != len(saved):
        raise ValueError(
            f"the train_loader draws from {len(gens)} torch.Generator(s), the checkpoint saved "
            f"{len(saved)}: resume with the loader built the same way"
        )
    for g, s in zip(gens, saved):
        g.set_state(s)
    torch.set_rng_state(state["rng"])


@contextlib.contextmanager
def untouched(loader: Any):
    """Draw from ``loader`` (a batch to score on) without moving the training stream: the
    global RNG and the loader's generators are put back on exit."""
    gens = generators(loader)
    states = [g.get_state() for g in gens]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for g, st in zip(gens, states):
            g.set_state(st)


_TORCH_SAMPLERS = (
    "SequentialSampler",
    "RandomSampler",
    "SubsetRandomSampler",
    "WeightedRandomSampler",
    "DistributedSampler",
)


def inexact_reason(loader: Any) -> str | None:
    """None when a resumed run can replay ``loader``'s batches bit for bit; else why not."""
    from torch.utils.data import IterableDataset, sampler

    from .data import TensorLoader

    if isinstance(loader, TensorLoader) or callable(getattr(loader, "iter_from", None)):
        return None  # seeded per epoch, positioned by index
    if type(loader).__name__ == "_ShardedLoader":
        loader = loader.loader  # the trainer's DistributedSampler re-build of the user's loader
    if _is_dataloader(loader):
        name = f"the train_loader (a DataLoader over {type(loader.dataset).__name__})"
        if isinstance(loader.dataset, IterableDataset):
            return (
                f"{name} is an IterableDataset: its stream is its own code, which nmcompile "
                "cannot save; a resumed run replays the epoch's first batches by iterating it "
                "again, the same batches only if it yields the same ones from the same RNG state"
            )
        if loader.num_workers > 0 and loader.persistent_workers:
            return (
                f"{name} keeps persistent_workers, whose RNG streams run on across epochs and "
                "cannot be saved; use persistent_workers=False for bit-exact resume"
            )
        for s in _samplers(loader):
            cls = type(s)
            known = cls.__name__ in _TORCH_SAMPLERS or cls is sampler.BatchSampler
            if not (known and cls.__module__.startswith("torch.utils.data")):
                return (
                    f"{name} draws from a {cls.__qualname__}, a sampler of its own class whose "
                    "state nmcompile cannot see; give it a torch.Generator as `generator` "
                    "(saved) or use torch's samplers for bit-exact resume"
                )
        return None
    if isinstance(loader, Sequence) and not isinstance(loader, (str, bytes)):
        return None  # a list of batches: the same every pass
    if isinstance(loader, Iterator):
        return (
            f"the train_loader is a {type(loader).__name__} iterator, which can be walked once: "
            "a resumed run cannot replay it; pass a list, a DataLoader or a TensorLoader"
        )
    if isinstance(loader, Iterable):
        return (
            f"the train_loader is a {type(loader).__name__}, whose state nmcompile cannot see; a "
            "resumed run replays the epoch's first batches by iterating it again, the same "
            "batches only if it draws them from the global torch RNG or from nothing"
        )
    return f"the train_loader is a {type(loader).__name__}, not an iterable"
