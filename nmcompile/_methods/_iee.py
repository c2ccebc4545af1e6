"""What weight IEE (``prune_grow.py``) and channel IEE (``channels.py``) share: the configs, the
Omega_t schedule, freezing Theta_K while exploring (``FrozenRest``, ``GradGate``), the Fig. 5
metrics and the FLOPs of an exploration step.

*Exploration FLOPs.* An exploration step runs a dense forward (every weight of Theta_P is on),
so the backward through the activations is dense too; only the weight gradient is limited to
the trainable Theta_P. What the computation costs per sample is therefore ``2 zeta_D +
zeta_{Theta_P}`` (``explore_flops``), which at 80% uniform sparsity is about 2.8 zeta_D. The
paper's appendix charges ``2 zeta_P + zeta_D`` (1.4 zeta_D there); ``explore_flops_appendix``
gives that convention, which the diagnostics report beside the counter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from .._config import CheckpointedConfig, check_float, check_int
from .._errors import ConfigError
from .._flops import FlopModel
from .._session import Session

_BUDGETS = ("uniform", "erk")
WEIGHT_IMPORTANCE = ("magnitude", "taylor")
CHANNEL_IMPORTANCE = ("taylor", "l1")
_DECAYS = ("cosine", "exponential", "constant")
NEVER_USED_INIT = ("zero", "initial")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SparseTrainingConfig(CheckpointedConfig):
    """``target_sparsity``: unstructured at this global sparsity (layer split by
    ``layer_budget``); None: the compile ``pattern`` (N:M)."""

    total_iterations: int = 3000
    target_sparsity: float | None = None
    layer_budget: str = "uniform"

    def validate(self) -> None:
        check_int(self, "total_iterations", 1)
        if self.target_sparsity is not None:
            check_float(self, "target_sparsity", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.layer_budget not in _BUDGETS:
            raise ConfigError(
                f"{type(self).__name__}.layer_budget must be one of "
                f"{list(_BUDGETS)}, got {self.layer_budget!r}"
            )

    @property
    def structured(self) -> bool:
        return self.target_sparsity is None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _UpdatingConfig(_SparseTrainingConfig):
    update_fraction: float = 0.3  # Omega_0, as a fraction of the active weights
    update_decay: str = "cosine"
    stop_fraction: float = 0.75  # updates stop at this fraction of training

    def validate(self) -> None:
        super().validate()
        check_float(self, "update_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        check_float(self, "stop_fraction", 0.0, 1.0, lo_open=True)
        if self.update_decay not in _DECAYS:
            raise ConfigError(
                f"{type(self).__name__}.update_decay must be one of "
                f"{list(_DECAYS)}, got {self.update_decay!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LatencyOptions:
    """``latency_budget``: a fraction of the dense model's latency, measured whole on
    ``latency_backend`` at batch ``latency_batch`` (None: the example inputs' batch).
    ``latency_calibrate``: check the per-layer table's sum against whole-model measurements and
    set the knapsack's budget so the model lands on the clock (off: the budget is a fraction of
    the table's sum, nothing whole is measured)."""

    latency_budget: float | None = None
    latency_backend: str = "torch"
    latency_cache: str | None = None
    latency_batch: int | None = None
    latency_calibrate: bool = True
    channel_step: int = 8

    def _check_latency(self) -> None:
        if self.latency_batch is not None:
            check_int(self, "latency_batch", 1)
        if not isinstance(self.latency_calibrate, bool):
            raise ConfigError(
                f"{type(self).__name__}.latency_calibrate must be True or False, got "
                f"{self.latency_calibrate!r}"
            )
        if self.latency_budget is not None:
            check_float(self, "latency_budget", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.latency_backend not in ("torch", "ort"):
            raise ConfigError(
                f"{type(self).__name__}.latency_backend must be 'torch' or 'ort', "
                f"got {self.latency_backend!r}"
            )
        check_int(self, "channel_step", 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IEEConfig(_LatencyOptions, _UpdatingConfig):
    """IEE. ``update_period = (H, J, Q)``: iterations of importance estimation, accuracy
    improvement and reactivate & explore per step (the paper uses 150 each on ImageNet).
    ``latency_budget`` (a fraction of the full model's measured latency) switches to channel
    sparsity with a HALP-style knapsack; see ``_methods/channels.py``. ``importance``: the
    criterion, None for the paper's choice (``"magnitude"`` for weights, ``"taylor"`` on
    BatchNorm for channels); weights also take ``"taylor"``, channels ``"l1"``.
    ``never_used_init``: the value exploration starts from for a weight that has never been
    active (MRU covers only weights that were): ``"zero"`` (the sparse start is the initial
    weights times the mask) or ``"initial"`` (its dense initial value). Weights only: channel
    IEE starts from a knapsack selection of the whole model, whose other channels keep their
    values."""

    update_period: tuple[int, int, int] = (100, 100, 100)
    importance: str | None = None
    never_used_init: str = "zero"

    @property
    def criterion(self) -> str:
        if self.importance is not None:
            return self.importance
        return "taylor" if self.latency_budget is not None else "magnitude"

    @property
    def structured(self) -> bool:
        return self.target_sparsity is None and self.latency_budget is None

    def validate(self) -> None:
        super().validate()
        self._check_latency()
        if self.latency_budget is not None and self.target_sparsity is not None:
            raise ConfigError(
                "IEEConfig: give target_sparsity (weights) or latency_budget (channels), not both"
            )
        if self.latency_budget is not None and self.checkpoint_dir is not None:
            raise ConfigError(
                "IEEConfig: checkpoint_dir is not supported with latency_budget (channel IEE): "
                "its budget comes from latency measurements a resumed run could not repeat. "
                "Drop checkpoint_dir, or use weight / N:M IEE"
            )
        ok = (
            isinstance(self.update_period, (tuple, list))
            and len(self.update_period) == 3
            and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1
                for x in self.update_period
            )
        )
        if not ok:
            raise ConfigError(
                f"IEEConfig.update_period must be three ints >= 1 (H, J, Q), got "
                f"{self.update_period!r}"
            )
        object.__setattr__(self, "update_period", tuple(self.update_period))
        if self.never_used_init not in NEVER_USED_INIT:
            raise ConfigError(
                f"IEEConfig.never_used_init must be one of {list(NEVER_USED_INIT)}, got "
                f"{self.never_used_init!r}"
            )
        valid = CHANNEL_IMPORTANCE if self.latency_budget is not None else WEIGHT_IMPORTANCE
        if self.importance is not None and self.importance not in valid:
            what = "channels" if self.latency_budget is not None else "weights"
            raise ConfigError(
                f"IEEConfig.importance for {what} must be one of {list(valid)}, got "
                f"{self.importance!r}"
            )
        if sum(self.update_period) > self.total_iterations:
            raise ConfigError(
                f"IEEConfig.update_period {self.update_period} spans more than total_iterations "
                f"= {self.total_iterations}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RigLConfig(_UpdatingConfig):
    """RigL: every ``update_interval`` iterations drop by |w|, grow by |dense gradient|."""

    update_interval: int = 100

    def validate(self) -> None:
        super().validate()
        check_int(self, "update_interval", 1, self.total_iterations)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SETConfig(RigLConfig):
    """SET: drop by |w|, grow at random."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticConfig(_SparseTrainingConfig):
    """Static sparse training: one random mask at the budget, never updated."""


def omega(config: _UpdatingConfig, t: int, steps: int) -> float:
    """Fraction of the active weights moved at update step ``t`` of ``steps``."""
    f0 = config.update_fraction
    if config.update_decay == "constant" or steps <= 1:
        return f0
    x = t / steps
    if config.update_decay == "cosine":
        return f0 * 0.5 * (1.0 + math.cos(math.pi * x))
    return f0 * (0.01**x)  # exponential: geometric decay to 1% of Omega_0


class FrozenRest:
    """Everything of the model outside the pruned weights: parameters and buffers (biases,
    BatchNorm, the dense stem and classifier). Part of Theta_K, so frozen while exploring:
    ``snapshot`` at the start of exploration, ``restore`` after each of its steps."""

    def __init__(self, session: Session, *, skip: set[str] = frozenset()) -> None:
        self.gm = session.gm
        self.owned = {s.param for s in session.sites} | {s.mask_target for s in session.sites}
        self.owned |= set(skip)
        self._live: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] | None = None

    def _resolve(self) -> list[torch.Tensor]:
        # resolved late, not at construction: moving the model to a device replaces buffers
        return [
            t for name, t in self.gm.state_dict(keep_vars=True).items() if name not in self.owned
        ]

    def snapshot(self) -> None:
        self._live = self._resolve()
        self._saved = [t.detach().clone() for t in self._live]

    def restore(self) -> None:
        if self._saved is None:
            return
        if self._live is None:  # loaded from a checkpoint before the model moved
            self._live = self._resolve()
        with torch.no_grad():
            for t, v in zip(self._live, self._saved):
                t.copy_(v)

    def release(self) -> None:
        self._saved = None

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self._saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved, self._live = state["saved"], None


class GradGate:
    """Zero the gradients of what is frozen while exploring, before the optimizer sees them.

    Restoring values after each step keeps Theta_K where it was, but not the optimizer's state:
    momentum would pile up the gradients of the dense exploration forward and, once exploration
    ends, apply them to Theta_K over the next few dozen steps. A tensor hook on each parameter
    (run before the gradient is accumulated, so before DDP's all-reduce too) keeps only the
    entries of ``trainable`` (parameter -> bool mask of its trainable entries) and zeroes every
    other parameter's."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def close(
        self, gm: torch.nn.Module, trainable: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.open()
        keeps = {id(p): k for p, k in trainable}  # by identity: a tied weight has one entry
        for p in gm.parameters():
            if not p.requires_grad:
                continue
            keep = keeps.get(id(p))
            if keep is None:
                self._handles.append(p.register_hook(torch.zeros_like))
            else:
                keep = keep.to(p.device)
                # .to(): a gate closed from a checkpoint sees the model before it moves
                self._handles.append(p.register_hook(lambda g, k=keep: g * k.to(g.device)))

    def open(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union if union else 1.0


def _copy(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in masks.items()}


class Metrics:
    def __init__(self) -> None:
        self.iou_prune: list[float] = []
        self.iou_grow: list[float] = []
        self.survival: list[float] = []
        self._after_prune: dict | None = None
        self._after_grow: dict | None = None
        self._grown: dict | None = None

    def after_prune(self, active: dict) -> None:
        if self._after_prune is not None:
            self.iou_prune.append(_iou(self._after_prune, active))
        if self._grown is not None:
            grown = sum(int(g.sum()) for g in self._grown.values())
            alive = sum(int((g & active[k]).sum()) for k, g in self._grown.items())
            self.survival.append(alive / grown if grown else 1.0)
        self._after_prune = _copy(active)

    def after_grow(self, active: dict, grown: dict) -> None:
        if self._after_grow is not None:
            self.iou_grow.append(_iou(self._after_grow, active))
        self._after_grow = _copy(active)
        self._grown = _copy(grown)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lists": (list(self.iou_prune), list(self.iou_grow), list(self.survival)),
            "masks": (self._after_prune, self._after_grow, self._grown),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iou_prune, self.iou_grow, self.survival = (list(x) for x in state["lists"])
        self._after_prune, self._after_grow, self._grown = state["masks"]

    def to_json(self) -> dict[str, Any]:
        return {
            "iou_after_prune": self.iou_prune,
            "iou_after_grow": self.iou_grow,
            "grown_survival": self.survival,
        }


def explore_flops(flops: FlopModel, active: Mapping[str, float]) -> float:
    """Per-sample FLOPs of an exploration step as computed: dense forward and activation
    gradient (2 zeta_D), and the weight gradient of the trainable, inactive weights only
    (``active``: each site's density of Theta_K)."""
    inactive_share = sum(f * (1.0 - active.get(p, 1.0)) for p, f in flops.sites.items())
    return 2.0 * flops.dense + inactive_share


def explore_flops_appendix(flops: FlopModel, active: Mapping[str, float]) -> float:
    """The paper's appendix convention for the same step: ``2 zeta_P + zeta_D``."""
    return 2.0 * flops.forward(active) + flops.dense
