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


# -- bit-exact resume whatever the loader; checkpoints inside single-run methods ------------------
def _outputs(out: Path, suffix: str = "", rank: int = 0):
    return (
        torch.load(out / f"masks{suffix}-rank{rank}.pt"),
        torch.load(out / f"weights{suffix}-rank{rank}.pt"),
        json.loads((out / f"history{suffix}-rank{rank}.json").read_text()),
    )


def assert_resumed_exactly(out: Path, rank: int = 0) -> dict:
    """The resumed run (masks, final weights, history, diagnostics) is bit-identical to the
    uninterrupted reference the killed process ran first, and it resumed rather than redid."""
    ref_masks, ref_weights, ref = _outputs(out, "-ref", rank)
    masks, weights, got = _outputs(out, "", rank)
    assert_same_masks(ref_masks, masks)
    assert_same_masks(ref_weights, weights)
    assert got["history"] == ref["history"]
    assert got["diagnostics"] == {**ref["diagnostics"], "resume_exact": True}
    assert 0 < got["steps"] < ref["steps"], (got["steps"], ref["steps"])
    return got


# (method, loader, checkpoint_every, kill step): every standard way to build the data side, each
# with another method so that every single-run method is killed and resumed once as well
RESUME_CASES = [
    ("mimp", "dl-generator", None, 70),  # DataLoader(shuffle=True, generator=g), rounds
    ("iee", "dl-global", 7, 118),  # order from the global RNG; resumes inside exploration
    ("rigl", "random-sampler", 25, 137),  # RandomSampler(generator=g); between updates
    ("set", "subset-sampler", 25, 137),  # SubsetRandomSampler(generator=g)
    ("static", "distributed-sampler", 25, 137),  # DistributedSampler: seed + epoch
    ("lbc", "workers", 25, 137),  # num_workers=2, noise drawn in the workers
    ("sr-ste", "tensor", 25, 137),  # nmcompile's TensorLoader
    ("ste", "list", 25, 137),  # a plain list of batches
    ("asp", "dl-generator", 7, 112),  # killed while fine-tuning, after the pruning step
    ("eb", "dl-generator", 7, 15),  # early-bird: the mask queue is method state
]


