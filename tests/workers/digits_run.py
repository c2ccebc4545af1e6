"""A compile() run on digits, launched as its own process by the reliability tests.

Single process:  python tests/workers/digits_run.py OUT --batch-size 64
Two ranks:       torchrun --nproc_per_node=2 tests/workers/digits_run.py OUT --batch-size 32
Fault injection: --kill-at-step N (SIGKILL itself after N optimizer steps of the whole run;
                 with --kill-rank R only rank R dies) or --kill-in-checkpoint N (SIGKILL itself
                 half-way through writing checkpoint N, as a non-atomic writer would leave it) or
                 --kill-in-atomic-write N (half-way through the real atomic writer's temp file)
                 or --kill-before-sidecar N (after checkpoint N's payload landed, before its
                 checksum file).

Writes OUT/masks-rank<r>.pt and OUT/history-rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch

import nmcompile
from nmcompile import data, zoo
from nmcompile.data import TensorLoader


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingTrainer(nmcompile.SupervisedTrainer):
    """A real trainer whose process is SIGKILLed after ``kill_at`` optimizer steps."""

    def __init__(self, *args, kill_at: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at
        self.steps = 0

    def train(self, model, iterations, on_step=None):
        def hook(info):
            self.steps += 1
            if self.kill_at is not None and self.steps == self.kill_at:
                _die()
            return on_step(info) if on_step is not None else None

        return super().train(model, iterations, hook)


def _kill_while_writing_checkpoint(n: int) -> None:
    """Make the n-th checkpoint payload write stop half-way and kill the process: a torn file."""
    from nmcompile import _checkpoint

    real = _checkpoint.save_round
    calls = {"n": 0}

    def torn_save(folder, round_index, state, meta, *, keep=2, stem="round"):
        calls["n"] += 1
        if calls["n"] != n:
            return real(folder, round_index, state, meta, keep=keep, stem=stem)
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getvalue()
        path = Path(folder) / f"{stem}-{round_index:04d}.pt"
        with open(path, "wb") as fh:  # what a non-atomic writer would leave behind
            fh.write(payload[: len(payload) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        _die()

    _checkpoint.save_round = torn_save
    import nmcompile._rounds as rounds

    rounds.save_round = torn_save


def _kill_inside_atomic_write(n: int) -> None:
    """SIGKILL half-way through the n-th payload write of the real atomic writer: the temp file
    it leaves must be cleaned up and never read."""
    import contextlib

    from nmcompile import _checkpoint

    real = _checkpoint.atomic_path
    calls = {"n": 0}

    class HalfWriter:
        def __init__(self, path: Path) -> None:
            self.path = path

        def write_bytes(self, payload: bytes) -> None:
            with open(self.path, "wb") as fh:
                fh.write(payload[: len(payload) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()

    @contextlib.contextmanager
    def dying_atomic_path(dest, **kw):
        calls["n"] += 1
        with real(dest, **kw) as tmp:
            yield HalfWriter(tmp) if calls["n"] == n else tmp

    _checkpoint.atomic_path = dying_atomic_path


def _kill_before_sidecar(n: int) -> None:
    """Kill the process after the n-th checkpoint payload landed but before its checksum file."""
    from nmcompile import _checkpoint

    real = _checkpoint.atomic_write_json
    calls = {"n": 0}

    def dying_write(path, obj, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            _die()
        return real(path, obj, *a, **kw)

    _checkpoint.atomic_write_json = dying_write


class NoisyDigits(torch.utils.data.Dataset):
    """digits as a map-style dataset with a random augmentation (noise drawn per sample from the
    RNG of whichever process loads it: the main one, or a DataLoader worker seeded by it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        return x + 0.05 * torch.randn_like(x), self.y[i]


LOADERS = (
    "tensor",  # nmcompile.data.TensorLoader
    "dl-generator",  # DataLoader(shuffle=True, generator=g): PyTorch's reproducibility recipe
    "dl-global",  # DataLoader(shuffle=True): order from the global RNG
    "random-sampler",  # DataLoader(sampler=RandomSampler(ds, generator=g))
    "subset-sampler",  # DataLoader(sampler=SubsetRandomSampler(indices, generator=g))
    "distributed-sampler",  # DataLoader(sampler=DistributedSampler(ds, 1, 0, seed=7))
    "workers",  # DataLoader(shuffle=True, generator=g, num_workers=2): worker seeding
    "list",  # a plain list of (x, y) batches
)


def make_loader(kind: str, ds, batch_size: int, seed: int):
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        RandomSampler,
        SubsetRandomSampler,
    )

    x, y = ds.train.transform(ds.train.x) if ds.train.transform else ds.train.x, ds.train.y
    if kind == "tensor":
        # drop_last: the global batches of one process with batch 2B are exactly the union of
        # two ranks' batches of B (TensorLoader shards an epoch as perm[rank::world])
        return TensorLoader(
            ds.train.x, ds.train.y, batch_size, shuffle=True, seed=seed, drop_last=True,
            transform=ds.train.transform,
        )  # fmt: skip
    if kind == "list":
        return [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)
        ]
    data = NoisyDigits(x, y)
    g = torch.Generator().manual_seed(seed + 11)
    common = {"batch_size": batch_size, "drop_last": True}
    if kind == "dl-generator":
        return DataLoader(data, shuffle=True, generator=g, **common)
    if kind == "dl-global":
        return DataLoader(data, shuffle=True, **common)
    if kind == "random-sampler":
        return DataLoader(data, sampler=RandomSampler(data, generator=g), **common)
    if kind == "subset-sampler":
        subset = list(range(0, len(y), 2)) + list(range(1, len(y), 4))
        return DataLoader(data, sampler=SubsetRandomSampler(subset, generator=g), **common)
    if kind == "distributed-sampler":
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
        return DataLoader(data, sampler=sampler, **common)
    if kind == "workers":
        return DataLoader(data, shuffle=True, generator=g, num_workers=2, **common)
    raise SystemExit(f"unknown loader {kind}")


