"""The round engine shared by every iterative method (IMP, mIMP, L-mIMP, and later IMP-Refill /
Regroup), after Algorithm 1 of Chen et al. 2022 and Algorithm 1 of the mIMP paper::

    round 0:  train I iterations from theta_0, snapshot theta_k at iteration k (rewind_iteration)
    round r:  score -> update masks in place -> rewind surviving weights to theta_k
              (or re-initialise them, for random tickets) -> train I - k iterations
    stop:     when the method says its target is reached; the last round trains the final ticket

Each round closes with one ``history`` record (round, sparsity, accuracy, cumulative training
FLOPs, iterations, wall time, plus the method's keys: the facts of the pruning step before the
round, from ``propose``, and of the round's training, from ``round_report``, e.g. its early-bird
checks). After every pruning step, and once more at the end, the whole run state, history
included, is checkpointed atomically to ``checkpoint_dir``; ``resume=True`` continues from the
newest good checkpoint and ends with the masks and history an uninterrupted run would have
produced.

The engine also keeps the mask produced by every pruning step (bit-packed) for the diagnostics of
the mIMP paper's Figure 3: the average Hamming distance between the masks of every pair of rounds.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from . import _dist
from ._checkpoint import choose_latest, load_round, prepare_folder, save_round
from ._config import MethodConfig, check_float, check_int
from ._errors import ConfigError
from ._session import Session
from ._trainer import OnStep, StepInfo

__all__ = ["IterativeConfig", "RoundEngine", "RoundMethod", "mask_distance", "pack_masks"]

_REWIND_MODES = ("snapshot", "reinit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeConfig(MethodConfig):
    """Options common to the iterative (round-based) methods.

    ``iterations_per_round``: training iterations of round 0; later rounds train
    ``iterations_per_round - rewind_iteration`` from the rewound weights. ``rewind_iteration``:
    the iteration of round 0 whose weights every round rewinds to (None: 5% of a round, the
    Structure-LTH setting; 0: the original initialisation). ``prune_rate``: fraction of the
    remaining candidates pruned per round. ``rewind="reinit"`` re-initialises the weights each
    round instead (random tickets). ``checkpoint_dir`` / ``resume``: save every round and continue
    an interrupted run.
    """

    iterations_per_round: int = 1000
    rewind_iteration: int | None = None
    prune_rate: float = 0.2
    rewind: str = "snapshot"
    max_rounds: int = 60
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoints: int = 2

    def validate(self) -> None:
        check_int(self, "iterations_per_round", 1)
        if self.rewind_iteration is not None:
            check_int(self, "rewind_iteration", 0, self.iterations_per_round - 1)
        check_float(self, "prune_rate", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.rewind not in _REWIND_MODES:
            raise ConfigError(
                f"{type(self).__name__}.rewind must be one of {list(_REWIND_MODES)}, got "
                f"{self.rewind!r}"
            )
        check_int(self, "max_rounds", 1)

    @property
    def rewind_at(self) -> int:
        if self.rewind_iteration is not None:
            return self.rewind_iteration
        return round(0.05 * self.iterations_per_round)


class RoundMethod:
    """What an iterative method adds to the engine: how to score and prune, when to stop, and any
    state of its own (saved with every checkpoint)."""

    name: ClassVar[str] = ""

    def propose(self, engine: RoundEngine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The masks the next pruning step would produce from the current weights, and facts
        about them for the history; must not change any state."""
        raise NotImplementedError

    def accept(
        self, engine: RoundEngine, masks: dict[str, torch.Tensor], info: dict[str, Any]
    ) -> None:
        """Called once the engine has applied ``masks``; update the method's own state."""

    def done(self, engine: RoundEngine) -> bool:
        """True when the mask of the round just trained is the final one."""
        raise NotImplementedError

    def rounds_needed(self, engine: RoundEngine) -> int | None:
        """Trained rounds (round 0 included) the schedule needs at most, when it is known before
        training; the engine refuses a ``max_rounds`` below it."""
        return None

    def step_hook(self, engine: RoundEngine, round_index: int) -> OnStep | None:
        """An ``on_step`` callback for the training of ``round_index`` (early stopping), or None."""
        return None

    def round_report(self, engine: RoundEngine, round_index: int) -> dict[str, Any]:
        """Keys for the history record of ``round_index``, called once its training ended (what
        the ``step_hook`` saw: early-bird checks, the stop). Plain JSON values only."""
        return {}

    def finish(self, engine: RoundEngine) -> dict[str, Any]:
        """Diagnostics computed at the end of the run (stored in ``CompileResult.diagnostics``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def pack_masks(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """All masks, flattened in order and bit-packed (8 weights a byte), as a uint8 tensor."""
    flat = torch.cat([m.detach().reshape(-1).cpu() for m in masks.values()]).numpy()
    return torch.from_numpy(np.packbits(flat))


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(a: np.ndarray) -> int:
    return int(_POPCOUNT[a].sum(dtype=np.int64))


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Average over layers of the fraction of mask entries that differ (normalised Hamming)."""
    if not a:
        return 0.0
    return float(sum(float((a[k] != b[k]).float().mean()) for k in a) / len(a))


