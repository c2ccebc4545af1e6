"""Method registry: name -> (config class, handler).

A method is a named schedule over passes and training: its config (a ``MethodConfig``) and a
handler ``run(session, config)`` that drives rounds through the ``Session``. Registering the pair
in one place replaces any if/elif over method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._config import MethodConfig
from ._errors import UnknownMethodError

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["MethodSpec", "get_method", "methods", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    run: Callable[[Session, MethodConfig], None]
    # True: the result satisfies the N:M pattern; False: unstructured; or decided by the config
    structured: bool | Callable[[MethodConfig], bool]
    summary: str
    shrink: bool = False  # channels the method empties are removed from CompileResult.module
    # (config, pattern) -> (site, weight) -> masker module, for methods whose masks are modules
    masker: Callable | None = None
    # what the result is, for listings: "N:M", "unstructured", "channels", "blocks", ... (None:
    # derived from ``structured``)
    kind: str | None = None

    def describe_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        if callable(self.structured):
            return "N:M or unstructured"
        return "N:M" if self.structured else "unstructured"

    def is_structured(self, config: MethodConfig) -> bool:
        return bool(self.structured(config) if callable(self.structured) else self.structured)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[MethodConfig],
    *,
    structured: bool | Callable[[MethodConfig], bool],
    summary: str,
    shrink: bool = False,
    masker: Callable | None = None,
    kind: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``run(session, config)`` as method ``name`` with ``config_cls``."""

    def deco(run: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        config_cls.name = name
        _REGISTRY[name] = MethodSpec(
            name, config_cls, run, structured, summary, shrink, masker, kind
        )
        return run

    return deco


def _load_builtin() -> None:
    import importlib

    importlib.import_module("nmcompile._methods")  # registers the built-in methods


def methods() -> list[str]:
    """Names of the registered methods.

    >>> "asp" in methods()
    True
    """
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]
