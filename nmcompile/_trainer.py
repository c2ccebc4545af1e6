"""The ``Trainer`` protocol the methods call, and ``SupervisedTrainer``, the batteries-included one.

Methods never own a training loop: they call ``trainer.train(model, iterations, on_step)`` and
``trainer.evaluate(model)``, so a user can bring any loop that honours the protocol. A trainer
calls ``on_step(StepInfo)`` after every optimizer step; a True return ends training early (the
early-bird tickets of L-mIMP stop a round that way), and the step's ``batch_size`` is what the
FLOP accounting charges.

Each ``train`` call is one round: a fresh optimizer and a learning-rate schedule that starts over
(the lottery-ticket convention: the optimizer is re-created every round). The data stream does
not start over: it continues where the last call stopped, and ``state_dict`` records where that is
(and, called from inside a ``train`` call, the call itself: the step and the optimizer) so a
resumed run sees the same batches and continues the same call.

A trainer of your own needs only ``train`` and ``evaluate``. To make checkpointed runs resume bit
for bit it also gives ``state_dict()`` / ``load_state_dict(state)`` for its data stream, and, to
be continued inside a ``train`` call (single-run methods), sets ``resumes_mid_train = True`` and
makes the first ``train`` call after ``load_state_dict`` continue the call the state was taken
in, numbering its steps on from there. Without these a checkpointed run still resumes, with a
warning that it will not be exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import _dist
from ._errors import ConfigError, InputError
from ._loaders import epoch_state, generators, inexact_reason, restore_epoch_state, set_epoch

__all__ = ["OnStep", "StepInfo", "SupervisedTrainer", "Trainer"]


@dataclass(frozen=True)
class StepInfo:
    """What a trainer reports after each optimizer step of a ``train`` call."""

    iteration: int  # 1-based, within this train() call
    batch_size: int
    loss: torch.Tensor  # detached; call .item() only when needed (it syncs a GPU)
    lr: float


OnStep = Callable[[StepInfo], bool | None]


@runtime_checkable
class Trainer(Protocol):
    """What methods need from a training loop."""

    def train(self, model: nn.Module, iterations: int, on_step: OnStep | None = None) -> None:
        """Train ``model`` in place for ``iterations`` optimizer steps, calling ``on_step`` after
        each; stop early when it returns True."""
        ...

    def evaluate(self, model: nn.Module) -> float | None:
        """Top-1 accuracy in [0, 1] on held-out data (None when there is none)."""
        ...


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    """The logits of ``model`` on input ``x``: a dict input is passed as keywords (a tokenizer's
    output); an output with ``logits`` (a transformers ``ModelOutput``), a dict or a tuple gives
    its logits / first tensor."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(
        f"the model returned {type(out).__name__}; SupervisedTrainer needs logits: a tensor, an "
        "output with .logits, or a tuple whose first element is the logits"
    )


def _split(batch: Any, where: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"input", "target"} <= set(batch):
        return batch["input"], batch["target"]
    raise InputError(
        f"{where} must yield (input, target) pairs or dicts with 'input' and 'target', got "
        f"{type(batch).__name__}"
    )


class _ShardedLoader:
    """A DataLoader re-built over a ``DistributedSampler`` for this rank. Like ``TensorLoader`` it
    advances its epoch (the sampler's shuffle seed) after each full pass and saves it."""

    def __init__(self, loader: Any, num_replicas: int, rank: int) -> None:
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        self.sampler = DistributedSampler(
            loader.dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            drop_last=loader.drop_last,
        )
        self.loader = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=self.sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            generator=loader.generator,  # the workers' base seeds
            worker_init_fn=loader.worker_init_fn,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        yield from self.loader
        self.epoch += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


