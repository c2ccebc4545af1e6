"""Reliability: torchrun/DDP, SIGKILLed runs that resume, torn checkpoints.

Every run here is a real process (``tests/workers/digits_run.py``) training on digits; the faults
are real SIGKILLs, so nothing gets a chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "digits_run.py"
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_worker(out: Path, *args: str, nproc: int = 1, expect_kill: bool = False):
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--max_restarts=0",
            str(WORKER),
            str(out),
            *args,
        ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    if expect_kill:
        assert proc.returncode != 0, "the injected SIGKILL did not happen"
        if nproc == 1:
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def masks(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"masks-rank{rank}.pt")


def history(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"history-rank{rank}.json").read_text())


def assert_same_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: {(a[k] != b[k]).sum()} entries differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process run (global batch 64)."""
    out = tmp_path_factory.mktemp("reference")
    run_worker(out, "--batch-size", "64", "--checkpoint-dir", str(out / "ckpt"))
    return out


def test_ddp_two_ranks_match_each_other_and_one_process(reference, tmp_path):
    """torchrun, 2 CPU ranks (gloo), batch 32 each == 1 process, batch 64: same masks on both
    ranks, same masks, accuracies and FLOPs as the single process; only rank 0 checkpoints."""
    ckpt = tmp_path / "ckpt"
    run_worker(tmp_path, "--batch-size", "32", "--checkpoint-dir", str(ckpt), nproc=2)
    assert history(tmp_path, 0)["world"] == 2
    assert_same_masks(masks(tmp_path, 0), masks(tmp_path, 1))
    assert_same_masks(masks(tmp_path, 0), masks(reference))
    single, ddp = history(reference)["history"], history(tmp_path, 0)["history"]
    assert len(single) == len(ddp) > 5
    for s, d in zip(single, ddp):
        assert d["accuracy"] == s["accuracy"] and d["samples"] == s["samples"]
        assert d["train_flops"] == pytest.approx(s["train_flops"], rel=1e-9)
    assert history(tmp_path, 1)["history"] == ddp
    # rank 0 alone wrote checkpoints: one payload + one checksum file per kept round, no temps,
    # and every sidecar names rank 0 as its writer
    names = sorted(p.name for p in ckpt.iterdir())
    assert names and all(n.startswith("round-") for n in names), names
    sidecars = [json.loads((ckpt / n).read_text()) for n in names if n.endswith(".json")]
    assert len([n for n in names if n.endswith(".pt")]) == len(sidecars)
    assert {s["written_by_rank"] for s in sidecars} == {0}


@pytest.mark.parametrize("method", ["rigl", "iee", "lbc"])
def test_ddp_prune_grow_and_learned_masks_stay_identical_across_ranks(tmp_path, method):
    """Methods that decide from a batch (RigL's dense gradient) or whose mask parameters can drop
    out of the graph (LBC) still end with one mask on every rank (verified every round too)."""
    run_worker(tmp_path, "--batch-size", "32", "--method", method, nproc=2)
    assert_same_masks(masks(tmp_path, 0), masks(tmp_path, 1))
    for m in masks(tmp_path, 0).values():  # and the masks are real 2:4 / 80% masks
        assert 0.15 < float(m.float().mean()) <= 0.5


def test_ddp_rank_killed_mid_round_resumes_to_the_same_masks(reference, tmp_path):
    """Rank 1 alone is SIGKILLed; torchrun tears the job down; the resumed job continues."""
    ckpt = str(tmp_path / "ckpt")
    run_worker(
        tmp_path, "--batch-size", "32", "--checkpoint-dir", ckpt, "--kill-at-step", "130",
        "--kill-rank", "1", nproc=2, expect_kill=True,
    )  # fmt: skip
    assert not (tmp_path / "masks-rank0.pt").exists()
    run_worker(tmp_path, "--batch-size", "32", "--checkpoint-dir", ckpt, "--resume", nproc=2)
    assert_same_masks(masks(tmp_path, 0), masks(reference))
    assert_same_masks(masks(tmp_path, 1), masks(reference))
    assert history(tmp_path, 0)["steps"] < history(reference)["steps"]  # resumed, not redone


