"""Checkpoints inside single-run methods, and whether a resumed run can be bit-exact.

A single-run method (IEE, RigL, SET, static, LBC, SR-STE, STE, ASP and the other one-shot
methods, early-bird) trains through one or a few ``Session.train`` calls (ASP: pre-training,
then fine-tuning). With ``checkpoint_dir`` the run state is saved every ``checkpoint_every``
optimizer steps and when each call ends, as ``step-<i>.pt`` (``i``: optimizer steps of the whole
run) with the same atomic write and checksum sidecar as round checkpoints. A checkpoint holds
the model (weights, masks, mask modules), which parameters train, the history and diagnostics,
the FLOP and sample counters, the trainer's state (inside a call: the optimizer, the step and the
data stream's position and generators), every rank's RNG states, and the state of every object
the method registered with ``Session.track`` (IEE's phase, Theta_P values and saved MRU weights,
RigL's schedule position, LBC's surviving candidates, ...).

Resuming does not need the method's code to be written as a state machine. The method runs again
from its start; every ``Session.train`` call the checkpoint had already finished returns at once
with the steps it took (what the method computes between calls, e.g. ASP's pruning step, runs
again and is then overwritten), and the call the checkpoint was taken in first restores the whole
state and then continues from the next step. The run then ends bit for bit where the
uninterrupted one would have, provided the data stream can be replayed exactly
(:func:`inexact_reason`); where it cannot, a warning says so at the start of the run and
``diagnostics["resume_exact"]`` is False.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import _checkpoint, _dist
from ._checkpoint import CheckpointError, choose_latest, load_round, prepare_folder
from ._config import CheckpointedConfig, MethodConfig
from ._errors import NMCompileWarning

__all__ = ["StepCheckpoints", "inexact_reason", "setup"]

_STEM = "step"


def trainer_continues(trainer: Any) -> bool:
    """True when ``trainer`` continues a ``train`` call from its ``state_dict`` (the optimizer and
    the step inside the call): nmcompile's own trainer, or one that says so with
    ``resumes_mid_train = True``."""
    from ._trainer import SupervisedTrainer

    return isinstance(trainer, SupervisedTrainer) or bool(
        getattr(trainer, "resumes_mid_train", False)
    )


def inexact_reason(trainer: Any, *, single_run: bool) -> str | None:
    """None when a run with this trainer resumes bit for bit; else why it cannot."""
    if trainer is None:
        return None
    name = type(trainer).__name__
    if not (callable(getattr(trainer, "state_dict", None)) and hasattr(trainer, "load_state_dict")):
        return (
            f"the trainer ({name}) has no state_dict() / load_state_dict(), so where its data "
            "stream stands cannot be saved"
        )
    if single_run and not trainer_continues(trainer):
        return (
            f"the trainer ({name}) cannot continue a train call from a checkpoint (set "
            "resumes_mid_train = True when its state_dict() holds the optimizer and step), so a "
            "resumed run trains the call's remaining steps with a fresh optimizer"
        )
    own = getattr(trainer, "inexact_reason", None)
    return own() if callable(own) else None


class StepCheckpoints:
    """Saves a single-run method's state inside its train calls and resumes it (module doc)."""

    def __init__(self, session: Any, config: CheckpointedConfig) -> None:
        self.session = session
        self.folder = config.checkpoint_dir
        self.every = config.checkpoint_every or config.DEFAULT_CHECKPOINT_EVERY
        self.keep = config.keep_checkpoints
        self.meta = {
            "method": config.name,
            "config": config.run_key(),
            "pattern": str(session.pattern) if session.pattern is not None else None,
            "sites": [s.param for s in session.sites],
        }
        self.trainer_continues = trainer_continues(session.trainer)
        self.replaying = False  # passing through what the checkpoint had finished
        self.resumed_from: int | None = None  # optimizer steps the resumed checkpoint held
        self.inexact: str | None = None  # why the resumed run is not bit-exact, if it is not
        self._state: dict[str, Any] | None = None
        self._load_call = 0

    def start(self, resume: bool) -> None:
        """Check the folder (rank 0 decides) and, resuming, load the newest good checkpoint."""
        _dist.decide_on_main(prepare_folder, self.folder, resume=resume, stem=_STEM)
        if not resume:
            return
        latest = _dist.decide_on_main(choose_latest, self.folder, self.meta, stem=_STEM)
        if latest is None:
            return  # killed before its first checkpoint: a fresh run
        self._state = load_round(self.folder, latest, stem=_STEM)
        live = self._state.get("live_call")
        self._load_call = live if live is not None else len(self._state["call_steps"]) - 1
        self.replaying = True

    def reach(self, call: int) -> tuple[str, int] | None:
        """At the start of train call ``call`` of a resumed run: ``("skip", steps)`` for a call
        the checkpoint had finished (returning the steps it took), ``("continue", steps)`` for
        the call it was taken in, after restoring the whole run state."""
        assert self._state is not None
        if call < self._load_call:
            return "skip", int(self._state["call_steps"][call])
        state, self._state = self._state, None
        self.replaying = False
        self.inexact = self.session.load_state_dict(state)
        self.resumed_from = self.session.iterations
        if state.get("live_call") is None:  # taken when this call ended
            return "skip", int(state["call_steps"][call])
        trainer = state.get("trainer") or {}
        live = trainer.get("train") if isinstance(trainer, dict) else None
        steps = int(live["step"]) if live else int(state["iterations"]) - sum(state["call_steps"])
        return "continue", steps

    def after_step(self, session: Any) -> None:
        if session.iterations % self.every == 0:
            self.save()

    def after_call(self, session: Any) -> None:
        self.save()

    def save(self) -> None:
        """Write the run state now (every rank sends its RNG and data-stream state; rank 0
        writes)."""
        ranks = _dist.all_gather_object(self.session.rank_state())
        if _dist.is_main():
            _checkpoint.save_round(
                self.folder,
                self.session.iterations,
                self.session.state_dict(ranks),
                {**self.meta, "written_by_rank": _dist.rank()},
                keep=self.keep,
                stem=_STEM,
            )

    def finish(self) -> None:
        if self.replaying:
            raise CheckpointError(
                f"the checkpoint in {self.folder} was taken in train call {self._load_call} of "
                "the run, which this run never reached; resume with the same trainer and options"
            )


