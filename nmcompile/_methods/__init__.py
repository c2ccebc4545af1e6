"""Built-in methods; importing this package registers them (see ``nmcompile._registry``)."""

from __future__ import annotations

from . import one_shot

__all__ = ["one_shot"]
