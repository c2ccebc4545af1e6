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

__all__ = ["RUN_CONTROL", "CheckpointedConfig", "MethodConfig", "check_float", "check_int"]

# Options that say where and whether to checkpoint, not what the run computes: a resumed run may
# differ in them from the run that wrote the checkpoint.
RUN_CONTROL = ("checkpoint_dir", "resume", "keep_checkpoints", "max_rounds", "checkpoint_every")


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
        if hasattr(self, "checkpoint_dir"):
            check_checkpoint_options(self)

    def validate(self) -> None:
        """Subclasses check their fields here (``check_int`` / ``check_float``)."""

    def run_key(self) -> dict[str, Any]:
        """The config without run-control options: what a checkpoint must match to be resumed."""
        body = self.to_json()["config"]
        return {k: v for k, v in body.items() if k not in RUN_CONTROL}

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


def check_checkpoint_options(cfg: Any) -> None:
    """Validate ``checkpoint_dir`` / ``resume`` / ``keep_checkpoints`` (and ``checkpoint_every``
    where the config has it); a path-like ``checkpoint_dir`` becomes a str."""
    where = type(cfg).__name__
    check_int(cfg, "keep_checkpoints", 1)
    if getattr(cfg, "checkpoint_every", None) is not None:
        check_int(cfg, "checkpoint_every", 1)
    if not isinstance(cfg.resume, bool):
        raise ConfigError(f"{where}.resume must be True or False")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ConfigError(
            f"{where}.resume=True needs checkpoint_dir: the folder the interrupted run wrote its "
            "checkpoints to"
        )
    if cfg.checkpoint_dir is not None and not isinstance(cfg.checkpoint_dir, str):
        object.__setattr__(cfg, "checkpoint_dir", str(cfg.checkpoint_dir))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointedConfig(MethodConfig):
    """Checkpoints of a method that trains in one run (not in rounds).

    ``checkpoint_dir``: save the whole run state (weights, masks, optimizer, the method's own
    state, the data stream's position and generators, RNG states, history) every
    ``checkpoint_every`` optimizer steps (None: 1000) and at the end of every training phase,
    atomically, keeping the newest ``keep_checkpoints``. ``resume=True`` continues from the newest
    good checkpoint and ends bit for bit where the uninterrupted run would have (see
    ``diagnostics["resume_exact"]``).
    """

    DEFAULT_CHECKPOINT_EVERY: ClassVar[int] = 1000

    checkpoint_dir: str | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
