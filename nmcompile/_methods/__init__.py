"""Built-in methods; importing this package registers them (see ``nmcompile._registry``)."""

from __future__ import annotations

from . import calibrated, channels, learned, lottery, one_shot, prune_grow, structure

__all__ = ["calibrated", "channels", "learned", "lottery", "one_shot", "prune_grow", "structure"]
