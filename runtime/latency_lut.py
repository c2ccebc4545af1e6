"""Latency lookup table, measured here on the target backend and cached on disk.

HALP ships a prebuilt table and no generator; nmcompile measures its own. A key is one layer
configuration — op, batch, input / output channels, kernel, stride, padding, dilation, groups,
bias and input size, everything that changes the kernel that runs — and the value its median
latency in ms on ``backend`` (``"torch"``: eager PyTorch on CPU or CUDA; ``"ort"``: ONNX Runtime
CPU on a one-layer ONNX file). Measure at the batch the model will be deployed at: per-layer
latency is far from proportional to the batch.

``sweep`` gives the knapsack a cost for every output-channel count: measured at 1 channel, at
the multiples of ``step`` on a grid that is dense at thin widths (doubling from ``step``) and
even above (at most 8 intervals), and at the full width, linearly interpolated between measured
points only. Latency is nearly flat at thin widths (a conv at 8 channels costs most of what it
costs at 64), so a line from (0, 0) to the first measured point would price thin layers as
almost free; 0 channels (the space gone) is the only point not measured.

``whole_models`` measures whole modules the same way, interleaved (never cached: what they check
is the table), which is what the per-layer sum is checked and calibrated against
(``_methods/channels.py``).

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
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True

    def key(self, c_out: int, backend: str, device: str) -> str:
        return (
            f"{backend}|{device}|{self.kind}|b{self.batch}|i{self.c_in}|o{c_out}|"
            f"k{self.kernel}|s{self.stride}|p{self.padding}|d{self.dilation}|g{self.groups}|"
            f"bias{int(self.bias)}|hw{self.hw}"
        )

    @classmethod
    def of(
        cls, module: nn.Module, input_shape: tuple[int, ...], batch: int | None = None
    ) -> LayerShape:
        """The shape of ``module`` fed ``input_shape``; ``batch`` replaces its batch dimension
        (the batch the model is deployed at)."""
        if batch is not None and input_shape:
            input_shape = (batch, *input_shape[1:])
        if isinstance(module, nn.Linear):
            tokens = 1
            for d in input_shape[:-1]:
                tokens *= d
            return cls("linear", tokens, module.in_features, bias=module.bias is not None)
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
            tuple(module.dilation),
            module.bias is not None,
        )

    def build(self, c_out: int, c_in: int | None = None) -> tuple[nn.Module, torch.Tensor]:
        c_in = self.c_in if c_in is None else c_in
        if self.kind == "linear":
            return nn.Linear(c_in, c_out, bias=self.bias), torch.randn(self.batch, c_in)
        conv = nn.Conv2d(
            c_in,
            c_out,
            self.kernel,
            self.stride,
            self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
        )
        return conv, torch.randn(self.batch, c_in, *self.hw)


def width_grid(c_max: int, step: int) -> list[int]:
    """Output-channel counts a sweep measures: 1, doubling multiples of ``step`` (thin widths,
    where latency is least linear), at most 8 even intervals above, and ``c_max``."""
    step = max(1, min(step, c_max))
    pts = {1, c_max}
    w = step
    while w < c_max:
        pts.add(w)
        w *= 2
    stride = max(step, -(-c_max // 8 // step) * step)
    pts.update(range(stride, c_max, stride))
    return sorted(p for p in pts if 1 <= p <= c_max)


def _layer_onnx(module: nn.Module, x_shape: tuple[int, ...], path: Path) -> None:
    """A one-layer ONNX file written directly (``onnx.helper``: milliseconds, where the torch
    exporter takes a large part of a second per layer and a table holds thousands): Conv with
    the module's attributes, or Gemm (y = x W^T + b) for a linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = module.weight.detach().numpy()
    inits = [numpy_helper.from_array(w, "W")]
    names = ["x", "W"]
    if module.bias is not None:
        inits.append(numpy_helper.from_array(module.bias.detach().numpy(), "B"))
        names.append("B")
    if isinstance(module, nn.Linear):
        node = helper.make_node("Gemm", names, ["y"], transB=1)
        y_shape = [x_shape[0], w.shape[0]]
    else:
        ph, pw = module.padding
        node = helper.make_node(
            "Conv",
            names,
            ["y"],
            kernel_shape=list(module.kernel_size),
            strides=list(module.stride),
            pads=[ph, pw, ph, pw],
            dilations=list(module.dilation),
            group=module.groups,
        )
        y_shape = [x_shape[0], w.shape[0]]
        for size, k, st, pad, dil in zip(
            x_shape[2:], module.kernel_size, module.stride, module.padding, module.dilation
        ):
            y_shape.append((size + 2 * pad - dil * (k - 1) - 1) // st + 1)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # what every supported onnxruntime reads
    onnx.save(model, str(path))


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

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "layer.onnx"
            _layer_onnx(module, tuple(x.shape), path)
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
        """Latency for every output-channel count 0..c_max (index k), measured on
        ``width_grid(c_max, step)`` and interpolated between measured points; index 0 (the layer
        gone) costs 0."""
        grid = width_grid(c_max, step)
        values = [self.latency(shape, c, c_in) for c in grid]
        self.save()
        curve = np.interp(np.arange(c_max + 1), grid, values)
        curve[0] = 0.0
        return curve

    def whole_models(
        self, modules: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...]
    ) -> dict[str, float]:
        """Median latency (ms) of several whole modules, timed interleaved in one run, so that
        their ratio holds while the machine's load drifts (on a shared 2-core machine the same
        dense model measured minutes apart differed by 60%)."""
        if self.backend == "torch":
            inputs = tuple(x.to(self.device) for x in inputs)
            fns = {}
            for name, module in modules.items():
                module = module.eval().to(self.device)

                def fn(module=module):
                    with torch.inference_mode():
                        return module(*inputs)

                fns[name] = fn
            stats = time_interleaved(
                fns,
                warmup=self.warmup,
                repeat=self.repeat,
                cuda_events=self.device.startswith("cuda"),
            )
            return {k: v.median_ms for k, v in stats.items()}
        from .latency import ort_latency
        from .onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for i, (name, module) in enumerate(modules.items()):
                paths[name] = Path(tmp) / f"model{i}.onnx"
                export_onnx(module.eval(), inputs, paths[name], verify=False)
            # whole models are few and decide the budget: more samples than a table entry
            stats = ort_latency(
                paths, inputs, warmup=max(self.warmup, 5), repeat=max(self.repeat, 20)
            )
            return {k: v.median_ms for k, v in stats.items()}

    def save(self) -> None:
        if self.path is not None and self.measured:
            atomic_write_json(self.path, self.table)
