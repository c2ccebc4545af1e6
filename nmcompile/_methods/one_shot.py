"""One-shot methods: prune once, optionally with dense training before and fine-tuning after.

- ``asp`` (NVIDIA ASP): train dense, keep the 2 largest |w| of every 4 along the input channels
  (any N:M), fine-tune with the mask fixed. Mishra et al. 2021; the baseline of every paper here.
- ``omp`` (one-shot magnitude pruning): global unstructured magnitude pruning to
  ``target_sparsity`` over all sites at once (Structure-LTH's OMP baseline, Chen et al. 2022).
- ``random``: a uniformly random N:M mask, the sanity baseline a criterion must beat.

History: when ``pretrain_iterations > 0`` round 0 records the dense model after pre-training;
the last round records the pruned (and fine-tuned) model.
"""

from __future__ import annotations

import dataclasses

import torch

from .._config import CheckpointedConfig, check_float, check_int
from .._criteria import magnitude, random_scores
from .._errors import ConfigError
from .._registry import register_method
from .._session import Session
from .._shaping import global_unstructured

__all__ = ["ASPConfig", "OMPConfig", "RandomConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OneShotConfig(CheckpointedConfig):
    pretrain_iterations: int = 0
    finetune_iterations: int = 1000

    def validate(self) -> None:
        check_int(self, "pretrain_iterations", 0)
        check_int(self, "finetune_iterations", 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ASPConfig(_OneShotConfig):
    """ASP: magnitude N:M in one shot.

    ``pretrain_iterations``: dense training before pruning (0 for an already trained model).
    ``finetune_iterations``: training with the mask fixed, when a trainer is given.
    ``permute``: reorder channels first so that the mask keeps more magnitude (NVIDIA ASP's
    channel permutations; ``passes.permute_channels``, reported in
    ``diagnostics["permutation"]``).
    """

    permute: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.permute, bool):
            raise ConfigError("ASPConfig.permute must be True or False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OMPConfig(_OneShotConfig):
    """OMP: global unstructured magnitude pruning to ``target_sparsity`` in one shot."""

    target_sparsity: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_float(self, "target_sparsity", 0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomConfig(_OneShotConfig):
    """A random N:M mask drawn with ``seed``."""


def _one_shot(session: Session, config: _OneShotConfig, prune) -> None:
    # Without a trainer a one-shot method is just the pruning step (e.g. on a pretrained model):
    # the training phases are skipped silently, not warned about.
    train = session.trainer is not None
    if train and config.pretrain_iterations:
        session.train(config.pretrain_iterations)
        session.end_round(phase="dense")
    with torch.no_grad():
        prune()
    if train:
        session.train(config.finetune_iterations)
    session.end_round(phase="pruned")


@register_method(
    "asp", ASPConfig, structured=True, summary="one-shot magnitude N:M + fine-tune (NVIDIA ASP)"
)
def run_asp(session: Session, config: ASPConfig) -> None:
    def prune() -> None:
        if config.permute:
            from .calibrated import permute

            session.diagnostics["permutation"] = permute(session)
        for site in session.sites:
            # |w| computed chunk by chunk inside the mask kernel (same as magnitude(), one pass less)
            weight = session.weight(site).detach()
            session.set_mask(
                site, session.pattern.mask(weight, site.group_axis, transform=torch.abs)
            )

    _one_shot(session, config, prune)


@register_method(
    "omp", OMPConfig, structured=False, summary="one-shot global unstructured magnitude pruning"
)
def run_omp(session: Session, config: OMPConfig) -> None:
    def prune() -> None:
        scores = {s.param: magnitude(session.weight(s)) for s in session.sites}
        masks = global_unstructured(scores, config.target_sparsity)
        for site in session.sites:
            session.set_mask(site, masks[site.param])

    _one_shot(session, config, prune)


@register_method(
    "random", RandomConfig, structured=True, summary="random N:M mask (sanity baseline)"
)
def run_random(session: Session, config: RandomConfig) -> None:
    def prune() -> None:
        gen = torch.Generator().manual_seed(config.seed)
        for site in session.sites:
            scores = random_scores(session.weight(site), gen)
            session.set_mask(site, session.pattern.mask(scores, site.group_axis))

    _one_shot(session, config, prune)
