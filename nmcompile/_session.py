"""``Session``: what a method handler works through during one ``compile`` run.

It owns the masked GraphModule, the sites, the trainer and the FLOP model, and gives methods a
small vocabulary: read weights and masks, write masks in place, train (FLOPs charged per step from
the current mask densities), evaluate, and close a round into ``history``. Methods score and
schedule; the session does the bookkeeping.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from . import _dist
from ._errors import NMCompileWarning, NonFiniteError
from ._flops import FlopModel
from ._pattern import NMPattern
from ._trainer import OnStep, StepInfo, Trainer
from .passes import PrunableSite

__all__ = ["Session", "Tracked"]


class Tracked:
    """Method state for :meth:`Session.track` from two functions: ``save() -> dict`` and
    ``load(dict)`` (plain values and tensors, so a checkpoint loads with ``weights_only``)."""

    def __init__(self, save: Any, load: Any) -> None:
        self._save, self._load = save, load

    def state_dict(self) -> dict[str, Any]:
        return self._save()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(state)


class Session:
    def __init__(
        self,
        gm: fx.GraphModule,
        sites: list[PrunableSite],
        *,
        pattern: NMPattern | None,
        trainer: Trainer | None,
        flops: FlopModel,
        fallback_batch: int,
        example_inputs: tuple[Any, ...] = (),
    ) -> None:
        self.gm = gm
        self.sites = sites
        self.pattern = pattern
        self.trainer = trainer
        self.flops = flops
        self.history: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}  # method-specific run-level results
        # per-sample FLOPs of a training step when the masks alone do not tell (e.g. a dense
        # forward with sparse weight updates); None: priced from the masks
        self.step_flops_override: float | None = None
        self._samples_seen = 0
        self.train_flops = 0.0
        self.iterations = 0
        self._fallback_batch = fallback_batch
        self.example_inputs = example_inputs
        self._t0 = time.perf_counter()
        self._warned_no_trainer = False
        # Per-site mask density, kept current by set_mask, so per-step FLOPs follow masks that
        # change during training (prune-grow, learned masks) without re-reading every mask.
        self._density = {s.param: float(self.mask(s).sum()) / s.numel for s in sites}
        self._mask_version = 0
        # checkpoints inside single-run methods (``_resume.StepCheckpoints``), the method state
        # objects they save (``track``), and the steps each train call took
        self.calibration: Any = None  # input batches for calibrated one-shot methods
        self.checkpoints: Any = None
        self.tracked: dict[str, Any] = {}
        self.call_steps: list[int] = []
        self._calls = 0
        self._live_call: int | None = None
        # why a resumed run of this session could not be bit-exact (the trainer / data stream,
        # and what loading a checkpoint found), or None
        self.resume_reason: str | None = None
        self.resume_note: str | None = None

    # -- weights and masks -------------------------------------------------------------------
    def weight(self, site: PrunableSite) -> torch.nn.Parameter:
        return self.gm.get_parameter(site.param)

    def mask(self, site: PrunableSite) -> torch.Tensor:
        """The live bool mask buffer of ``site`` (write it with :meth:`set_mask`); for a site
        whose mask is a module (learned masks), its current mask."""
        try:
            return self.gm.get_buffer(site.mask_target)
        except AttributeError:
            masker = self.gm.get_submodule(site.masker_target)
            with torch.no_grad():
                return masker.mask(self.weight(site))

    def refresh_densities(self) -> None:
        """Re-read every mask (after a masker module changed its own), so FLOPs follow."""
        self._density = {s.param: float(self.mask(s).sum()) / s.numel for s in self.sites}
        self._mask_version += 1

    def set_mask(self, site: PrunableSite, mask: torch.Tensor) -> None:
        buf = self.mask(site)
        if mask.shape != buf.shape:
            raise ValueError(
                f"mask for {site.param} has shape {tuple(mask.shape)}, weight is {tuple(buf.shape)}"
            )
        buf.copy_(mask.to(device=buf.device, dtype=torch.bool))
        _dist.broadcast_(buf)  # under torchrun every rank takes rank 0's decision
        self._density[site.param] = float(buf.sum()) / site.numel
        self._mask_version += 1

    def masks(self) -> dict[str, torch.Tensor]:
        """A detached copy of every mask, keyed by parameter fqn."""
        return {s.param: self.mask(s).detach().clone() for s in self.sites}

    def densities(self) -> dict[str, float]:
        """Kept fraction of each site's mask (as last written through :meth:`set_mask`)."""
        return dict(self._density)

    def sparsity(self) -> float:
        """Pruned fraction over all sites' weights."""
        total = sum(s.numel for s in self.sites)
        kept = sum(self._density[s.param] * s.numel for s in self.sites)
        return 1.0 - kept / total if total else 0.0

    # -- training ------------------------------------------------------------------------------
    def track(self, name: str, obj: Any) -> None:
        """Save ``obj`` (with ``state_dict()`` / ``load_state_dict(state)``: the method's own
        state, plain values and tensors) with every checkpoint taken inside a train call, and
        restore it when a resumed run reaches that call. Register before the first ``train``."""
        self.tracked[name] = obj

    def train(
        self, iterations: int, on_step: OnStep | None = None, *, dense_weight_grad: bool = False
    ) -> int:
        """Train for ``iterations`` steps through the trainer; returns the steps taken.

        FLOPs are charged per reported step at the mask densities of that step (a method that
        rewrites masks from ``on_step`` is charged at the new densities from the next step on).
        Without a trainer the call is skipped with a warning.

        With ``checkpoints`` set (single-run methods with ``checkpoint_dir``) the run is saved
        every ``checkpoint_every`` steps and when the call ends. A resumed run passes through the
        train calls the checkpoint had finished without training (the method's code between
        them runs again; everything it changes is restored), restores the whole state in the
        call the checkpoint was taken in, and continues it.
        """
        if iterations <= 0:
            return 0
        if self.trainer is None:
            if not self._warned_no_trainer:
                warnings.warn(
                    f"no trainer given: skipping {iterations} training iterations (pass "
                    "trainer=nmcompile.SupervisedTrainer(train_loader, val_loader) to train)",
                    stacklevel=3,
                )
                self._warned_no_trainer = True
            return 0
        call = self._calls
        self._calls += 1
        ck = self.checkpoints
        start = 0
        if ck is not None and ck.replaying:
            outcome = ck.reach(call)
            if outcome is not None and outcome[0] == "skip":
                return outcome[1]
            if outcome is not None:  # ("continue", steps already taken in this call)
                start = outcome[1]
        # a trainer that continues a call itself (SupervisedTrainer) numbers steps on from the
        # checkpoint; any other is asked for the remaining steps, numbered from 1
        offset = 0 if start == 0 or ck.trainer_continues else start

        def cost() -> float:
            return self.flops.train_step(self._density, dense_weight_grad=dense_weight_grad)

        per_sample = cost()
        seen = self._mask_version
        steps = start

        def hook(info: StepInfo) -> bool | None:
            nonlocal steps, per_sample, seen
            if self._mask_version != seen:
                seen = self._mask_version
                per_sample = cost()
            if offset:
                info = StepInfo(info.iteration + offset, info.batch_size, info.loss, info.lr)
            steps += 1  # counted, not read from info: a user trainer may number its own way
            self.iterations += 1
            self._samples_seen += info.batch_size
            charge = per_sample if self.step_flops_override is None else self.step_flops_override
            self.train_flops += charge * info.batch_size
            stop = on_step(info) if on_step is not None else None
            if ck is not None and not stop and steps < iterations:
                ck.after_step(self)
            return stop

        self._live_call = call
        try:
            self.trainer.train(self.gm, iterations - offset, hook)
        finally:
            self._live_call = None
        if steps == start and start < iterations:
            # A user trainer that never calls on_step: charge the requested iterations at the
            # example batch size rather than report zero cost.
            steps = iterations
            self.iterations += iterations - start
            self.train_flops += per_sample * self._fallback_batch * (iterations - start)
        self.call_steps.append(steps)
        if ck is not None:
            ck.after_call(self)
        return steps

    def check_finite(self, when: str, *, trained: bool = False) -> None:
        """Raise :class:`NonFiniteError` naming every parameter that holds NaN or Inf.

        A masked NaN still poisons the output (NaN * 0 is NaN), so no weight of the model may be
        non-finite, pruned or not. One fused reduction per parameter, no host sync per tensor."""
        params = [(n, p) for n, p in self.gm.named_parameters() if p.is_floating_point()]
        if not params:
            return
        flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu()
        if bool(flags.all()):
            return
        bad: list[str] = []
        for (name, p), ok in zip(params, flags.tolist()):
            if not ok:
                w = p.detach()
                bad.append(
                    f"{name} {tuple(w.shape)}: {int(torch.isnan(w).sum())} NaN, "
                    f"{int(torch.isinf(w).sum())} Inf"
                )
        if len(bad) > 6:
            bad = [*bad[:5], f"and {len(bad) - 5} more"]
        hint = (
            "fix or re-train the checkpoint (a NaN weight poisons the output even when pruned)"
            if not trained
            else "training diverged: lower the trainer's lr or add gradient clipping; finished "
            "rounds are in checkpoint_dir when one was given"
        )
        raise NonFiniteError(f"non-finite weights {when}: {'; '.join(bad)}. {hint}")

    def add_flops(self, flops: float) -> None:
        """Charge work done outside ``train`` (e.g. an extra dense gradient for RigL)."""
        self.train_flops += flops

    def evaluate(self) -> float | None:
        return None if self.trainer is None else self.trainer.evaluate(self.gm)

    def end_round(self, **extra: Any) -> dict[str, Any]:
        """Append one record to ``history``: round, sparsity, accuracy, cumulative train FLOPs.

        Under torchrun the ranks first prove they hold the same masks and weights. Weights that
        training turned into NaN / Inf end the run here with a :class:`NonFiniteError`. While a
        resumed run passes through what its checkpoint had finished, a placeholder is recorded
        (the checkpoint's history replaces it) and nothing is evaluated."""
        if self.checkpoints is not None and self.checkpoints.replaying:
            record = {"round": len(self.history), **extra}
            self.history.append(record)
            return record
        self.check_finite(f"after round {len(self.history)}", trained=True)
        if _dist.enabled():
            _dist.same_on_all_ranks(
                [self.mask(s) for s in self.sites], f"the masks after round {len(self.history)}"
            )
            _dist.same_on_all_ranks(
                [p for p in self.gm.parameters()], f"the weights after round {len(self.history)}"
            )
        record: dict[str, Any] = {
            "round": len(self.history),
            "sparsity": self.sparsity(),
            "accuracy": self.evaluate(),
            "train_flops": self.train_flops,
            "iterations": self.iterations,
            "samples": self._samples_seen,
            "wall_s": time.perf_counter() - self._t0,
        }
        record.update(extra)
        self.history.append(record)
        return record

    def sample_batch(self, index: int = 0) -> tuple[tuple[Any, ...], torch.Tensor | None]:
        """(inputs, targets or None): training batch ``index`` (mod the epoch) when the trainer
        exposes its ``train_loader``, else the example inputs. Used by data-driven criteria. Under
        torchrun it is the same batch on every rank (the unsharded loader), so decisions agree."""
        loader = getattr(self.trainer, "unsharded_train_loader", None)
        if loader is None:
            loader = getattr(self.trainer, "train_loader", None)
        device = next(self.gm.parameters()).device
        if loader is not None:
            from ._loaders import untouched

            n = len(loader) if hasattr(loader, "__len__") else 1
            with untouched(loader):  # the training stream must not notice
                it = (
                    loader.iter_from(index % max(n, 1))
                    if hasattr(loader, "iter_from")
                    else iter(loader)
                )
                batch = next(iter(it), None)
            if isinstance(batch, (list, tuple)) and len(batch) == 2:
                x = batch[0]
                if isinstance(x, Mapping):  # keyword inputs (a tokenizer's output)
                    from .passes.trace import input_spec, place_keywords, placeholder_params

                    kw = {k: v.to(device) for k, v in x.items()}
                    spec = input_spec(self.gm)
                    # placed by name: the export graph's spec, or the fx graph's placeholders
                    args = (
                        spec.bind((), kw)
                        if spec
                        else place_keywords(
                            kw, placeholder_params(self.gm), "the batch", "the compiled model"
                        )
                    )
                    return args, batch[1].to(device)
                return (x.to(device),), batch[1].to(device)
        return tuple(
            x.to(device) if isinstance(x, torch.Tensor) else x for x in self.example_inputs
        ), None

    def channel_graph(self):
        """The channel dependency graph of the model (shapes from the example inputs)."""
        from .passes import build_channel_graph, propagate_shapes

        device = next(self.gm.parameters()).device
        inputs = tuple(
            x.to(device) if isinstance(x, torch.Tensor) else x for x in self.example_inputs
        )
        propagate_shapes(self.gm, inputs)
        return build_channel_graph(self.gm)

    def site_by_param(self) -> Mapping[str, PrunableSite]:
        return {s.param: s for s in self.sites}

    # -- state -----------------------------------------------------------------------------------
    def weights_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every parameter and buffer except the masks (the rewind snapshot)."""
        masks = {s.mask_target for s in self.sites}
        return {
            k: v.detach().cpu().clone() for k, v in self.gm.state_dict().items() if k not in masks
        }

    def load_weights_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write ``state`` into the model in place (masks untouched)."""
        live = self.gm.state_dict(keep_vars=True)
        missing = sorted(set(state) - set(live))
        if missing:
            raise KeyError(f"weights state names tensors the model does not have: {missing[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                live[k].copy_(v)

    def rank_state(self) -> dict[str, Any]:
        """This process's own part of a checkpoint: its RNG states and where its data stream
        is. Under torchrun every rank sends its own to rank 0 (``_dist.all_gather_object``)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # this process's device only: under torchrun every rank has its own, and reading all
            # of them would open a context on every GPU
            rng["cuda"] = torch.cuda.get_rng_state()
        stream = getattr(self.trainer, "stream_state", None)
        return {"rng": rng, "stream": stream() if callable(stream) else None}

    def state_dict(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to continue this run bit for bit (see ``_checkpoint``). ``ranks``:
        every rank's :meth:`rank_state` (default: this process's alone)."""
        trainer_state = getattr(self.trainer, "state_dict", None)
        ranks = [self.rank_state()] if ranks is None else ranks
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.gm.state_dict().items()},
            # what state_dict does not hold: parameters a method stopped training
            "requires_grad": [p.requires_grad for p in self.gm.parameters()],
            "history": [dict(h) for h in self.history],
            "diagnostics": dict(self.diagnostics),
            "train_flops": self.train_flops,
            "iterations": self.iterations,
            "samples": self._samples_seen,
            "step_flops_override": self.step_flops_override,
            "call_steps": list(self.call_steps),
            "live_call": self._live_call,
            "elapsed_s": time.perf_counter() - self._t0,
            "trainer": trainer_state() if callable(trainer_state) else None,
            "rng": ranks[0]["rng"],
            "ranks": ranks,
            "world": _dist.world_size(),
            "tracked": {name: obj.state_dict() for name, obj in self.tracked.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        """Restore :meth:`state_dict`'s run state; returns why it cannot continue the run bit
        for bit (a different number of ranks) or None."""
        self.gm.load_state_dict(state["model"])
        if "requires_grad" in state:
            for p, flag in zip(self.gm.parameters(), state["requires_grad"]):
                p.requires_grad_(bool(flag))
        self.history = [dict(h) for h in state["history"]]
        if "diagnostics" in state:
            self.diagnostics = dict(state["diagnostics"])
        self.train_flops = float(state["train_flops"])
        self.iterations = int(state["iterations"])
        self._samples_seen = int(state.get("samples", 0))
        self.step_flops_override = state.get("step_flops_override")
        self.call_steps = [int(n) for n in state.get("call_steps", [])]
        self._t0 = time.perf_counter() - float(state["elapsed_s"])
        ranks = state.get("ranks") or [{"rng": state["rng"], "stream": None}]
        world, rank = _dist.world_size(), _dist.rank()
        inexact = None
        if len(ranks) != world:
            inexact = (
                f"the checkpoint was written by a run on {len(ranks)} process(es), this one runs "
                f"on {world}: the data is sharded differently"
            )
        mine = ranks[rank] if rank < len(ranks) else ranks[0]
        trainer_state = state.get("trainer")
        if trainer_state is not None and mine.get("stream") is not None:
            trainer_state = {**trainer_state, **mine["stream"]}
        if trainer_state is not None and hasattr(self.trainer, "load_state_dict"):
            self.trainer.load_state_dict(trainer_state)
        for name, obj in self.tracked.items():
            obj.load_state_dict(state["tracked"][name])
        torch.set_rng_state(mine["rng"]["torch"])
        cuda_rng = mine["rng"].get("cuda")
        if cuda_rng is not None and torch.cuda.is_available():
            if isinstance(cuda_rng, (list, tuple)):  # checkpoints that saved every device
                cuda_rng = cuda_rng[torch.cuda.current_device()]
            torch.cuda.set_rng_state(cuda_rng)
        self._density = {s.param: float(self.mask(s).sum()) / s.numel for s in self.sites}
        self._mask_version += 1
        self.resume_note = inexact
        if inexact is not None:
            warnings.warn(
                f"resuming from a checkpoint that will not continue the run bit for bit: {inexact}",
                NMCompileWarning,
                stacklevel=3,
            )
        return inexact
