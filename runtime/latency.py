"""Latency harness: warm-up, interleaved repeats, median / p90 / p99, dense vs sparse in one process.

Dense and sparse candidates are timed in the same process on the same inputs, interleaved
(round-robin, the order rotating each repeat), so drift in clock speed or background load hits
them alike. Each call is timed with ``time.perf_counter_ns`` around a synchronous call; a
``sync`` callable (e.g. ``torch.cuda.synchronize``) is run before reading the clock for
asynchronous devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Captured",
    "LatencyStats",
    "capture_cuda_graph",
    "ort_latency",
    "speedup",
    "time_adaptive",
    "time_interleaved",
]


@dataclass(frozen=True)
class LatencyStats:
    name: str
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _stats(name: str, times_ns: list[int]) -> LatencyStats:
    ms = sorted(t / 1e6 for t in times_ns)
    return LatencyStats(
        name=name,
        median_ms=_percentile(ms, 0.5),
        p90_ms=_percentile(ms, 0.9),
        p99_ms=_percentile(ms, 0.99),
        mean_ms=sum(ms) / len(ms),
        min_ms=ms[0],
        runs=len(ms),
    )


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 10,
    repeat: int = 50,
    sync: Callable[[], None] | None = None,
    cuda_events: bool = False,
    calls_per_sample: int = 1,
) -> dict[str, LatencyStats]:
    """Time each callable ``repeat`` times, interleaved, after ``warmup`` untimed calls each.

    ``cuda_events=True`` times GPU work with CUDA events recorded on the current stream around
    each call (the device's own clock, no host launch jitter in the number).
    ``calls_per_sample``: run each callable that many times back to back per timed sample and
    report the time per call. For GPU work shorter than a kernel launch plus a synchronisation
    (small linears, batch 1), one call per sample times the host; several queue up and time the
    device.
    """
    if repeat < 1 or warmup < 0 or calls_per_sample < 1:
        raise ValueError(
            f"need repeat >= 1, warmup >= 0 and calls_per_sample >= 1, got repeat={repeat}, "
            f"warmup={warmup}, calls_per_sample={calls_per_sample}"
        )
    k_calls = calls_per_sample
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        if sync:
            sync()
    times: dict[str, list[int]] = {n: [] for n in names}
    if cuda_events:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if cuda_events:
                start.record()
                for _ in range(k_calls):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(int(start.elapsed_time(end) * 1e6 / k_calls))
                continue
            if sync:
                sync()
            t0 = time.perf_counter_ns()
            for _ in range(k_calls):
                fn()
            if sync:
                sync()
            times[name].append((time.perf_counter_ns() - t0) // k_calls)
    return {n: _stats(n, times[n]) for n in names}


def time_adaptive(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 10,
    repeat: int = 50,
    sync: Callable[[], None] | None = None,
    cuda_events: bool = False,
    sample_ms: float = 1.0,
    max_calls: int = 100,
) -> tuple[dict[str, LatencyStats], int]:
    """:func:`time_interleaved` with as many calls per sample (up to ``max_calls``) as make the
    shortest candidate's sample last ``sample_ms``, from a 3-sample probe; returns the stats and
    the calls per sample used. For GPU work shorter than a launch plus a synchronisation."""
    probe = time_interleaved(fns, warmup=warmup, repeat=3, sync=sync, cuda_events=cuda_events)
    shortest = min(s.median_ms for s in probe.values())
    k = max(1, min(max_calls, -(-sample_ms // max(shortest, 1e-4))))
    stats = time_interleaved(
        fns, warmup=1, repeat=repeat, sync=sync, cuda_events=cuda_events, calls_per_sample=int(k)
    )
    return stats, int(k)


@dataclass
class Captured:
    """A callable ready to time: a CUDA-graph replay, or the eager call with the reason why not."""

    fn: Callable[[], Any]
    graph: bool
    note: str = ""
    keep: list[Any] = field(default_factory=list, repr=False)  # graph, static outputs


def capture_cuda_graph(fn: Callable[[], Any], *, warmup: int = 3) -> Captured:
    """``fn()`` captured as a ``torch.cuda.CUDAGraph`` whose replay re-runs its kernels.

    Why: a 2:4 linear costs tens of microseconds of host work per eager call (tensor-subclass
    dispatch, the custom op, cuSPARSELt plan setup) against a few microseconds of GPU work for a
    BERT-base layer, so eager timing with CUDA events measures the host. A replay launches the
    recorded kernels only, which is what a deployment that removes the host overhead (CUDA graphs,
    TensorRT) pays. ``fn`` must read its inputs from fixed tensors (the graph replays on the same
    addresses). Warm-up runs on a side stream first, as capture requires (lazy cuBLAS /
    cuSPARSELt handles, autotuning). Where capture fails (an op that synchronises, CPU tensors),
    the eager call comes back with the reason, for the caller to label.
    """
    import torch

    if not torch.cuda.is_available():
        return Captured(fn, False, "no CUDA device: eager call")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # capture is best effort: any failure falls back to eager, labelled
        torch.cuda.synchronize()
        return Captured(fn, False, f"CUDA graph capture failed ({type(exc).__name__}: {exc})"[:300])
    return Captured(graph.replay, True, keep=[graph, out])


def ort_latency(
    models: Mapping[str, str | os.PathLike],
    inputs: Sequence[Any],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    repeat: int = 50,
) -> dict[str, LatencyStats]:
    """ONNX Runtime latency of several ONNX files on the same inputs (tensors or arrays).

    Thread spinning is off when several files are timed: with it on, the idle threads of one
    session keep spinning while the next one runs (seen here on 2 cores: resnet50 medians of 83 ms
    dense vs 68 ms 2:4 with equal p90s, an artefact; with spinning off, 51 vs 52 ms).
    """
    import numpy as np

    from .ort import ort_session

    fns = {}
    for name, path in models.items():
        sess = ort_session(path, provider=provider, threads=threads, spinning=len(models) == 1)
        feeds = {}
        for spec, x in zip(sess.get_inputs(), inputs):
            arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            if "float16" in spec.type:
                arr = arr.astype(np.float16)
            elif "float" in spec.type:
                arr = arr.astype(np.float32)
            feeds[spec.name] = arr
        fns[name] = lambda s=sess, f=feeds: s.run(None, f)
    return time_interleaved(fns, warmup=warmup, repeat=repeat)


def speedup(dense: LatencyStats, sparse: LatencyStats) -> float:
    """Dense median over sparse median (> 1: the sparse model is faster)."""
    return dense.median_ms / sparse.median_ms
