"""Built-in methods; importing this package registers them (see ``nmcompile._registry``)."""

from __future__ import annotations

from . import lottery, one_shot, structure

__all__ = ["lottery", "one_shot", "structure"]
