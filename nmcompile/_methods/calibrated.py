"""One-shot pruning from calibration data: Wanda and SparseGPT, N:M or unstructured.

Both prune a trained model without training, from the inputs each pruned layer sees on a few
calibration samples (``compile(..., calibration=<iterable of input batches>)``, the first
``calibration_samples`` samples; without it, the inputs of the trainer's ``train_loader``). The
inputs are read on the traced graph: an ``fx.Interpreter`` runs it and records the input of each
masked conv / linear call. With ``sequential=True`` (the default, as both papers do) the layers
are pruned one at a time in graph order and each layer's statistics come from a forward through
the layers already pruned before it (the pass stops at the layer, so the later layers are not
run); with ``sequential=False`` one forward gathers every layer's statistics from the dense model.

- **Wanda** (Sun et al. 2023): the score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, the norm of
  its input feature over all calibration tokens (for a conv, the feature is the input channel at
  the kernel offset, from ``unfold``); the mask keeps the best N of every M in each output row's
  groups, or, unstructured, the best ``1 - target_sparsity`` of each output row. Weights are not
  changed.
- **SparseGPT** (Frantar & Alistarh 2023, Alg. 1): with the input Hessian ``H = X X^T`` (dampened by
  ``dampening * mean(diag H)``) and the upper Cholesky factor ``U`` of ``H^-1``, the columns are
  visited in blocks of ``blocksize``; at the first column of each group of M the N:M mask of the
  group is chosen by ``w^2 / U_ii^2`` from the weights as updated so far (unstructured: the whole
  block's mask at once, by a threshold over the block), each pruned column's error is spread over
  the remaining columns of the block (OBS update), and the block's error over the later columns
  in one matrix product. Conv weights are visited with their N:M groups as consecutive columns
  (``[K, R, S, C]``). The relative output error of each layer on the calibration inputs,
  ``tr(dW H dW^T) / tr(W H W^T)``, is reported.

A ``matmul`` site (a parameter the graph feeds to a product itself) is read at the product:
``addmm(bias, x, w)`` / ``mm`` / ``matmul`` with an ``[in, out]`` weight (transformers'
``Conv1D``: GPT-2's layers), ``linear`` with ``[out, in]``. A parameter used inside an opaque op
(the packed qkv of ``nn.MultiheadAttention``'s fast path) or a conv other than 2-D has no input
nmcompile can read: it is pruned by magnitude and named with the reason in
``diagnostics["calibration_fallback"]``. With a trainer and ``finetune_iterations`` the pruned
model is fine-tuned with its masks fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._config import CheckpointedConfig, check_float, check_int
from .._errors import ConfigError, InputError
from .._registry import register_method
from .._session import Session

__all__ = ["SparseGPTConfig", "WandaConfig", "sparsegpt_prune"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CalibratedConfig(CheckpointedConfig):
    """``calibration_samples``: samples of the calibration data used (the first ones).
    ``sequential``: each layer's statistics from the model with the layers before it already
    pruned (True) or all from the dense model (False). ``target_sparsity``: unstructured, each
    output row at this sparsity (None: the compile ``pattern``). ``finetune_iterations``: training
    with the masks fixed afterwards, when a trainer is given. ``permute``: run the channel
    permutation pass first (N:M only; see ``passes.permute_channels``)."""

    calibration_samples: int = 128
    sequential: bool = True
    target_sparsity: float | None = None
    finetune_iterations: int = 0
    permute: bool = False

    def validate(self) -> None:
        check_int(self, "calibration_samples", 1)
        check_int(self, "finetune_iterations", 0)
        for flag in ("sequential", "permute"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{type(self).__name__}.{flag} must be True or False")
        if self.target_sparsity is not None:
            check_float(self, "target_sparsity", 0.0, 1.0, lo_open=True, hi_open=True)
            if self.permute:
                raise ConfigError(
                    f"{type(self).__name__}: permute=True serves N:M masks; drop it for an "
                    "unstructured target_sparsity"
                )

    @property
    def structured(self) -> bool:
        return self.target_sparsity is None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaConfig(_CalibratedConfig):
    """Wanda: |W| times the input feature's norm, N:M per output row (module docstring)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(_CalibratedConfig):
    """SparseGPT: OBS reconstruction with the input Hessian. ``blocksize``: columns per lazy
    update block (128 in the paper); ``dampening``: added to the Hessian's diagonal as a fraction
    of its mean (0.01)."""

    blocksize: int = 128
    dampening: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_int(self, "blocksize", 1)
        check_float(self, "dampening", 0.0, 1.0, lo_open=True)


