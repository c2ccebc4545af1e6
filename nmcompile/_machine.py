"""What machine a number was measured on: CPU model, cores, library versions, GPU.

Reports, latency tables and benchmarks all stamp their numbers with this; it lives apart from the
CLI so the runtime (latency tables, ``benchmark``) does not depend on the command-line layer.
Nothing heavy runs at import: torch and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["cpu_model", "gpu_info", "machine_info"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """The visible CUDA GPU and its 2:4 kernel libraries; ``{"gpu": None}`` without one."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None}
    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = getattr(cusparselt, "is_available", None)
    version = getattr(cusparselt, "version", None)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cusparselt": version() if callable(available) and available() and version else None,
    }


def machine_info() -> dict[str, Any]:
    """CPU model, core count, library versions and the GPU, for the reports."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **gpu_info(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info
