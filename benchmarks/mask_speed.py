"""N:M mask throughput: nmcompile's ``nm_mask`` vs torch.ao's ``WeightNormSparsifier``.

Both compute the magnitude N:M mask of the same weights (groups of m consecutive input channels /
features) in one process. Throughput is fp32 weight bytes per second, median of ``--repeat`` runs.
Weights: every conv of torchvision resnet50 (one tensor set, 23.5 M weights) and a 4096x4096 linear.
torch.ao gets each conv weight pre-permuted to ``[K*R*S, C]`` (untimed) so its (1, m) blocks are the
same input-channel groups; nmcompile works on the ``[K, C, R, S]`` layout directly.

    python benchmarks/mask_speed.py            # writes benchmarks/results/mask_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from nmcompile import NMPattern, nm_mask
from nmcompile._machine import machine_info

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _weights() -> dict[str, list[torch.Tensor]]:
    import torchvision

    torch.manual_seed(0)
    r50 = torchvision.models.resnet50()
    convs = [
        m.weight.detach().clone()
        for m in r50.modules()
        if isinstance(m, nn.Conv2d) and m.in_channels % 32 == 0
    ]
    return {"resnet50 convs": convs, "linear 4096x4096": [torch.randn(4096, 4096)]}


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    """[K, C, R, S] -> [K*R*S, C]: the same input-channel groups as rows of a linear weight."""
    return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.dim() == 4 else w


def _ao_sparsifier(weights_2d: list[torch.Tensor], pattern: NMPattern):
    from torch.ao.pruning import WeightNormSparsifier

    model = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights_2d)
    with torch.no_grad():
        for lin, w in zip(model, weights_2d):
            lin.weight.copy_(w)
    sp = WeightNormSparsifier(
        sparsity_level=1.0, sparse_block_shape=(1, pattern.m), zeros_per_block=pattern.m - pattern.n
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp.prepare(model, config=[{"tensor_fqn": f"{i}.weight"} for i in range(len(model))])
    masks = [lin.parametrizations.weight[0] for lin in model]
    return sp, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--patterns", default="2:4,1:4,2:8,4:16,8:32")
    ap.add_argument("--out", default=str(RESULTS / "mask_speed.json"))
    args = ap.parse_args()

    rows = []
    for set_name, weights in _weights().items():
        nbytes = sum(w.numel() * 4 for w in weights)
        as_2d = [_as_2d(w).contiguous() for w in weights]
        for spec in args.patterns.split(","):
            p = NMPattern.parse(spec)
            ours = _median_time(
                lambda p=p, ws=weights: [nm_mask(w, p, transform=torch.abs) for w in ws],
                args.repeat,
            )
            sp, ao_masks = _ao_sparsifier(as_2d, p)
            theirs = _median_time(sp.step, max(1, args.repeat // 2))
            # Fraction of mask entries on which the two agree. torch.ao ranks by w**2, so two
            # weights whose squares round to the same fp32 value tie there and may split
            # differently (about 1 in 10^7 entries); nmcompile ranks by |w| exactly.
            same = sum(
                int((_as_2d(nm_mask(w, p, transform=torch.abs)) == m.mask.bool()).sum())
                for w, m in zip(weights, ao_masks)
            )
            agree = same / sum(w.numel() for w in weights)
            row = {
                "weights": set_name,
                "pattern": str(p),
                "bytes": nbytes,
                "nmcompile_s": ours,
                "nmcompile_gb_s": nbytes / ours / 1e9,
                "torch_ao_s": theirs,
                "torch_ao_gb_s": nbytes / theirs / 1e9,
                "speedup": theirs / ours,
                "mask_agreement": agree,
            }
            rows.append(row)
            print(
                f"{set_name:18s} {p!s:5s} nmcompile {row['nmcompile_gb_s']:6.2f} GB/s   "
                f"torch.ao {row['torch_ao_gb_s']:6.3f} GB/s   ratio {row['speedup']:5.1f}x   "
                f"agreement {agree:.7f}",
                flush=True,
            )
    out = {"machine": machine_info(), "repeat": args.repeat, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
