"""Block-sparse layers vs dense: regrouped linear / conv as dense GEMMs over their blocks.

A regrouped layer keeps a few dense blocks ``W[rows_b][:, cols_b]`` with disjoint row sets
(``passes/regroup.py``); ``runtime/block_sparse.py`` computes it as one GEMM per block (``loop``)
or one padded batched GEMM (``batched``). Here the blocks are laid out as the paper's group-wise
sparsity: ``--parts`` row groups, each reading a random ``--density`` of the columns, so the layer
holds ``density`` of its weights (75% group-wise sparsity at the default 0.25). Timed against the
dense layer on the same inputs, interleaved, after checking the block-sparse output against the
masked dense one.

    python benchmarks/block_sparse_speed.py                   # CPU, 2 cores: small shapes
    python benchmarks/block_sparse_speed.py --device cuda     # H100 / H200: large layers, fp16

Writes benchmarks/results/block_sparse_<device>.json (or --out) and a Markdown table beside it;
the JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
_SAMPLE_MS = 1.0


def _blocks(out: int, k: int, parts: int, density: float, gen: torch.Generator):
    """``parts`` disjoint row groups, each with its own random ``density`` of the columns."""
    rows = torch.randperm(out, generator=gen).chunk(parts)
    n_cols = max(1, round(density * k))
    return [
        (r.sort().values, torch.randperm(k, generator=gen)[:n_cols].sort().values) for r in rows
    ]


def _mask(out: int, k: int, blocks) -> torch.Tensor:
    m = torch.zeros(out, k, dtype=torch.bool)
    for r, c in blocks:
        m[r[:, None], c[None, :]] = True
    return m


def _time(fns: dict, args, cuda: bool) -> dict[str, dict]:
    from nmcompile.runtime.latency import time_adaptive, time_interleaved

    if not cuda:  # CPU calls here last milliseconds: one per sample
        stats = time_interleaved(fns, warmup=args.warmup, repeat=args.repeat)
    else:
        stats, _ = time_adaptive(fns, warmup=args.warmup, repeat=args.repeat, cuda_events=True)
    return {n: s.to_json() for n, s in stats.items()}


def _row(kind: str, shape: str, layer: nn.Module, blocks, x: torch.Tensor, args) -> dict:
    from nmcompile.runtime.block_sparse import BlockSparseConv2d, BlockSparseLinear

    cuda = x.is_cuda
    w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    mask = _mask(*w2d.shape, blocks).to(w2d.device)
    with torch.no_grad():
        layer.weight.mul_(mask.reshape(layer.weight.shape).to(layer.weight.dtype))
    cls = BlockSparseLinear if kind == "linear" else BlockSparseConv2d
    cands = {"dense": layer}
    for mode in args.modes.split(","):
        cands[f"block-{mode}"] = cls(layer, blocks, mode=mode).to(x.device, x.dtype)
    with torch.inference_mode():
        ref = layer(x).float()
        errs = {
            n: float((m(x).float() - ref).norm() / ref.norm().clamp_min(1e-12))
            for n, m in cands.items()
            if n != "dense"
        }
        st = _time({n: (lambda m=m: m(x)) for n, m in cands.items()}, args, cuda)
    d = st["dense"]["median_ms"]
    row = {
        "kind": kind,
        "shape": shape,
        "dtype": str(x.dtype).removeprefix("torch."),
        "density": float(mask.float().mean()),
        "blocks": len(blocks),
        "dense_ms": d,
        **{f"{n}_ms": s["median_ms"] for n, s in st.items() if n != "dense"},
        **{f"{n}_speedup": d / s["median_ms"] for n, s in st.items() if n != "dense"},
        "rel_err": errs,
        "stats": st,
    }
    best = max((k for k in row if k.endswith("_speedup")), key=lambda k: row[k])
    print(
        f"{kind} {shape} {row['dtype']} density {row['density']:.2f}: dense {d:.3f} ms, "
        + ", ".join(f"{n} {s['median_ms']:.3f} ms" for n, s in st.items() if n != "dense")
        + f" (best {row[best]:.2f}x)",
        flush=True,
    )
    return row


def markdown(rows: list[dict], device: str) -> str:
    modes = sorted({k.removesuffix("_speedup") for r in rows for k in r if k.endswith("_speedup")})
    head = "| layer | shape | dtype | density | dense ms | " + " | ".join(
        f"{m} ms (speedup)" for m in modes
    )
    lines = [f"Device: {device}", "", head + " |", "|---" * (5 + len(modes)) + "|"]
    for r in rows:
        cells = [
            f"{r[m + '_ms']:.3f} ({r[m + '_speedup']:.2f}x)" if m + "_ms" in r else "-"
            for m in modes
        ]
        lines.append(
            f"| {r['kind']} | {r['shape']} | {r['dtype']} | {r['density']:.2f} | "
            f"{r['dense_ms']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--modes", default="loop,batched")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    args.repeat = args.repeat or (50 if cuda else 15)
    dtype = torch.float16 if cuda else torch.float32
    if cuda:  # large layers: where the paper's custom kernels reach their speedups
        linears = [(4096, 4096, 4096), (8192, 8192, 4096), (8192, 8192, 16384)]
        convs = [(512, 512, 3, 28, 32), (256, 256, 3, 56, 32), (1024, 1024, 1, 14, 64)]
    else:  # what 2 cores time in a few minutes
        linears = [(1024, 1024, 256), (2048, 2048, 512), (4096, 4096, 256)]
        convs = [(128, 128, 3, 28, 8), (256, 256, 3, 14, 8), (512, 512, 1, 14, 8)]
    from nmcompile._machine import machine_info

    info = machine_info()
    out = Path(args.out or RESULTS / f"block_sparse_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows: list[dict] = []
    t0 = time.time()
    jobs = [("linear", s) for s in linears] + [("conv", s) for s in convs]
    for kind, s in jobs:
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            print(f"budget reached: {kind} {s} skipped", flush=True)
            continue
        if kind == "linear":
            n_out, n_in, tokens = s
            layer = nn.Linear(n_in, n_out, bias=False).to(args.device, dtype)
            x = torch.randn(tokens, n_in, device=args.device, dtype=dtype)
            blocks = _blocks(n_out, n_in, args.parts, args.density, gen)
            shape = f"{n_out}x{n_in}, {tokens} tokens"
        else:
            c_out, c_in, k, hw, batch = s
            layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False).to(args.device, dtype)
            x = torch.randn(batch, c_in, hw, hw, device=args.device, dtype=dtype)
            blocks = _blocks(c_out, c_in * k * k, args.parts, args.density, gen)
            shape = f"{c_out}x{c_in}x{k}x{k}, {batch}x{hw}x{hw}"
        rows.append(_row(kind, shape, layer, blocks, x, args))
        body = {"machine": info, "args": vars(args), "rows": rows, "seconds": time.time() - t0}
        out.write_text(json.dumps(body, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, info.get("gpu") or info["cpu"]))
        del layer, x
        if cuda:
            torch.cuda.empty_cache()
    print(markdown(rows, info.get("gpu") or info["cpu"]))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
