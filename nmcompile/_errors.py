"""Typed errors. Every message names the layer, option, shape or file at fault and says how to fix it.

Each error also derives from the builtin a caller would expect (``ValueError`` for a bad value,
``TypeError`` for an unknown keyword, ``FileNotFoundError`` for a missing file), so generic
``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetNotFoundError",
    "ExportError",
    "InputError",
    "NMCompileError",
    "NMCompileWarning",
    "NMViolationError",
    "NonFiniteError",
    "OnnxFileError",
    "OutputPathError",
    "PassError",
    "PatternError",
    "TraceError",
    "UnknownMethodError",
    "UnknownOptionError",
]


class NMCompileError(Exception):
    """Base class of every error nmcompile raises on purpose."""


class NMCompileWarning(UserWarning):
    """Something the user may want to know about: a layer left dense and why, a tracing choice
    made for them (a KV cache switched off, shapes fixed to the example's)."""


class PatternError(NMCompileError, ValueError):
    """An N:M pattern that is not ``"n:m"`` with integers ``0 < n < m <= 32``."""


class ConfigError(NMCompileError, ValueError):
    """A method or compile option with a value out of range or of the wrong type."""


class UnknownOptionError(ConfigError, TypeError):
    """A keyword that no config accepts; the message lists the valid ones."""


class UnknownMethodError(ConfigError):
    """A method name not in the registry; the message lists the registered ones."""


class TraceError(NMCompileError):
    """torch.fx could not trace the model; the message names the module and the fix."""


class InputError(NMCompileError, ValueError):
    """``example_inputs`` that the model cannot run on; the message names the failing layer."""


class PassError(NMCompileError):
    """A graph pass failed or broke an invariant; the message names the passes that ran before."""


class NMViolationError(NMCompileError):
    """A weight that should satisfy N:M does not."""


class ExportError(NMCompileError):
    """ONNX export failed or the exported file does not match the torch module."""


class OnnxFileError(NMCompileError, ValueError):
    """A path that is not a readable ONNX model."""


class OutputPathError(NMCompileError, OSError):
    """An output location that cannot be written."""


class NonFiniteError(NMCompileError, ValueError):
    """NaN or Inf in a weight: given to compile, or produced by training that diverged."""


class DatasetNotFoundError(NMCompileError, FileNotFoundError):
    """A dataset whose files are not on this machine; the message says how to get them."""
