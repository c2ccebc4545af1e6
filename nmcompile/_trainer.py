"""The ``Trainer`` protocol the methods call, and ``SupervisedTrainer``, the batteries-included one.

Methods never own a training loop: they call ``trainer.train(model, iterations, on_step)`` and
``trainer.evaluate(model)``, so a user can bring any loop that honours the protocol. A trainer
calls ``on_step(StepInfo)`` after every optimizer step; a True return ends training early (the
early-bird tickets of L-mIMP stop a round that way), and the step's ``batch_size`` is what the
FLOP accounting charges.

Each ``train`` call is one round: a fresh optimizer and a learning-rate schedule that starts over
(the lottery-ticket convention: the optimizer is re-created every round). The data stream does
not start over: it continues where the last call stopped, and ``state_dict`` records where that is
so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ._errors import ConfigError, InputError

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
    return batch


def _split(batch: Any, where: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"input", "target"} <= set(batch):
        return batch["input"], batch["target"]
    raise InputError(
        f"{where} must yield (input, target) pairs or dicts with 'input' and 'target', got "
        f"{type(batch).__name__}"
    )


class SupervisedTrainer:
    """SGD with momentum, step LR milestones, top-1 evaluation, a progress bar.

    ``milestones``: iteration counts (ints) or fractions of a ``train`` call's iterations (floats
    in (0, 1)); the LR is multiplied by ``gamma`` at each. ``progress=None`` shows a bar only on a
    terminal.
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
        device: str | torch.device = "cpu",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        progress: bool | None = None,
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
        if train_loader is None:
            raise ConfigError("SupervisedTrainer needs a train_loader")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.milestones = tuple(milestones)
        self.gamma = float(gamma)
        self.device = torch.device(device)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.progress = progress
        self._it: Any = None
        self._position = 0

    def _lr_at(self, step: int, iterations: int) -> float:
        passed = sum(
            1
            for m in self.milestones
            if step >= (round(m * iterations) if isinstance(m, float) else m)
        )
        return self.lr * self.gamma**passed

    def _next_batch(self) -> Any:
        """The next training batch. The position persists across ``train`` calls, so rounds
        shorter than an epoch still walk through the whole dataset."""
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.train_loader)
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

    def state_dict(self) -> dict[str, Any]:
        """Where the data stream is (epoch state of the loader, batches consumed in the epoch), so
        a resumed run sees the same batches as an uninterrupted one."""
        loader_state = getattr(self.train_loader, "state_dict", None)
        return {
            "position": self._position if self._it is not None else 0,
            "loader": loader_state() if callable(loader_state) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        position = int(state.get("position", 0))
        self._it, self._position = None, 0
        if position:
            if hasattr(self.train_loader, "iter_from"):
                self._it, self._position = self.train_loader.iter_from(position), position
            else:
                for _ in range(position):
                    self._next_batch()

    def train(self, model: nn.Module, iterations: int, on_step: OnStep | None = None) -> None:
        if iterations <= 0:
            return
        model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=iterations,
            desc="train",
            leave=False,
            disable=(None if self.progress is None else not self.progress),
            dynamic_ncols=True,
        )
        try:
            for step in range(iterations):
                lr = self._lr_at(step, iterations)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = _split(_to(self._next_batch(), self.device), "train_loader")
                loss = self.loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if step % 20 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
                if on_step is not None:
                    batch_size = int(y.shape[0]) if y.dim() else 1
                    if on_step(StepInfo(step + 1, batch_size, loss.detach(), lr)):
                        break
        finally:
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
                correct += (model(x).argmax(-1) == y).sum()
                total += int(y.shape[0])
        finally:
            model.train(was_training)
        if total == 0:
            raise InputError("val_loader yielded no samples: pass a non-empty loader or None")
        return int(correct) / total
