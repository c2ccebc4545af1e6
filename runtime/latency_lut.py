"""Latency lookup table, measured here on the target backend and cached on disk.

HALP ships a prebuilt table and no generator; nmcompile measures its own. A key is one layer
configuration — op, batch, input / output channels, kernel, stride, padding, groups and input
size — and the value its median latency in ms on ``backend`` (``"torch"``: eager PyTorch on CPU
or CUDA; ``"ort"``: ONNX Runtime CPU on a one-layer ONNX file). ``sweep`` measures a layer at a
grid of output-channel counts (multiples of ``step``) and interpolates between them, which is
what the knapsack needs: a cost for every channel count.

The cache is a JSON file written atomically after each sweep, so tables are reused across runs
and never half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nmcompile._io import atomic_write_json

from .latency import time_interleaved

__all__ = ["LatencyLUT", "LayerShape"]


@dataclass(frozen=True)
class LayerShape:
    """A conv or linear layer with ``c_out`` left free."""

    kind: str  # "conv" | "linear"
    batch: int
    c_in: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    hw: tuple[int, int] = (1, 1)  # input spatial size (conv); tokens x 1 (linear)

    def key(self, c_out: int, backend: str, device: str) -> str:
        return (
            f"{backend}|{device}|{self.kind}|b{self.batch}|i{self.c_in}|o{c_out}|"
            f"k{self.kernel}|s{self.stride}|p{self.padding}|g{self.groups}|hw{self.hw}"
        )

    @classmethod
    def of(cls, module: nn.Module, input_shape: tuple[int, ...]) -> LayerShape:
        if isinstance(module, nn.Linear):
            tokens = 1
            for d in input_shape[:-1]:
                tokens *= d
            return cls("linear", tokens, module.in_features)
        h, w = input_shape[-2], input_shape[-1]
        if module.padding == "same":  # what 'same' pads (symmetric: exact for odd kernels)
            pad = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        elif isinstance(module.padding, tuple):
            pad = module.padding
        else:  # "valid"
            pad = (0, 0)
        return cls(
            "conv",
            input_shape[0],
            module.in_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(pad),
            module.groups,
            (h, w),
        )

    def build(self, c_out: int, c_in: int | None = None) -> tuple[nn.Module, torch.Tensor]:
        c_in = self.c_in if c_in is None else c_in
        if self.kind == "linear":
            return nn.Linear(c_in, c_out), torch.randn(self.batch, c_in)
        return (
            nn.Conv2d(c_in, c_out, self.kernel, self.stride, self.padding, groups=self.groups),
            torch.randn(self.batch, c_in, *self.hw),
        )


def _device_tag(backend: str, device: str) -> str:
    """The device as a cache key: a CPU table is only valid for the same CPU model and thread
    count (a GPU one names the GPU), so a cache copied to another machine is re-measured."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device}:{torch.cuda.get_device_name(torch.device(device))}"
    from nmcompile._machine import cpu_model

    threads = 0 if backend == "ort" else torch.get_num_threads()  # ORT: its default pool
    return f"cpu:{cpu_model()}:{threads}t"


class LatencyLUT:
    """Measured layer latencies (ms), cached in ``path`` (JSON)."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        backend: str = "torch",
        device: str = "cpu",
        warmup: int = 3,
        repeat: int = 15,
    ) -> None:
        if backend not in ("torch", "ort"):
            raise ValueError(f"latency backend must be 'torch' or 'ort', got {backend!r}")
        self.path = Path(path) if path else None
        self.backend, self.device = backend, device
        self.device_tag = _device_tag(backend, device)
        self.warmup, self.repeat = warmup, repeat
        self.table: dict[str, float] = {}
        self.measured = 0
        if self.path is not None and self.path.is_file():
            try:
                self.table = {
                    str(k): float(v) for k, v in json.loads(self.path.read_text()).items()
                }
            except (OSError, ValueError):
                self.table = {}  # an unreadable cache is rebuilt, not trusted

    def _measure(self, shape: LayerShape, c_out: int, c_in: int | None) -> float:
        module, x = shape.build(c_out, c_in)
        module.eval()
        if self.backend == "torch":
            module, x = module.to(self.device), x.to(self.device)
            cuda = self.device.startswith("cuda")

            def fn():
                with torch.inference_mode():
                    return module(x)

            stats = time_interleaved(
                {"l": fn}, warmup=self.warmup, repeat=self.repeat, cuda_events=cuda
            )
            return stats["l"].median_ms
        from .latency import ort_latency
        from .onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "layer.onnx"
            export_onnx(module, (x,), path, verify=False)
            return ort_latency({"l": path}, (x,), warmup=self.warmup, repeat=self.repeat)[
                "l"
            ].median_ms

    def latency(self, shape: LayerShape, c_out: int, c_in: int | None = None) -> float:
        key = shape.key(c_out, self.backend, self.device_tag) + (f"|in{c_in}" if c_in else "")
        if key not in self.table:
            self.table[key] = self._measure(shape, c_out, c_in)
            self.measured += 1
        return self.table[key]

    def sweep(
        self, shape: LayerShape, c_max: int, step: int, c_in: int | None = None
    ) -> np.ndarray:
        """Latency for every output-channel count 0..c_max (index k), from measurements at
        multiples of ``step`` (and ``c_max``), linearly interpolated; 0 channels cost 0."""
        grid = sorted({*range(step, c_max + 1, step), c_max})
        values = [self.latency(shape, c, c_in) for c in grid]
        self.save()
        return np.interp(np.arange(c_max + 1), [0, *grid], [0.0, *values])

    def save(self) -> None:
        if self.path is not None and self.measured:
            atomic_write_json(self.path, self.table)