@pytest.mark.parametrize(
    "method,loader,every,kill", RESUME_CASES, ids=[f"{m}-{ld}" for m, ld, _, _ in RESUME_CASES]
)
def test_sigkill_then_resume_is_bit_exact_for_every_loader(tmp_path, method, loader, every, kill):
    ckpt = str(tmp_path / "ckpt")
    base = ["--method", method, "--loader", loader, "--checkpoint-dir", ckpt]
    if every:
        base += ["--checkpoint-every", str(every)]
    run_worker(tmp_path, *base, "--reference-first", "--kill-at-step", str(kill), expect_kill=True)
    assert not (tmp_path / "masks-rank0.pt").exists()
    proc = run_worker(tmp_path, *base, "--resume")
    assert "not be bit-exact" not in proc.stderr
    got = assert_resumed_exactly(tmp_path)
    if every:  # resumed from the newest step checkpoint before the kill
        assert got["resumed_from"] == ((kill - 1) // every) * every


def test_torn_step_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """SIGKILL half-way through the atomic writer's temp file of IEE's 4th step checkpoint: the
    temp file is removed, the 3rd checkpoint resumed, the result bit-identical."""
    ckpt = tmp_path / "ckpt"
    base = ["--method", "iee", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20"]
    run_worker(
        tmp_path, *base, "--reference-first", "--kill-in-atomic-write", "4", expect_kill=True
    )
    assert any(p.name.endswith(".tmp") for p in ckpt.iterdir())
    run_worker(tmp_path, *base, "--resume")
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert assert_resumed_exactly(tmp_path)["resumed_from"] == 60


def test_ddp_rank_killed_inside_a_single_run_method_resumes_bit_exact(tmp_path):
    """torchrun, 2 gloo ranks, IEE over a DataLoader with its own generator (re-sharded through
    a DistributedSampler): rank 1 alone is SIGKILLed mid-run; the resumed job ends on both ranks
    bit-identical to the uninterrupted 2-rank run. The same checkpoint resumed in one process
    runs, but says it is not bit-exact."""
    ckpt = tmp_path / "ckpt"
    base = ["--method", "iee", "--loader", "dl-generator", "--batch-size", "32"]
    base += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "25"]
    run_worker(
        tmp_path, *base, "--reference-first", "--kill-at-step", "118", "--kill-rank", "1",
        nproc=2, expect_kill=True,
    )  # fmt: skip
    import shutil

    shutil.copytree(ckpt, tmp_path / "ckpt-copy")
    run_worker(tmp_path, *base, "--resume", nproc=2)
    for rank in (0, 1):
        assert assert_resumed_exactly(tmp_path, rank)["resumed_from"] == 100
    one = tmp_path / "one"
    args = [a if a != str(ckpt) else str(tmp_path / "ckpt-copy") for a in base]
    proc = run_worker(one, *args, "--resume")
    assert "2 process(es), this one runs on 1" in proc.stderr
    diag = json.loads((one / "history-rank0.json").read_text())["diagnostics"]
    assert diag["resume_exact"] is False
    assert "2 process(es)" in diag["resume_inexact_reason"]


def _checkpointed_static_run(folder: Path, train_loader, trainer=None, **options):
    import nmcompile
    from nmcompile import data, zoo

    ds = data.load("digits")
    if trainer is None:
        trainer = nmcompile.SupervisedTrainer(train_loader, None, lr=0.05, progress=False)
    torch.manual_seed(0)
    model = zoo.create("mlp", in_channels=1, image_size=8)
    options = {"total_iterations": 3, "checkpoint_dir": str(folder), **options}
    return nmcompile.compile(
        model, "static", "2:4", example_inputs=(ds.example_input(2),), trainer=trainer,
        prune_stem=True, **options,
    )  # fmt: skip


def _digits_dataset():
    from torch.utils.data import TensorDataset

    from nmcompile import data

    ds = data.load("digits")
    return TensorDataset(ds.train.x, ds.train.y)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        yield from (self.ds[i] for i in torch.randperm(len(self.ds)).tolist())


class _EveryOther(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n, self.calls = n, 0

    def __len__(self):
        return self.n // 2

    def __iter__(self):
        self.calls += 1  # hidden state: which half this pass visits
        return iter(range(self.calls % 2, self.n, 2))


def _inexact_loaders():
    from torch.utils.data import DataLoader

    ds = _digits_dataset()
    return {
        "IterableDataset": DataLoader(_Stream(ds), batch_size=64),
        "_EveryOther": DataLoader(ds, batch_size=64, sampler=_EveryOther(len(ds))),
        "persistent_workers": DataLoader(
            ds, batch_size=64, shuffle=True, num_workers=1, persistent_workers=True
        ),
        "can be walked once": iter(DataLoader(ds, batch_size=64, shuffle=True)),
    }


@pytest.mark.parametrize(
    "why", ["IterableDataset", "_EveryOther", "persistent_workers", "can be walked once"]
)
def test_a_loader_that_cannot_resume_exactly_is_named_at_the_start(tmp_path, why):
    from nmcompile import NMCompileWarning

    loader = _inexact_loaders()[why]
    with pytest.warns(NMCompileWarning, match=f"will not be bit-exact: .*{why}"):
        result = _checkpointed_static_run(tmp_path / "ck", loader)
    assert result.diagnostics["resume_exact"] is False
    assert why in result.diagnostics["resume_inexact_reason"]


def test_a_trainer_without_state_is_named_and_exact_loaders_are_silent(tmp_path):
    import warnings

    from torch.utils.data import DataLoader

    from nmcompile import NMCompileWarning, SupervisedTrainer

    class Bare:  # the Trainer protocol and nothing more
        def __init__(self, loader):
            self.inner = SupervisedTrainer(loader, None, lr=0.05, progress=False)

        def train(self, model, iterations, on_step=None):
            self.inner.train(model, iterations, on_step)

        def evaluate(self, model):
            return None

    loader = DataLoader(_digits_dataset(), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    with pytest.warns(NMCompileWarning, match=r"Bare\) has no state_dict"):
        r = _checkpointed_static_run(tmp_path / "a", None, trainer=Bare(loader))
    assert r.diagnostics["resume_exact"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", NMCompileWarning)
        r = _checkpointed_static_run(tmp_path / "b", loader)
    assert r.diagnostics["resume_exact"] is True
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-0003.json", "step-0003.pt"]


def test_step_checkpoint_options_are_checked(tmp_path):
    import nmcompile
    from nmcompile import ConfigError
    from nmcompile._methods.learned import LBCConfig

    with pytest.raises(ConfigError, match="checkpoint_every must be >= 1"):
        LBCConfig(checkpoint_dir="x", checkpoint_every=0)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        LBCConfig(resume=True)
    with pytest.raises(ConfigError, match="not supported with latency_budget"):
        nmcompile.get_method("iee").config_cls(latency_budget=0.5, checkpoint_dir="x")
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    _checkpointed_static_run(tmp_path / "ck", loader)
    with pytest.raises(ConfigError, match="already holds the checkpoints of a run"):
        _checkpointed_static_run(tmp_path / "ck", loader)
    with pytest.raises(ConfigError, match="total_iterations"):
        _checkpointed_static_run(tmp_path / "ck", loader, total_iterations=4, resume=True)
    # checkpoint_every is run control: a resume may change it
    r = _checkpointed_static_run(tmp_path / "ck", loader, checkpoint_every=1, resume=True)
    assert r.diagnostics["resumed_from_iteration"] == 3
