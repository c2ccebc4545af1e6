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
from ._errors import NonFiniteError
from ._flops import FlopModel
from ._pattern import NMPattern
from ._trainer import OnStep, StepInfo, Trainer
from .passes import PrunableSite

__all__ = ["Session"]


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
    def train(
        self, iterations: int, on_step: OnStep | None = None, *, dense_weight_grad: bool = False
    ) -> int:
        """Train for ``iterations`` steps through the trainer; returns the steps taken.

        FLOPs are charged per reported step at the mask densities of that step (a method that
        rewrites masks from ``on_step`` is charged at the new densities from the next step on).
        Without a trainer the call is skipped with a warning.
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

        def cost() -> float:
            return self.flops.train_step(self._density, dense_weight_grad=dense_weight_grad)

        per_sample = cost()
        seen = self._mask_version
        steps = 0

        def hook(info: StepInfo) -> bool | None:
            nonlocal steps, per_sample, seen
            if self._mask_version != seen:
                seen = self._mask_version
                per_sample = cost()
            steps += 1
            self._samples_seen += info.batch_size
            charge = per_sample if self.step_flops_override is None else self.step_flops_override
            self.train_flops += charge * info.batch_size
            return on_step(info) if on_step is not None else None

        self.trainer.train(self.gm, iterations, hook)
        if steps == 0:
            # A user trainer that never calls on_step: charge the requested iterations at the
            # example batch size rather than report zero cost.
            steps = iterations
            self.train_flops += per_sample * self._fallback_batch * iterations
        self.iterations += steps
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
        training turned into NaN / Inf end the run here with a :class:`NonFiniteError`."""
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
            n = len(loader) if hasattr(loader, "__len__") else 1
            it = (
                loader.iter_from(index % max(n, 1))
                if hasattr(loader, "iter_from")
                else iter(loader)
            )
            for batch in it:
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
                break
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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run bit for bit (see ``_checkpoint``)."""
        trainer_state = getattr(self.trainer, "state_dict", None)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # this process's device only: under torchrun every rank has its own, and reading all
            # of them would open a context on every GPU
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.gm.state_dict().items()},
            "history": [dict(h) for h in self.history],
            "train_flops": self.train_flops,
            "iterations": self.iterations,
            "samples": self._samples_seen,
            "elapsed_s": time.perf_counter() - self._t0,
            "trainer": trainer_state() if callable(trainer_state) else None,
            "rng": rng,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gm.load_state_dict(state["model"])
        self.history = [dict(h) for h in state["history"]]
        self.train_flops = float(state["train_flops"])
        self.iterations = int(state["iterations"])
        self._samples_seen = int(state.get("samples", 0))
        self._t0 = time.perf_counter() - float(state["elapsed_s"])
        if state.get("trainer") is not None and hasattr(self.trainer, "load_state_dict"):
            self.trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"].get("cuda")
        if cuda_rng is not None and torch.cuda.is_available():
            if isinstance(cuda_rng, (list, tuple)):  # checkpoints that saved every device
                cuda_rng = cuda_rng[torch.cuda.current_device()]
            torch.cuda.set_rng_state(cuda_rng)
        self._density = {s.param: float(self.mask(s).sum()) / s.numel for s in self.sites}
        self._mask_version += 1
