"""Distributed runs under ``torchrun``: one process per device, the same ``compile`` call in each.

nmcompile needs no code change for ``torchrun --nproc_per_node=N script.py``: when the launcher's
environment (``WORLD_SIZE`` > 1) is present the default process group is initialised on first use
(gloo on CPU, nccl when the trainer's device is CUDA), the trainer shards its data and wraps the
model in DistributedDataParallel, and the masks are kept identical on every rank:

- every mask write (``Session.set_mask``) is broadcast from rank 0, so a method that decides from
  rank-local numbers (a dense gradient on the rank's own batch, a random draw) still ends with
  rank 0's decision everywhere;
- at the end of every round the ranks compare a digest of all masks and of the weights; a
  mismatch raises :class:`DistributedMismatchError` instead of training on silently diverged
  models;
- only rank 0 writes checkpoints and reports. Resuming reads the checkpoint folder on every rank,
  so under several nodes it must be on a shared filesystem.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch

from ._errors import NMCompileError

__all__ = [
    "DistributedMismatchError",
    "all_gather_object",
    "broadcast_",
    "broadcast_module_",
    "broadcast_object",
    "decide_on_main",
    "enabled",
    "is_main",
    "maybe_init",
    "rank",
    "same_on_all_ranks",
    "world_size",
]


class DistributedMismatchError(NMCompileError):
    """Ranks that should hold identical state do not."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def enabled() -> bool:
    """True inside an initialised process group of more than one rank."""
    dist = _dist()
    return bool(dist and dist.is_initialized() and dist.get_world_size() > 1)


def world_size() -> int:
    return _dist().get_world_size() if enabled() else 1


def rank() -> int:
    return _dist().get_rank() if enabled() else 0


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes checkpoints, reports and files."""
    return rank() == 0


def _launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def maybe_init(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun and nobody has yet.

    Returns :func:`enabled`. The backend is nccl for a CUDA ``device``, gloo otherwise; a user who
    initialised the group already keeps theirs.
    """
    dist = _dist()
    if dist is None or not _launched():
        return False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return enabled()


def _comm_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor the backend can send: bool as uint8, CPU tensors on the GPU under nccl."""
    out = t.to(torch.uint8) if t.dtype == torch.bool else t
    if _dist().get_backend() == "nccl" and out.device.type != "cuda":
        out = out.to(f"cuda:{torch.cuda.current_device()}")
    return out.contiguous()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op in a single process)."""
    if not enabled():
        return tensor
    buf = _comm_tensor(tensor)
    _dist().broadcast(buf, src)
    if buf is not tensor:
        with torch.no_grad():
            tensor.copy_(buf.to(device=tensor.device, dtype=tensor.dtype))
    return tensor


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (e.g. differently seeded inits)."""
    if not enabled():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            broadcast_(t.data, src)


def decide_on_main(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result; an ``NMCompileError`` it
    raises is raised on every rank (one rank refusing alone would leave the others waiting in
    the next collective)."""
    if not enabled():
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except NMCompileError as exc:
            outcome = ("error", (type(exc), str(exc)))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        cls, msg = value
        raise cls(msg)
    return value


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` itself in one process."""
    if not enabled():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` in one process."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def _digest(tensors: Iterable[torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def same_on_all_ranks(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise :class:`DistributedMismatchError` unless every rank holds bit-identical ``tensors``."""
    if not enabled():
        return
    dist = _dist()
    mine = torch.frombuffer(bytearray(_digest(tensors)), dtype=torch.uint8)
    buf = _comm_tensor(mine)  # on the GPU under nccl: the gathered tensors must be there too
    gathered = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, buf)
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g.cpu(), mine)]
    if differ:
        raise DistributedMismatchError(
            f"rank {rank()}: {what} differ from ranks {differ}. Every rank must run the same "
            "compile() call with the same model, method, options and seed; a custom trainer must "
            "keep parameters in sync (wrap the model in DistributedDataParallel)."
        )


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum numbers over ranks (identity in a single process)."""
    if not enabled():
        return values
    t = _comm_tensor(torch.tensor(values, dtype=torch.float64, device=device))
    _dist().all_reduce(t)
    return [float(v) for v in t.cpu()]


def unwrap(model: Any) -> Any:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)