def setup(session: Any, config: MethodConfig) -> StepCheckpoints | None:
    """Before a method runs: warn when a checkpointed run could not resume bit for bit, and
    start step checkpoints for a single-run method with ``checkpoint_dir``."""
    if not getattr(config, "checkpoint_dir", None):
        return None
    single = isinstance(config, CheckpointedConfig)
    reason = inexact_reason(session.trainer, single_run=single)
    session.resume_reason = reason
    if reason is not None:
        warnings.warn(
            f"{config.name}: a run resumed from checkpoint_dir will not be bit-exact: {reason}",
            NMCompileWarning,
            stacklevel=3,
        )
    if not single or session.trainer is None:
        return None
    ck = StepCheckpoints(session, config)
    session.checkpoints = ck
    ck.start(config.resume)
    return ck


def report(session: Any, config: MethodConfig, ck: StepCheckpoints | None) -> None:
    """After the run: ``diagnostics["resume_exact"]`` (and why not) for a checkpointed run."""
    if not getattr(config, "checkpoint_dir", None):
        return
    if ck is not None:
        ck.finish()
        if ck.resumed_from is not None:
            session.diagnostics["resumed_from_iteration"] = ck.resumed_from
    reasons = [r for r in (session.resume_reason, session.resume_note) if r]
    session.diagnostics["resume_exact"] = not reasons
    if reasons:
        session.diagnostics["resume_inexact_reason"] = "; ".join(reasons)