class RoundEngine:
    """Drives rounds for one ``RoundMethod`` through a ``Session`` (see the module docstring)."""

    def __init__(self, session: Session, config: IterativeConfig, method: RoundMethod) -> None:
        self.session = session
        self.config = config
        self.method = method
        self.round = 0
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.mask_history: list[torch.Tensor] = []  # packed masks after each pruning step
        self.diagnostics: dict[str, Any] = {}
        self._total = sum(s.numel for s in session.sites)
        self.init_state: dict[str, torch.Tensor] | None = None  # theta_0, for rewind="reinit"
        # what a checkpoint must match to be resumed: the method, its options, the pattern and
        # the pruned layers (a 2:4 run's rounds must never continue a 1:4 one)
        self._meta = {
            "method": config.name,
            "config": config.run_key(),
            "pattern": str(session.pattern) if session.pattern is not None else None,
            "sites": [s.param for s in session.sites],
        }

    # -- helpers for methods ---------------------------------------------------------------------
    @property
    def total_weights(self) -> int:
        return self._total

    def masks(self) -> dict[str, torch.Tensor]:
        return {s.param: self.session.mask(s) for s in self.session.sites}

    def weights(self) -> dict[str, torch.Tensor]:
        return {s.param: self.session.weight(s).detach() for s in self.session.sites}

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        needed = self.method.rounds_needed(self)
        if needed is not None and needed > cfg.max_rounds:
            raise ConfigError(
                f"{type(cfg).__name__}: this schedule needs {needed} rounds (prune_rate "
                f"{cfg.prune_rate}), more than max_rounds={cfg.max_rounds}; raise max_rounds or "
                "prune_rate"
            )
        if cfg.checkpoint_dir:
            _dist.decide_on_main(self._prepare_folder)
        if cfg.rewind == "reinit":
            self.init_state = self.session.weights_state()
        resumed = self._resume() if cfg.resume else False
        if resumed == "done":
            self.session.diagnostics.update(self.diagnostics)
            return
        if not resumed:
            self._round_zero()
        while True:
            trained_round = self.round
            if self.method.done(self):
                break
            if trained_round + 1 >= cfg.max_rounds:
                self.diagnostics["stopped_at_max_rounds"] = True
                warnings.warn(
                    f"{cfg.name}: stopped after max_rounds={cfg.max_rounds} before its schedule "
                    f"ended; the masks are not final (sparsity {self.session.sparsity():.3f}). "
                    "Run again with a larger max_rounds and resume=True on the same "
                    "checkpoint_dir to continue",
                    stacklevel=3,
                )
                break
            masks, info = self.method.propose(self)
            for site in self.session.sites:
                self.session.set_mask(site, masks[site.param])
            self.method.accept(self, masks, info)
            self.mask_history.append(pack_masks(masks))
            self._rewind()
            self.round = trained_round + 1
            self._pending = {
                **info,
                "hamming_to_prev": self._hamming_to_prev(),
            }
            self._checkpoint(done=False)
            steps_wanted = cfg.iterations_per_round - cfg.rewind_at
            early = self._train(steps_wanted, self.round)
            self.session.end_round(**self._pending, **early)
        self.diagnostics = {**self.diagnostics, **self._finish()}
        self._annotate_history()
        self.session.diagnostics.update(self.diagnostics)
        if not self.diagnostics.get("stopped_at_max_rounds"):
            # (a run cut by max_rounds keeps its last pruning-step checkpoint instead: resumed
            # with a larger max_rounds, it retrains that round and goes on)
            self._checkpoint(done=True)

    def _prepare_folder(self) -> None:
        prepare_folder(self.config.checkpoint_dir, resume=self.config.resume)

    def _choose_round(self) -> int | None:
        return choose_latest(self.config.checkpoint_dir, self._meta)

    def _annotate_history(self) -> None:
        """Per-round diagnostics known only at the end go into the rounds' history records:
        pruning step i precedes the training of round i."""
        rates = self.diagnostics.get("plp_misprediction")
        if rates:
            for i, rate in enumerate(rates, start=1):
                if i < len(self.session.history):
                    self.session.history[i]["plp_misprediction"] = rate

    def _round_zero(self) -> None:
        cfg = self.config
        self._pending = {}
        k = cfg.rewind_at
        if k == 0:
            self.snapshot = self.session.weights_state()
        hook = self.method.step_hook(self, 0)

        def on_step(info: StepInfo) -> bool | None:
            if self.snapshot is None and info.iteration == k:
                self.snapshot = self.session.weights_state()
            return hook(info) if hook is not None else None

        early = self._train(cfg.iterations_per_round, 0, on_step=on_step)
        if self.snapshot is None:  # no trainer, or a round that stopped before iteration k
            self.snapshot = self.session.weights_state()
        self.session.end_round(**early)

    def _train(self, iterations: int, round_index: int, on_step: OnStep | None = None) -> dict:
        hook = on_step if on_step is not None else self.method.step_hook(self, round_index)
        steps = self.session.train(iterations, hook)
        stopped = steps < iterations and self.session.trainer is not None
        return {
            "round_iterations": steps,
            "stopped_early": stopped,
            **self.method.round_report(self, round_index),
        }

    def _rewind(self) -> None:
        if self.config.rewind == "reinit":
            self._reinit()
        else:
            self.session.load_weights_state(self.snapshot)

    def _reinit(self) -> None:
        """Fresh random weights drawn from the model's own initialisation, seeded per round.

        The mIMP paper re-initialises "using random numbers generated by the weight
        initialisation function". That function is the model's, which nmcompile cannot call (a
        zoo or user model initialises in its constructor, not in ``reset_parameters``, whose
        PyTorch defaults differ: kaiming-uniform is ~2.5x narrower than the kaiming-normal fan-out
        the CIFAR ResNets use). So every floating-point tensor gets a fresh random permutation of
        its own initial values theta_0: a new draw from exactly the per-tensor distribution the
        model was initialised with, independent of the trained weights. (For an init that is not
        i.i.d. within a tensor, e.g. orthogonal, the permutation keeps the values, not the
        structure.) Constant tensors (BatchNorm's 1 and 0, running statistics) come back as they
        were.
        """
        assert self.init_state is not None
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.round + 1)
        fresh = {}
        for name, t in self.init_state.items():
            if t.is_floating_point() and t.numel() > 1:
                perm = torch.randperm(t.numel(), generator=gen)
                fresh[name] = t.reshape(-1)[perm].reshape(t.shape)
            else:
                fresh[name] = t
        self.session.load_weights_state(fresh)

    def _hamming_to_prev(self) -> float | None:
        if len(self.mask_history) < 2:
            return None
        a, b = self.mask_history[-2].numpy(), self.mask_history[-1].numpy()
        return _popcount(a ^ b) / self._total

    def _finish(self) -> dict[str, Any]:
        packed = [p.numpy() for p in self.mask_history]
        n = len(packed)
        matrix = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                matrix[i][j] = matrix[j][i] = _popcount(packed[i] ^ packed[j]) / self._total
        return {"mask_hamming": matrix, **self.method.finish(self)}

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self, done: bool, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "round": self.round,
            "done": done,
            "session": self.session.state_dict(ranks),
            "snapshot": self.snapshot,
            "init_state": self.init_state,
            "mask_history": list(self.mask_history),
            "pending": dict(self._pending),
            "diagnostics": self.diagnostics if done else {},
            "method": self.method.state_dict(),
        }

    def _checkpoint(self, *, done: bool) -> None:
        if not self.config.checkpoint_dir:
            return
        # every rank's RNG and data-stream state; rank 0 writes
        ranks = _dist.all_gather_object(self.session.rank_state())
        if _dist.is_main():
            save_round(
                self.config.checkpoint_dir,
                self.round if not done else self.round + 1,
                self._state(done, ranks),
                {**self._meta, "written_by_rank": _dist.rank()},
                keep=self.config.keep_checkpoints,
            )

    def _resume(self) -> bool | str:
        folder = self.config.checkpoint_dir
        # every rank resumes the round rank 0 chose, or raises its refusal (each one reading its
        # own folder could pick different rounds and hang in the next collective)
        latest = _dist.decide_on_main(self._choose_round)
        if latest is None:
            return False
        state = load_round(folder, latest)
        self.session.load_state_dict(state["session"])
        self.snapshot = state["snapshot"]
        if state.get("init_state") is not None:
            self.init_state = state["init_state"]
        self.mask_history = list(state["mask_history"])
        self._pending = dict(state["pending"])
        self.method.load_state_dict(state["method"])
        self.round = int(state["round"])
        if state["done"]:
            self.diagnostics = state["diagnostics"]
            return "done"
        # The checkpoint was taken after pruning and rewinding, before this round's training.
        early = self._train(self.config.iterations_per_round - self.config.rewind_at, self.round)
        self.session.end_round(**self._pending, **early)
        return True


def rounds_to_reach(remaining: float, target_remaining: float, rate: float) -> int:
    """Pruning steps of ``rate`` (of what remains) from ``remaining`` down to ``target_remaining``."""
    if remaining <= target_remaining:
        return 0
    return math.ceil(math.log(target_remaining / remaining) / math.log(1.0 - rate) - 1e-9)