# -- calibration inputs --------------------------------------------------------------------------
def calibration_batches(session: Session, samples: int, method: str) -> list[tuple]:
    """The calibration data as positional-argument tuples on the model's device, ``samples``
    samples in all (the last batch cut)."""
    source = session.calibration
    from_trainer = source is None
    if from_trainer:
        source = getattr(session.trainer, "unsharded_train_loader", None) or getattr(
            session.trainer, "train_loader", None
        )
    if source is None:
        raise ConfigError(
            f"{method} needs calibration data: pass calibration=<iterable of input batches> to "
            "compile (e.g. a few batches of training inputs), or a trainer whose train_loader "
            "it can read"
        )
    n_inputs = len(session.example_inputs)
    device = next(session.gm.parameters()).device
    out: list[tuple] = []
    seen = 0
    for batch in source:
        args = _as_args(batch, n_inputs, from_trainer, session)
        n = _batch_len(args)
        if n is None:
            raise InputError(
                f"{method}: a calibration batch holds no tensor with a batch dimension; give "
                "input tensors (or tuples / dicts of them)"
            )
        take = min(n, samples - seen)
        if take < n:
            args = tuple(a[:take] if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
        out.append(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
        seen += take
        if seen >= samples:
            break
    if not out:
        raise InputError(f"{method}: the calibration data yielded no batch")
    return out


def _as_args(batch: Any, n_inputs: int, from_trainer: bool, session: Session) -> tuple:
    if isinstance(batch, Mapping):
        if "input" in batch and "target" in batch:
            return _as_args(batch["input"], n_inputs, False, session)
        from ..passes.trace import input_spec, place_keywords, placeholder_params

        spec = input_spec(session.gm)
        if spec:
            return tuple(spec.bind((), dict(batch)))
        return tuple(
            place_keywords(
                dict(batch), placeholder_params(session.gm), "calibration", "the compiled model"
            )
        )
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        # an (input, target) pair, as training loaders yield, when the model takes one input
        if (from_trainer or n_inputs == 1) and len(batch) == 2 and n_inputs == 1:
            return _as_args(batch[0], n_inputs, False, session)
        return tuple(batch)
    raise InputError(
        f"a calibration batch is a {type(batch).__name__}; give tensors, tuples of positional "
        "inputs or dicts of keyword inputs"
    )


def _batch_len(args: tuple) -> int | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim():
            return int(a.shape[0])
    return None


class _Stop(Exception):
    pass


class _Recorder(fx.Interpreter):
    """Runs the graph and hands the input of each watched call node to ``sink``; stops after
    ``stop_at`` (the layer being pruned: nothing later is needed)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, Any], stop_at: fx.Node | None):
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.stop_at = watch, stop_at

    def run_node(self, n: fx.Node) -> Any:
        watched = self.watch.get(n)
        if watched is not None:
            sink, index = watched
            args, _ = self.fetch_args_kwargs_from_env(n)
            sink(args[index].detach())
            if n is self.stop_at:
                raise _Stop
        return super().run_node(n)


def _record(gm: fx.GraphModule, batches: list[tuple], watch: dict, stop_at: fx.Node | None) -> None:
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for args in batches:
                with contextlib.suppress(_Stop):
                    _Recorder(gm, watch, stop_at).run(*args)
    finally:
        gm.train(was)


# -- per-layer statistics --------------------------------------------------------------------------
class _Stats:
    """What one layer's calibration inputs are reduced to: the input Hessian ``X X^T`` (SparseGPT)
    or the squared norm of every input feature (Wanda), over all tokens, in the column order of
    ``columns(W)``: ``[in]`` for a linear, ``(r, s, c)`` for a conv (N:M groups consecutive)."""

    def __init__(self, call: Any, full: bool) -> None:
        self.call, self.full = call, full
        self.acc: torch.Tensor | None = None
        self.tokens = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, columns] from a call's input."""
        node = self.call.node
        if self.call.site.kind == "conv":
            w = self.call.site.shape
            stride, padding, dilation = (node.args[i] for i in (3, 4, 5))
            cols = F.unfold(x.float(), w[2:], dilation=dilation, padding=padding, stride=stride)
            b, _, length = cols.shape
            c, rs = w[1], w[2] * w[3]
            # (c, r, s) -> (r, s, c): the N:M groups of input channels become consecutive
            return cols.view(b, c, rs, length).permute(0, 3, 2, 1).reshape(-1, rs * c)
        return x.float().reshape(-1, x.shape[-1])

    def __call__(self, x: torch.Tensor) -> None:
        f = self.features(x)
        part = f.T @ f if self.full else f.pow(2).sum(0)
        self.acc = part if self.acc is None else self.acc + part
        self.tokens += f.shape[0]


def columns(site: Any, w: torch.Tensor) -> torch.Tensor:
    """A weight as ``[outputs, inputs]`` with its N:M groups as consecutive columns (a conv's
    inputs in ``(r, s, c)`` order; an ``[in, out]`` weight transposed)."""
    if site.kind == "conv":
        k, c, r, s = w.shape
        return w.permute(0, 2, 3, 1).reshape(k, r * s * c)
    return site.rows(w)


def from_columns(site: Any, cols: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if site.kind == "conv":
        k, c, r, s = like.shape
        return cols.reshape(k, r, s, c).permute(0, 3, 1, 2).contiguous()
    return site.from_rows(cols).reshape(like.shape)


# products a parameter is fed to, with the positions of (input, weight) and the weight's layout
_PRODUCTS = {
    "addmm": (1, 2, "in_out"),  # addmm(bias, x, w): x @ w, w [in, out] (transformers' Conv1D)
    "mm": (0, 1, "in_out"),
    "matmul": (0, 1, "in_out"),
    "linear": (0, 1, "out_in"),
}


def _product(node: fx.Node) -> tuple[int, int, str] | None:
    import operator

    target = node.target
    if target is operator.matmul:
        return _PRODUCTS["matmul"]
    if target is F.linear:
        return _PRODUCTS["linear"]
    name = getattr(target, "__name__", str(target)).split(".")[0]
    return _PRODUCTS.get(name) if node.op == "call_function" else None


def _watch_points(call: Any) -> list[tuple[fx.Node, int]] | str:
    """Where a call's input is read: (node, argument index) pairs, or why it cannot be."""
    site = call.site
    if site.kind == "conv":
        if len(site.shape) != 4:
            return f"a {len(site.shape) - 2}-D conv: only 2-D convs are unfolded"
        if isinstance(call.node.args[4], str):
            return "a conv with string padding"
        return [(call.node, 0)]
    if site.kind == "linear":
        return [(call.node, 0)] if site.group_axis == 1 else "a linear reduced along axis 0"
    points = []
    for user in call.node.users:  # a matmul site: its mask node feeds the products
        spec = _product(user)
        if spec is None or len(user.args) <= spec[1] or user.args[spec[1]] is not call.node:
            return f"its weight feeds {user.op} {getattr(user.target, '__name__', user.target)}"
        layout = "in_out" if site.group_axis == 0 else "out_in"
        if len(site.shape) != 2 or layout != spec[2]:
            return f"a {len(site.shape)}-D weight in {user.target}"
        points.append((user, spec[0]))
    return points or "its mask feeds nothing"


# -- the two criteria ------------------------------------------------------------------------------
def _row_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured: the best ``1 - sparsity`` of each row."""
    drop = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        mask.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, False)
    return mask


def wanda_mask(
    w_cols: torch.Tensor, sq_norms: torch.Tensor, pattern: Any, sparsity: float | None
) -> torch.Tensor:
    scores = w_cols.abs().float() * sq_norms.clamp_min(0).sqrt().unsqueeze(0)
    if sparsity is None:
        return pattern.mask(scores, 1)
    return _row_keep(scores, sparsity)


def sparsegpt_prune(
    w_cols: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n: int | None,
    m: int | None,
    sparsity: float | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """SparseGPT on one ``[rows, cols]`` weight: (pruned and updated weight, bool mask, facts).
    N:M groups are consecutive columns; ``sparsity`` instead gives unstructured masks."""
    w = w_cols.detach().float().clone()
    _rows, cols = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = dampening * float(torch.diag(h).mean())
    eye = torch.arange(cols, device=h.device)
    for _attempt in range(6):
        try:
            hd = h.clone()
            hd[eye, eye] += damp
            chol = torch.linalg.cholesky(hd)
            hinv = torch.cholesky_inverse(chol)
            u = torch.linalg.cholesky(hinv, upper=True)
            break
        except torch.linalg.LinAlgError:
            damp *= 10.0  # a rank-deficient Hessian: dampen more
    else:
        raise ConfigError("SparseGPT: the input Hessian stays singular after dampening x1e6")
    mask = torch.zeros_like(w, dtype=torch.bool)  # True: pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diag(u1)
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        if sparsity is not None:
            score = w1.pow(2) / d1.pow(2).unsqueeze(0)
            k = int(score.numel() * sparsity)
            if k:
                thresh = score.flatten().kthvalue(k).values
                m1 = score <= thresh
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                score = w1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)
                low = score.topk(m - n, dim=1, largest=False).indices
                m1.scatter_(1, i + low, True)
            col = w1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = m1
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    delta = w - w_cols.float()
    num = float(torch.einsum("ij,jk,ik->", delta, hessian.float(), delta))
    den = float(torch.einsum("ij,jk,ik->", w_cols.float(), hessian.float(), w_cols.float()))
    facts = {"output_error": num / den if den > 0 else 0.0, "dampening": damp}
    return w.to(w_cols.dtype), ~mask, facts


# -- the method ----------------------------------------------------------------------------------
def permute(session: Session, max_iterations: int = 100) -> dict[str, Any]:
    """Run the channel permutation pass on the session's model (N:M only)."""
    from ..passes.permute_channels import permute_channels

    if session.pattern is None:
        raise ConfigError("permute=True serves N:M patterns; it has nothing to do unstructured")
    device = next(session.gm.parameters()).device
    inputs = tuple(
        x.to(device) if isinstance(x, torch.Tensor) else x for x in session.example_inputs
    )
    return permute_channels(
        session.gm,
        inputs,
        session.pattern.n,
        session.pattern.m,
        graph=session.channel_graph(),
        max_iterations=max_iterations,
    )


def _calls(session: Session) -> list[Any]:
    from ..passes.insert_masks import masked_calls

    return list(masked_calls(session.gm))


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]


def run_calibrated(session: Session, config: _CalibratedConfig, method: str) -> None:
    pattern = session.pattern
    if config.structured and pattern is None:
        raise ConfigError(f"{method} without target_sparsity needs an N:M pattern")
    t0 = time.perf_counter()
    if config.permute:
        session.diagnostics["permutation"] = permute(session)
    batches = calibration_batches(session, config.calibration_samples, method)
    calls = _calls(session)
    by_site: dict[str, list[Any]] = {}
    for c in calls:
        by_site.setdefault(c.site.param, []).append(c)
    sites = {s.param: s for s in session.sites}
    points: dict[str, list[tuple[fx.Node, int]]] = {}
    fallback: dict[str, str] = {}
    for p, cs in by_site.items():
        for c in cs:
            found = _watch_points(c)
            if isinstance(found, str):
                fallback[p] = found
                break
            points.setdefault(p, []).extend(found)
    pos = _position(session.gm)
    # in the order the layers compute (a matmul site's mask node may sit well before its use)
    order = sorted(
        (p for p in by_site if p not in fallback), key=lambda p: min(pos(n) for n, _ in points[p])
    )
    full = method == "sparsegpt"
    layers: dict[str, dict[str, Any]] = {}

    def prune(param: str, stats: _Stats) -> None:
        site = sites[param]
        weight = session.weight(site)
        cols = columns(site, weight.detach())
        t = time.perf_counter()
        acc = stats.acc / max(stats.tokens, 1)
        if full:
            new, keep, facts = sparsegpt_prune(
                cols,
                acc,
                n=None if pattern is None or not config.structured else pattern.n,
                m=None if pattern is None or not config.structured else pattern.m,
                sparsity=config.target_sparsity,
                blocksize=config.blocksize,
                dampening=config.dampening,
            )
            with torch.no_grad():
                weight.copy_(from_columns(site, new, weight))
        else:
            keep = wanda_mask(cols, acc, pattern, config.target_sparsity)
            retained = float((cols.abs() * keep).sum() / cols.abs().sum().clamp_min(1e-30))
            facts = {"retained_magnitude": retained}
        session.set_mask(site, from_columns(site, keep, weight))
        layers[param] = {**facts, "tokens": stats.tokens, "seconds": time.perf_counter() - t}

    if config.sequential:
        for param in order:
            stats = _Stats(by_site[param][0], full)
            watch = {node: (stats, i) for node, i in points[param]}
            last = max((node for node, _ in points[param]), key=pos)
            _record(session.gm, batches, watch, stop_at=last)
            prune(param, stats)
    else:
        all_stats = {p: _Stats(by_site[p][0], full) for p in order}
        watch = {node: (all_stats[p], i) for p in order for node, i in points[p]}
        _record(session.gm, batches, watch, stop_at=None)
        for p in order:
            prune(p, all_stats[p])
    for param in fallback:  # no readable input: magnitude
        site = sites[param]
        w = session.weight(site).detach()
        if config.structured:
            session.set_mask(site, pattern.mask(w, site.group_axis, transform=torch.abs))
        else:
            rows = site.rows(w.abs())
            session.set_mask(site, site.from_rows(_row_keep(rows, config.target_sparsity)))
    samples = sum(_batch_len(b) or 0 for b in batches)
    session.diagnostics.update(
        calibration_samples=samples,
        calibration_layers=layers,
        calibration_fallback=fallback,
        calibration_seconds=time.perf_counter() - t0,
    )
    session.end_round(phase="pruned")
    if session.trainer is not None and config.finetune_iterations:
        session.train(config.finetune_iterations)
        session.end_round(phase="fine-tuned")


@register_method(
    "wanda",
    WandaConfig,
    structured=lambda c: c.structured,
    summary="Wanda: |W| x input-feature norm from calibration data, one shot, no training",
)
def run_wanda(session: Session, config: WandaConfig) -> None:
    run_calibrated(session, config, "wanda")


@register_method(
    "sparsegpt",
    SparseGPTConfig,
    structured=lambda c: c.structured,
    summary="SparseGPT: one-shot OBS reconstruction with the input Hessian, N:M or unstructured",
)
def run_sparsegpt(session: Session, config: SparseGPTConfig) -> None:
    run_calibrated(session, config, "sparsegpt")
