"""Pass infrastructure: ``GraphModule -> PassResult`` and an honest runner.

A pass is a plain function ``pass_(gm, **settings) -> PassResult(graph_module, modified)``, the
torch.fx ``passes/infra`` convention. Passes mutate their input in place and say so with
``modified``; the runner can check that claim (graph code and every tensor's in-place version
counter before and after) and names the passes that ran before a failure, so a broken invariant is
traced to the pass that broke it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from nmcompile._errors import PassError

__all__ = ["PassResult", "fingerprint", "run_passes"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly same) GraphModule and whether it changed it."""

    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule], PassResult]
Invariant = Callable[[fx.GraphModule], None]


def fingerprint(gm: fx.GraphModule) -> str:
    """A digest that changes when the graph or any parameter/buffer changes.

    Tensor contents are tracked through ``Tensor._version`` (bumped by every in-place write that
    autograd sees) and, for writes through ``.data`` that bypass it, a sum and a sum of squares.
    This reads every tensor once, so the runner does it only in ``check_modified`` (debug) mode.
    """
    h = hashlib.sha256(gm.graph.python_code("self").src.encode())
    with torch.no_grad():
        for name, t in sorted(gm.state_dict(keep_vars=True).items()):
            d = t.detach().double()
            sums = (float(d.sum()), float((d * d).sum())) if d.numel() else (0.0, 0.0)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t._version}:{sums};".encode())
    return h.hexdigest()


def _name(p: Callable) -> str:
    return getattr(p, "__name__", None) or type(p).__name__


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    *,
    invariants: Sequence[Invariant] = (),
    check_modified: bool = False,
) -> PassResult:
    """Run ``passes`` in order, then each invariant after each pass.

    ``check_modified`` (the ``debug=True`` mode) verifies every pass's ``modified`` claim. Any
    failure raises ``PassError`` naming the pass and the passes that ran before it.
    """
    ran: list[str] = []
    modified = False
    for p in passes:
        name = _name(p)
        before = fingerprint(gm) if check_modified else None
        try:
            result = p(gm)
        except PassError:
            raise
        except Exception as exc:
            raise PassError(
                f"pass {name} failed after {ran or 'no other pass'}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass {name} returned {type(result).__name__}, not a PassResult")
        if check_modified and result.graph_module is gm:
            changed = fingerprint(gm) != before
            if changed != result.modified:
                raise PassError(
                    f"pass {name} reported modified={result.modified} but the graph module "
                    f"{'changed' if changed else 'did not change'} (passes before it: {ran})"
                )
        gm = result.graph_module
        modified |= result.modified
        ran.append(name)
        for inv in invariants:
            try:
                inv(gm)
            except Exception as exc:
                raise PassError(
                    f"invariant {_name(inv)} broken after pass {name} (passes run: {ran}): {exc}"
                ) from exc
    return PassResult(gm, modified)


def module_and_attr(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """Split ``"a.b.weight"`` into (``gm.a.b``, ``"weight"``)."""
    owner, _, attr = target.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr
