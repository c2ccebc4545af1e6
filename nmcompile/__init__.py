"""nmcompile: make PyTorch models N:M sparse in a way hardware can use.

>>> import nmcompile
>>> nmcompile.NMPattern.parse("2:4")
NMPattern(n=2, m=4)

The public surface::

    compile(model, method="asp", pattern="2:4", example_inputs=(x,), trainer=None, **options)
        -> CompileResult(.module, .masked, .masks, .history, .report(), .export_onnx(path, dtype))
    methods()                         registered method names
    NMPattern, nm_mask                patterns and the N:M mask
    Trainer, SupervisedTrainer, StepInfo
    data.load(name), zoo.create(name) datasets and models shipped for offline use
    passes, runtime                   graph passes; ONNX / ONNX Runtime / latency
"""

from __future__ import annotations

import importlib
from typing import Any

from ._compile import CompileOptions, CompileResult, compile
from ._config import MethodConfig
from ._errors import (
    ConfigError,
    DatasetNotFoundError,
    ExportError,
    InputError,
    NMCompileError,
    NMCompileWarning,
    NMViolationError,
    NonFiniteError,
    OnnxFileError,
    OutputPathError,
    PassError,
    PatternError,
    TraceError,
    UnknownMethodError,
    UnknownOptionError,
)
from ._flops import FlopModel
from ._pattern import NMPattern, nm_mask, nm_violations
from ._registry import get_method, methods
from ._trainer import StepInfo, SupervisedTrainer, Trainer
from .passes import PrunableSite

__version__ = "0.1.0"

__all__ = [
    "CompileOptions",
    "CompileResult",
    "ConfigError",
    "DatasetNotFoundError",
    "ExportError",
    "FlopModel",
    "InputError",
    "MethodConfig",
    "NMCompileError",
    "NMCompileWarning",
    "NMPattern",
    "NMViolationError",
    "NonFiniteError",
    "OnnxFileError",
    "OutputPathError",
    "PassError",
    "PatternError",
    "PrunableSite",
    "StepInfo",
    "SupervisedTrainer",
    "TraceError",
    "Trainer",
    "UnknownMethodError",
    "UnknownOptionError",
    "benchmark",
    "compile",
    "data",
    "get_method",
    "methods",
    "nm_mask",
    "nm_violations",
    "passes",
    "runtime",
    "zoo",
]

_SUBMODULES = {"data", "zoo", "runtime", "passes", "cli"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "benchmark":  # dense vs sparse latency on every backend (nmcompile.runtime.bench)
        return importlib.import_module(".runtime.bench", __name__).benchmark
    raise AttributeError(f"module 'nmcompile' has no attribute {name!r}")