@pytest.mark.parametrize(
    "fault",
    [
        ("--kill-at-step", "95"),  # in the middle of round 4's training
        ("--kill-at-step", "21"),  # one step into round 1, before anything was pruned
        ("--kill-in-checkpoint", "3"),  # a torn payload (what a non-atomic writer leaves)
        ("--kill-before-sidecar", "5"),  # payload landed, checksum file never written
        ("--kill-in-atomic-write", "4"),  # the real writer's temp file half-written
    ],
    ids=["mid-round", "first-round", "torn-payload", "no-checksum-file", "in-atomic-write"],
)
def test_sigkill_then_resume_gives_the_uninterrupted_masks(reference, tmp_path, fault):
    ckpt = tmp_path / "ckpt"
    base = ("--batch-size", "64", "--checkpoint-dir", str(ckpt))
    run_worker(tmp_path, *base, *fault, expect_kill=True)
    assert not (tmp_path / "masks-rank0.pt").exists()
    leftovers = sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []
    if fault[0] == "--kill-in-atomic-write":
        assert any(n.endswith(".tmp") for n in leftovers), leftovers
    proc = run_worker(tmp_path, *base, "--resume")
    if fault[0] in ("--kill-in-checkpoint", "--kill-before-sidecar"):
        # the torn round has no checksum file yet: refused for that, and set aside
        assert "its metadata file is missing" in proc.stderr, (leftovers, proc.stderr[-2000:])
        assert any(p.name.endswith(".unusable") for p in ckpt.iterdir())
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert_same_masks(masks(tmp_path), masks(reference))
    assert history(tmp_path)["history"] == history(reference)["history"]
    # it resumed: fewer optimizer steps than the uninterrupted run
    assert 0 < history(tmp_path)["steps"] < history(reference)["steps"]


def test_corrupt_checkpoints_everywhere_start_over_cleanly(reference, tmp_path):
    """Every checkpoint unusable (flipped bytes): a warning per file, then a fresh run that ends
    with the reference masks. Nothing is loaded from a file whose checksum fails."""
    ckpt = tmp_path / "ckpt"
    base = ("--batch-size", "64", "--checkpoint-dir", str(ckpt))
    run_worker(tmp_path, *base, "--kill-at-step", "70", expect_kill=True)
    pts = sorted(ckpt.glob("round-*.pt"))
    assert pts
    for p in pts:
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))
    proc = run_worker(tmp_path, *base, "--resume")
    assert proc.stderr.count("checksum does not match") == len(pts)
    assert_same_masks(masks(tmp_path), masks(reference))


def test_dataloader_is_resharded_with_a_distributed_sampler():
    """A plain DataLoader becomes this rank's DistributedSampler share; epochs advance."""
    from torch.utils.data import DataLoader, TensorDataset

    from nmcompile._trainer import _shard

    ds = TensorDataset(torch.arange(20).float().unsqueeze(1), torch.arange(20))
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    shards = [_shard(loader, 2, r, "train_loader") for r in (0, 1)]
    epoch0 = [torch.cat([y for _, y in s]) for s in shards]
    assert len(epoch0[0]) == len(epoch0[1]) == 10
    assert sorted(torch.cat(epoch0).tolist()) == list(range(20))  # disjoint, complete
    epoch1 = torch.cat([y for _, y in shards[0]])
    assert not torch.equal(epoch1, epoch0[0])  # a new shuffle after a full pass
    assert shards[0].state_dict() == {"epoch": 2}
    assert len(shards[0]) == 3
    # a loader that already shards is left alone
    assert _shard(shards[0].loader, 2, 0, "train_loader") is shards[0].loader