def _shard(loader: Any, world: int, rank: int, what: str) -> Any:
    """``loader`` restricted to this rank's share of every epoch (unchanged when it already is)."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler

    from .data import TensorLoader

    if isinstance(loader, TensorLoader):
        if loader.num_replicas > 1:
            return loader
        sharded = TensorLoader(
            loader.x,
            loader.y,
            loader.batch_size,
            shuffle=loader.shuffle,
            seed=loader.seed,
            drop_last=loader.drop_last,
            num_replicas=world,
            rank=rank,
            transform=loader.transform,
        )
        sharded.set_epoch(loader.epoch)
        return sharded
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, DistributedSampler) or loader.batch_sampler is None:
            return loader
        if type(loader.batch_sampler).__name__ != "BatchSampler":
            warnings.warn(
                f"{what} uses a custom batch_sampler: nmcompile leaves it as it is, so it must "
                "yield this rank's share itself",
                stacklevel=3,
            )
            return loader
        return _ShardedLoader(loader, world, rank)
    warnings.warn(
        f"{what} is a {type(loader).__name__}, which nmcompile cannot shard: every rank trains on "
        "what it yields, so it must yield this rank's share (use a DataLoader or "
        "nmcompile.data.TensorLoader to have it sharded for you)",
        stacklevel=3,
    )
    return loader


class SupervisedTrainer:
    """SGD with momentum (or AdamW), step LR milestones, linear warm-up, top-1 evaluation, a
    progress bar.

    ``optimizer``: ``"sgd"`` (momentum, weight decay) or ``"adamw"`` (decoupled weight decay, the
    usual choice for transformers; ``momentum`` is then unused). ``warmup``: iterations (int) or
    a fraction of each ``train`` call (float in [0, 1)) over which the LR rises linearly from
    ``lr / warmup_iterations`` to ``lr``; it starts over with every call, as the optimizer does.

    ``milestones``: iteration counts (ints) or fractions of a ``train`` call's iterations (floats
    in (0, 1)); the LR is multiplied by ``gamma`` at each. ``schedule="cosine"`` anneals the LR
    from ``lr`` to 0 over each ``train`` call instead (after the warm-up; the LBC and IEE papers'
    schedule), and takes no milestones. ``progress=None`` shows a bar only on a terminal.

    Under ``torchrun`` (see ``nmcompile._dist``) the trainer shards ``train_loader`` across ranks
    (a ``TensorLoader`` by ``num_replicas`` / ``rank``, a ``DataLoader`` through a
    ``DistributedSampler``) and trains through ``DistributedDataParallel``: each rank's batch is
    ``batch_size``, the global batch ``world_size * batch_size``, and the FLOPs charged per step
    are those of the global batch. Evaluation runs on the whole ``val_loader`` on every rank, so
    all ranks report the same accuracy. ``find_unused_parameters`` goes to DDP (None: on when the
    model holds learned-mask modules, whose scores can drop out of the graph).
    """

    def __init__(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: Sequence[int | float] = (),
        gamma: float = 0.1,
        schedule: str = "step",
        optimizer: str = "sgd",
        warmup: int | float = 0,
        device: str | torch.device = "cpu",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        progress: bool | None = None,
        find_unused_parameters: bool | None = None,
    ) -> None:
        for name, value, lo in (("lr", lr, 0.0), ("weight_decay", weight_decay, 0.0)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
                raise ConfigError(
                    f"SupervisedTrainer.{name} must be a finite number >= 0, got {value!r}"
                )
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"SupervisedTrainer.momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ConfigError(f"SupervisedTrainer.gamma must be in (0, 1], got {gamma!r}")
        for m in milestones:
            ok = (isinstance(m, int) and not isinstance(m, bool) and m > 0) or (
                isinstance(m, float) and 0.0 < m < 1.0
            )
            if not ok:
                raise ConfigError(
                    "SupervisedTrainer.milestones must hold iteration counts (ints > 0) or "
                    f"fractions of a round (floats in (0, 1)), got {m!r}"
                )
        if schedule not in ("step", "cosine"):
            raise ConfigError(
                f"SupervisedTrainer.schedule must be 'step' or 'cosine', got {schedule!r}"
            )
        if schedule == "cosine" and milestones:
            raise ConfigError(
                "SupervisedTrainer: milestones belong to schedule='step'; the cosine schedule "
                "anneals to 0 by itself (drop milestones or use schedule='step')"
            )
        if optimizer not in ("sgd", "adamw"):
            raise ConfigError(
                f"SupervisedTrainer.optimizer must be 'sgd' or 'adamw', got {optimizer!r}"
            )
        ok = (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0) or (
            isinstance(warmup, float) and 0.0 <= warmup < 1.0
        )
        if not ok:
            raise ConfigError(
                "SupervisedTrainer.warmup must be an iteration count (int >= 0) or a fraction of "
                f"a round (float in [0, 1)), got {warmup!r}"
            )
        if train_loader is None:
            raise ConfigError("SupervisedTrainer needs a train_loader")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.milestones = tuple(milestones)
        self.gamma = float(gamma)
        self.schedule = schedule
        self.optimizer = optimizer
        self.warmup = warmup
        self.device = torch.device(device)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.progress = progress
        self.find_unused_parameters = find_unused_parameters  # DDP; None: auto
        self.unsharded_train_loader: Any = None
        self._it: Any = None
        self._position = 0
        self._epoch = 0  # epochs begun (a DataLoader's DistributedSampler is told each)
        self._epoch_state: dict[str, Any] | None = None  # what this epoch's order was drawn from
        self._live: dict[str, Any] | None = None  # the train call in progress
        self._resume_train: dict[str, Any] | None = None  # a call to continue (load_state_dict)
        self._world = 1

    def _setup_distributed(self) -> None:
        """Shard the training data once the process group is known (first use)."""
        if self._world > 1 or not _dist.maybe_init(self.device):
            return
        self._world = _dist.world_size()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # methods that score on a batch (RigL's dense gradient, activation criteria) read the
        # unsharded loader, so every rank scores the same batch and decides the same
        self.unsharded_train_loader = self.train_loader
        self.train_loader = _shard(self.train_loader, self._world, _dist.rank(), "train_loader")
        self._it, self._position = None, 0

    def _lr_at(self, step: int, iterations: int) -> float:
        passed = sum(
            1
            for m in self.milestones
            if step >= (round(m * iterations) if isinstance(m, float) else m)
        )
        lr = self.lr * self.gamma**passed
        warm = round(self.warmup * iterations) if isinstance(self.warmup, float) else self.warmup
        if step < warm:
            return lr * (step + 1) / warm
        if self.schedule == "cosine":
            span = max(1, iterations - warm)
            return 0.5 * lr * (1.0 + math.cos(math.pi * (step - warm) / span))
        return lr

    def _next_batch(self) -> Any:
        """The next training batch. The position persists across ``train`` calls, so rounds
        shorter than an epoch still walk through the whole dataset."""
        for attempt in range(2):
            if self._it is None:
                # an epoch's order (and a DataLoader's worker seeds) are drawn when the iterator
                # is made: keep what they are drawn from, so a resumed run can redraw them
                set_epoch(self.train_loader, self._epoch)
                self._epoch_state = epoch_state(self.train_loader)
                self._it = iter(self.train_loader)
                self._epoch += 1
                self._position = 0
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                if attempt:
                    break
                continue
            self._position += 1
            return batch
        raise InputError(
            "train_loader yielded no batches: give SupervisedTrainer a loader over a non-empty "
            "dataset (check batch_size and drop_last)"
        )

    def inexact_reason(self) -> str | None:
        """None when a run resumed from this trainer's state sees exactly the batches of the
        uninterrupted run; else why it cannot (see ``nmcompile._loaders``)."""
        loader = self.unsharded_train_loader
        return inexact_reason(self.train_loader if loader is None else loader)

    def stream_state(self) -> dict[str, Any]:
        """Where the data stream is: the loader's own epoch state, the epochs begun, the batches
        consumed in this one and what its order was drawn from."""
        self._setup_distributed()
        loader_state = getattr(self.train_loader, "state_dict", None)
        live = self._it is not None
        return {
            "position": self._position if live else 0,
            "loader": loader_state() if callable(loader_state) else None,
            "epoch": self._epoch,
            "epoch_state": self._epoch_state if live else None,
            # where the loader's generators are now (anything else that drew from them since
            # the epoch began, e.g. a batch drawn for scoring, is put back after the replay)
            "generators": [g.get_state() for g in generators(self.train_loader)],
        }

    def state_dict(self) -> dict[str, Any]:
        """The data stream (:meth:`stream_state`) and, when called from inside ``train`` (an
        ``on_step`` callback), the call in progress: its length, the steps taken, the optimizer's
        state and the parameters it holds. ``load_state_dict`` then makes the next ``train``
        call of the same length continue it."""
        state = self.stream_state()
        live = self._live
        state["train"] = (
            None
            if live is None
            else {
                "iterations": live["iterations"],
                "step": live["step"],
                "params": list(live["params"]),
                "optimizer": live["opt"].state_dict(),
            }
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._setup_distributed()
        if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        self._epoch = int(state.get("epoch", 0))
        self._resume_train = state.get("train")
        position = int(state.get("position", 0))
        self._it, self._position = None, 0
        if not position:
            return
        if hasattr(self.train_loader, "iter_from"):
            self._it, self._position = self.train_loader.iter_from(position), position
            return
        # Replay the epoch from what its order was drawn from; the caller restores the run's own
        # RNG state afterwards. (Checkpoints from before epoch_state saved the global RNG only.)
        saved = state.get("epoch_state")
        with torch.random.fork_rng(devices=[]):
            if saved is not None:
                restore_epoch_state(self.train_loader, saved)
            elif state.get("epoch_rng") is not None:
                torch.set_rng_state(state["epoch_rng"])
            self._epoch = max(0, self._epoch - 1)  # the epoch being replayed begins again
            for _ in range(position):
                self._next_batch()
        now = state.get("generators")
        if now is not None:
            for g, st in zip(generators(self.train_loader), now):
                g.set_state(st)

    def train(self, model: nn.Module, iterations: int, on_step: OnStep | None = None) -> None:
        resume, self._resume_train = self._resume_train, None
        if iterations <= 0:
            return
        self._setup_distributed()
        model.to(self.device).train()
        every = list(model.parameters())
        start = 0
        if resume is not None:
            # continue the call a checkpoint was taken in: same length, same optimizer over the
            # same parameters (some may have stopped training since, e.g. LBC's chosen scores)
            if int(resume["iterations"]) != iterations:
                raise ConfigError(
                    f"SupervisedTrainer: the checkpoint was taken in a train call of "
                    f"{resume['iterations']} iterations, this call asks for {iterations}; resume "
                    "with the options of the interrupted run"
                )
            start, chosen = int(resume["step"]), [int(i) for i in resume["params"]]
        else:
            chosen = [i for i, p in enumerate(every) if p.requires_grad]
        params = [every[i] for i in chosen]
        net = model
        if self._world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Re-wrapped every call: the constructor broadcasts rank 0's parameters and buffers,
            # so rewinding or re-initialising between rounds cannot leave the ranks apart.
            # learned-mask modules can stop using their scores (a group down to one combination)
            unused = self.find_unused_parameters
            if unused is None:
                unused = any(name.endswith("_masker") for name, _ in model.named_modules())
            net = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        if self.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
        from tqdm.auto import tqdm

        bar = tqdm(
            total=iterations,
            initial=start,
            desc="train",
            leave=False,
            # None: tqdm shows the bar only on a terminal; other ranks never show one
            disable=True
            if not _dist.is_main()
            else (None if self.progress is None else not self.progress),
            dynamic_ncols=True,
        )
        self._live = {"iterations": iterations, "step": start, "opt": opt, "params": chosen}
        try:
            for step in range(start, iterations):
                lr = self._lr_at(step, iterations)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = _split(_to(self._next_batch(), self.device), "train_loader")
                loss = self.loss_fn(_forward(net, x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self._live["step"] = step + 1
                bar.update(1)
                if step % 20 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
                if on_step is not None:
                    batch_size = (int(y.shape[0]) if y.dim() else 1) * self._world
                    if on_step(StepInfo(step + 1, batch_size, loss.detach(), lr)):
                        break
        finally:
            self._live = None
            bar.close()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float | None:
        if self.val_loader is None:
            return None
        was_training = model.training
        model.to(self.device).eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        try:
            for batch in self.val_loader:
                x, y = _split(_to(batch, self.device), "val_loader")
                correct += (_forward(model, x).argmax(-1) == y).sum()
                total += int(y.shape[0])
        finally:
            model.train(was_training)
        if total == 0:
            raise InputError("val_loader yielded no samples: pass a non-empty loader or None")
        return int(correct) / total