def run(args, out: Path, *, checkpoint_dir, resume, kill_at, suffix: str = "") -> None:
    ds = data.load("digits", batch_size=args.batch_size, seed=args.seed)
    train = make_loader(args.loader, ds, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    model = zoo.create(args.model, in_channels=1, image_size=8)
    trainer = KillingTrainer(
        train, ds.val, lr=0.05, weight_decay=0.0, progress=False, kill_at=kill_at
    )
    from nmcompile._registry import get_method

    fields = get_method(args.method).config_cls.options()
    options = {}
    if "iterations_per_round" in fields:  # the round engine (and early-bird's dense round)
        options.update(iterations_per_round=args.iterations)
    elif "total_iterations" in fields:  # prune-grow and learned masks
        options.update(total_iterations=10 * args.iterations)
        if "update_period" in fields:
            options.update(update_period=(10, 10, 10))
        elif "update_interval" in fields:
            options.update(update_interval=20)
    elif "finetune_iterations" in fields:
        options.update(pretrain_iterations=5 * args.iterations, finetune_iterations=args.iterations)
    if "target_sparsity" in fields and "iterations_per_round" not in fields:
        options.update(target_sparsity=0.8)
    if "checkpoint_every" in fields and args.checkpoint_every:
        options.update(checkpoint_every=args.checkpoint_every)
    options.update(checkpoint_dir=checkpoint_dir, resume=resume)
    result = nmcompile.compile(
        model,
        args.method,
        "2:4",
        example_inputs=(ds.example_input(2),),
        trainer=trainer,
        seed=args.seed,
        prune_stem=True,
        **options,
    )
    from nmcompile import _dist

    r = _dist.rank()
    torch.save(result.masks, out / f"masks{suffix}-rank{r}.pt")
    torch.save(result.module.state_dict(), out / f"weights{suffix}-rank{r}.pt")
    hist = [{k: v for k, v in h.items() if k != "wall_s"} for h in result.history]
    diag = {k: v for k, v in result.diagnostics.items() if k not in ("resumed_from_iteration",)}
    # steps: optimizer steps this process ran (a resumed run must run fewer than a fresh one)
    (out / f"history{suffix}-rank{r}.json").write_text(
        json.dumps(
            {
                "world": _dist.world_size(),
                "history": hist,
                "steps": trainer.steps,
                "diagnostics": json.loads(json.dumps(diag, default=repr)),
                "resumed_from": result.diagnostics.get("resumed_from_iteration"),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--method", default="mimp")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--loader", default="tensor", choices=LOADERS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--reference-first",
        action="store_true",
        help="first run uninterrupted without checkpoints (outputs *-ref-*), then the run asked",
    )
    ap.add_argument("--kill-at-step", type=int, default=None)
    ap.add_argument("--kill-in-checkpoint", type=int, default=None)
    ap.add_argument("--kill-before-sidecar", type=int, default=None)
    ap.add_argument("--kill-in-atomic-write", type=int, default=None)
    ap.add_argument("--kill-rank", type=int, default=None, help="only this rank dies (torchrun)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.kill_in_checkpoint is not None:
        _kill_while_writing_checkpoint(args.kill_in_checkpoint)
    if args.kill_in_atomic_write is not None:
        _kill_inside_atomic_write(args.kill_in_atomic_write)
    if args.kill_before_sidecar is not None:
        _kill_before_sidecar(args.kill_before_sidecar)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reference_first:
        run(args, out, checkpoint_dir=None, resume=False, kill_at=None, suffix="-ref")
    my_rank = int(os.environ.get("RANK", "0"))
    kill_at = args.kill_at_step if args.kill_rank in (None, my_rank) else None
    run(args, out, checkpoint_dir=args.checkpoint_dir, resume=args.resume, kill_at=kill_at)


if __name__ == "__main__":
    main()
