"""Runtime backends (installed as ``nmcompile.runtime``): ONNX export and N:M checking, ONNX
Runtime sessions, TensorRT engines, torch 2:4 semi-structured kernels, the latency harness and
the dense-vs-sparse benchmark.

Names resolve lazily so ``import nmcompile.runtime`` does not import onnx or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_onnx": ".onnx_export",
    "ExportResult": ".onnx_export",
    "check_onnx": ".onnx_check",
    "OnnxNMReport": ".onnx_check",
    "OnnxNMEntry": ".onnx_check",
    "ort_session": ".ort",
    "available_providers": ".ort",
    "LatencyStats": ".latency",
    "time_interleaved": ".latency",
    "ort_latency": ".latency",
    "speedup": ".latency",
    "build_engine": ".tensorrt",
    "EngineBuild": ".tensorrt",
    "TrtRunner": ".tensorrt",
    "TensorRTNotAvailable": ".tensorrt",
    "trtexec_command": ".tensorrt",
    "parse_engine_info": ".tensorrt",
    "to_semi_structured": ".semi_structured",
    "plan_semi_structured": ".semi_structured",
    "benchmark": ".bench",
    "BenchReport": ".bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nmcompile.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
