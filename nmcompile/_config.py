"""Method configs: frozen, keyword-only dataclasses validated in ``__post_init__``.

One config class per method (torchao's config -> handler registry). Fields are the method's options;
``compile(model, method=..., **options)`` builds the config from the options and an unknown option
gets an error listing the valid ones. Every config round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, ClassVar, Self

from ._errors import ConfigError, UnknownOptionError

__all__ = ["MethodConfig", "check_float", "check_int"]


def _fmt(value: Any) -> str:
    return repr(value)


def check_int(cfg: object, name: str, lo: int | None = None, hi: int | None = None) -> None:
    """Raise ``ConfigError`` unless ``cfg.<name>`` is an int in ``[lo, hi]``."""
    value = getattr(cfg, name)
    where = f"{type(cfg).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an int, got {_fmt(value)}")
    if lo is not None and value < lo:
        raise ConfigError(f"{where} must be >= {lo}, got {_fmt(value)}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi}, got {_fmt(value)}")


def check_float(
    cfg: object,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ``ConfigError`` unless ``cfg.<name>`` is a finite number in the given interval."""
    value = getattr(cfg, name)
    where = f"{type(cfg).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {_fmt(value)}")
    lo_bad = lo is not None and (value <= lo if lo_open else value < lo)
    hi_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if lo_bad or hi_bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{where} must be in {interval}, got {_fmt(value)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method config. ``seed`` seeds the method's own randomness and the run's RNG."""

    name: ClassVar[str] = ""
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self, "seed", 0)
        self.validate()

    def validate(self) -> None:
        """Subclasses check their fields here (``check_int`` / ``check_float``)."""

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any], *, extra_valid: tuple[str, ...] = ()) -> Self:
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            valid = sorted(set(cls.options()) | set(extra_valid))
            raise UnknownOptionError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {unknown} for method "
                f"{cls.name!r}; valid options: {valid}"
            )
        return cls(**options)

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body = json.loads(json.dumps(body))  # tuples -> lists, and fail early on non-JSON values
        return {"method": self.name, "config": body}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Self:
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("method") != cls.name:
            raise ConfigError(
                f"{cls.__name__}.from_json got a config for method {data.get('method')!r}"
            )
        hints = typing.get_type_hints(cls)
        body = dict(data["config"])
        for key, value in body.items():
            hint = str(hints.get(key, ""))
            if isinstance(value, list) and "tuple" in hint.lower():
                body[key] = tuple(value)
        return cls.from_options(body)
