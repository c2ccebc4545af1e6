"""What a step checkpoint costs inside a single-run method, and what resuming from it costs.

A real ``compile`` run (``static`` 2:4 sparse training, SGD with momentum, random data of the
model's input size) with ``checkpoint_every=K`` and a checkpoint after the last step. Every
``save_round`` call is timed (gathering the state, serialising, writing, fsync, rename, checksum
sidecar), next to the median optimizer step of the same run; then the run is resumed from its
last checkpoint and the time to load it and reach the end is reported. ``overhead_at_default`` is
one checkpoint's time over 1000 steps (the default ``checkpoint_every``).

    python benchmarks/checkpoint_cost.py       # writes benchmarks/results/checkpoint_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import nmcompile
from nmcompile import _checkpoint, zoo
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"


def _model(name: str):
    import torchvision

    if name == "resnet20":
        return zoo.create("resnet20", num_classes=10), (3, 32, 32), 64
    return getattr(torchvision.models, name)(), (3, 224, 224), 8


def measure(name: str, iterations: int, every: int) -> dict:
    torch.manual_seed(0)
    model, shape, batch = _model(name)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(4)]  # fmt: skip
    saves: list[float] = []
    real = _checkpoint.save_round

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        path = real(*args, **kwargs)
        saves.append(time.perf_counter() - t0)
        return path

    steps: list[float] = []
    last = [time.perf_counter()]

    class Timing(nmcompile.SupervisedTrainer):
        def train(self, model, n, on_step=None):
            def hook(info):
                now = time.perf_counter()
                steps.append(now - last[0])
                stop = on_step(info) if on_step else None
                last[0] = time.perf_counter()
                return stop

            last[0] = time.perf_counter()
            return super().train(model, n, hook)

    _checkpoint.save_round = timed
    try:
        with tempfile.TemporaryDirectory() as folder:
            kw = dict(total_iterations=iterations, checkpoint_dir=folder, checkpoint_every=every)
            example = (data[0][0][:1],)
            trainer = Timing(data, None, lr=0.01, progress=False)
            nmcompile.compile(model, "static", "2:4", example_inputs=example, trainer=trainer, **kw)
            size = max(p.stat().st_size for p in Path(folder).glob("step-*.pt"))
            torch.manual_seed(0)
            model2, _, _ = _model(name)
            t0 = time.perf_counter()
            trainer2 = Timing(data, None, lr=0.01, progress=False)
            nmcompile.compile(
                model2, "static", "2:4", example_inputs=example, trainer=trainer2, resume=True, **kw
            )
            resume_s = time.perf_counter() - t0
    finally:
        _checkpoint.save_round = real
    save_s = statistics.median(saves)
    step_s = statistics.median(steps)
    return {
        "model": name,
        "batch": batch,
        "checkpoint_mb": size / 2**20,
        "checkpoints": len(saves),
        "save_s_median": save_s,
        "step_s_median": step_s,
        "save_in_steps": save_s / step_s,
        "overhead_at_default": save_s / (1000 * step_s),
        "resume_finished_run_s": resume_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet18", "resnet50"])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "checkpoint_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in args.models:
        row = measure(name, args.iterations, args.every)
        rows.append(row)
        print(
            f"{name:9s} checkpoint {row['checkpoint_mb']:7.1f} MB  save {row['save_s_median']:.3f} s"
            f" = {row['save_in_steps']:.2f} steps (step {row['step_s_median']:.3f} s, batch "
            f"{row['batch']})  overhead at every=1000: {100 * row['overhead_at_default']:.3f}%  "
            f"resume of a finished run: {row['resume_finished_run_s']:.2f} s",
            flush=True,
        )
    args.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
