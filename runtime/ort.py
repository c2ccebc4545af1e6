"""ONNX Runtime sessions: the CUDA provider where onnxruntime-gpu and a GPU are present, else CPU."""

from __future__ import annotations

import os
from pathlib import Path

from nmcompile._errors import OnnxFileError

__all__ = ["available_providers", "ort_session"]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_session(
    path: str | os.PathLike,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
):
    """An ``InferenceSession`` on ``provider`` ("cpu" or "cuda"), all graph optimisations on.

    ``spinning=False`` stops idle intra-op threads from busy-waiting: needed when several sessions
    are timed in turn, or one session's spinning threads steal cores from the next.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file {str(path)!r} does not exist")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available_providers():
            raise RuntimeError(
                "ONNX Runtime has no CUDA provider here: install onnxruntime-gpu (pip install "
                "'nmcompile[gpu]') on a machine with an NVIDIA GPU, or use provider='cpu'"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif provider == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise OnnxFileError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from exc
