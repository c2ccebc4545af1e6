"""``find_sites``: which weights the pruning passes may touch.

A site is a conv (``groups == 1``, zero padding, not transposed) or linear weight. N:M groups run
along axis 1 of the weight (conv input channels, linear input features). Excluded, with the reason
kept for the report:

- the stem (first weight layer in execution order) and the classifier (last one), as the papers
  do (``prune_stem`` / ``prune_classifier`` to include them);
- grouped and depthwise convs, transposed convs, non-zero padding modes;
- a layer whose reduction dimension is not a multiple of ``m`` (warned, naming the layer);
- layers matched by ``exclude`` (fnmatch patterns over module paths), or not matched by
  ``include`` when given.

The pass writes ``node.meta["nm_site"]`` on every call of a site and ``gm.meta["nm_sites"]`` /
``gm.meta["nm_excluded"]``; read them back with :func:`get_sites` / :func:`get_excluded`.
A weight shared by two modules (tied weights) is one site: the later modules are recorded as its
``aliases`` and share its mask.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from nmcompile._errors import ConfigError
from nmcompile._pattern import NMPattern

from ._infra import PassResult

__all__ = [
    "ExcludedLayer",
    "NMCompileWarning",
    "PrunableSite",
    "find_sites",
    "get_excluded",
    "get_sites",
    "site_kind",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NMCompileWarning(UserWarning):
    """A layer left dense for a reason the user may want to know about."""


@dataclass(frozen=True)
class PrunableSite:
    """One weight the passes may prune.

    ``name`` is the module path (``"layer1.0.conv1"``), ``param`` the parameter's fully-qualified
    name (``"layer1.0.conv1.weight"``), the key of masks everywhere. ``group_axis`` is the
    reduction axis along which N:M groups run.
    """

    name: str
    param: str
    kind: str  # "conv" | "linear" | "matmul"
    shape: tuple[int, ...]
    group_axis: int = 1
    aliases: tuple[str, ...] = field(default=())
    attr: str = "weight"  # the parameter's attribute on module ``name``

    @property
    def reduction(self) -> int:
        return self.shape[self.group_axis]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def mask_target(self) -> str:
        """Attribute path of this site's persistent mask buffer."""
        return f"{self.name}.{self.attr}_mask"

    @property
    def masker_target(self) -> str:
        """Module path of this site's masker (learned / straight-through masks)."""
        return f"{self.name}.{self.attr}_masker"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "param": self.param,
            "kind": self.kind,
            "shape": list(self.shape),
            "group_axis": self.group_axis,
            "aliases": list(self.aliases),
            "attr": self.attr,
        }


@dataclass(frozen=True)
class ExcludedLayer:
    name: str
    kind: str
    shape: tuple[int, ...]
    reason: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "reason": self.reason,
        }


def site_kind(mod: nn.Module) -> str | None:
    """``"conv"``/``"linear"`` for weight layers a site can be made of, ``"conv_transpose"`` for
    transposed convs (never sites), ``None`` for everything else."""
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(mod, _CONV_TYPES):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    return None


def _overridden_forward(mod: nn.Module) -> type | None:
    """The torch base class whose ``forward`` ``mod`` overrides, or None.

    ``insert_masks`` rewrites a site's call into ``F.conv*`` / ``F.linear``; a subclass that
    overrides ``forward`` (kept opaque through ``leaf_modules``) would silently compute something
    else after the rewrite, so such a layer is never a site.
    """
    for base in (*_CONV_TYPES, nn.Linear):
        if isinstance(mod, base):
            return None if type(mod).forward is base.forward else base
    return None


def _is_matmul_site(gm: fx.GraphModule, node: fx.Node) -> bool:
    import torch.nn.functional as F

    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
        return False
    w = node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return False
    try:
        p = gm.get_parameter(w.target)
    except AttributeError:
        return False
    return p.dim() == 2


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_sites(
    gm: fx.GraphModule,
    pattern: NMPattern | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    prune_stem: bool = False,
    prune_classifier: bool = False,
    warn: bool = True,
) -> PassResult:
    """Annotate the sites of ``gm`` (see the module docstring). ``pattern=None``: unstructured."""
    if isinstance(exclude, str) or (include is not None and isinstance(include, str)):
        raise ConfigError("include / exclude must be lists of module-path patterns, not a string")
    names = {name for name, _ in gm.named_modules()}
    for opt, pats in (("exclude", exclude), ("include", include or ())):
        for p in pats:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ConfigError(
                    f"{opt} pattern {p!r} matches no module of the model; module paths look like "
                    f"{sorted(n for n in names if n)[:6]}"
                )

    # Weight layers in execution order (first call of each module). A matmul site is a 2-D
    # parameter the graph feeds to F.linear itself (attention's packed qkv in_proj_weight).
    order: list[tuple[str, nn.Module, str]] = []
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = site_kind(mod)
            if kind is None:
                continue
            key = node.target
        elif _is_matmul_site(gm, node):
            key = node.args[1].target
            mod, kind = gm, "matmul"
        else:
            continue
        if key not in calls:
            order.append((key, mod, kind))
            calls[key] = []
        calls[key].append(node)

    stem = order[0][0] if order else None
    classifier = order[-1][0] if len(order) > 1 else None
    sites: list[PrunableSite] = []
    excluded: list[ExcludedLayer] = []
    owner_of_param: dict[int, int] = {}  # id(weight) -> index in sites

    for name, mod, kind in order:
        if kind == "matmul":
            param = gm.get_parameter(name)
            owner, _, attr = name.rpartition(".")
            shape = tuple(param.shape)
            if (name == stem and not prune_stem) or (name == classifier and not prune_classifier):
                excluded.append(
                    ExcludedLayer(
                        name,
                        kind,
                        shape,
                        "stem layer (kept dense as in the papers)"
                        if name == stem
                        else "classifier (kept dense)",
                    )
                )
                continue
            if (
                (
                    include is not None
                    and not _matches(owner, include)
                    and not _matches(name, include)
                )
                or _matches(owner, exclude)
                or _matches(name, exclude)
            ):
                excluded.append(ExcludedLayer(name, kind, shape, "excluded by the options"))
                continue
            if pattern is not None and shape[1] % pattern.m:
                reason = f"{shape[1]} input features, not a multiple of {pattern.m}"
                excluded.append(ExcludedLayer(name, kind, shape, reason))
                if warn:
                    warnings.warn(
                        f"matmul weight `{name}` has {reason}: excluded from {pattern}; pass "
                        f"exclude=[{owner!r}] to silence",
                        NMCompileWarning,
                        stacklevel=2,
                    )
                continue
            sites.append(
                PrunableSite(name=owner, param=name, kind="matmul", shape=shape, attr=attr)
            )
            continue
        shape = tuple(mod.weight.shape)

        def skip(reason: str, *, _name: str = name, _kind: str = kind, _shape=shape) -> None:
            excluded.append(ExcludedLayer(_name, _kind, _shape, reason))

        if include is not None and not _matches(name, include):
            skip("not matched by include")
            continue
        if _matches(name, exclude):
            skip("excluded by the exclude option")
            continue
        base = _overridden_forward(mod) if kind != "conv_transpose" else None
        if base is not None:
            reason = (
                f"{type(mod).__name__} overrides nn.{base.__name__}.forward, so its call cannot be "
                "rewritten into a masked one; kept dense"
            )
            skip(reason)
            if warn:
                warnings.warn(
                    f"{kind} `{name}`: {reason}. Leave it out of leaf_modules so torch.fx traces "
                    f"into its forward and prunes the weight there, or pass exclude=[{name!r}] to "
                    "silence",
                    NMCompileWarning,
                    stacklevel=2,
                )
            continue
        if kind == "conv_transpose":
            skip("transposed conv: its reduction axis is not axis 1 of the weight; kept dense")
            continue
        if name == stem and not prune_stem:
            skip("stem layer (kept dense as in the papers; prune_stem=True to prune it)")
            continue
        if name == classifier and not prune_classifier:
            skip("classifier (kept dense as in the papers; prune_classifier=True to prune it)")
            continue
        if kind == "conv" and mod.groups != 1:
            skip(
                f"grouped/depthwise conv (groups={mod.groups}): sparse tensor cores run only "
                "groups=1 convs; kept dense"
            )
            continue
        if kind == "conv" and mod.padding_mode != "zeros":
            skip(f"padding_mode={mod.padding_mode!r} (only 'zeros' is lowered); kept dense")
            continue
        if mod.weight.numel() == 0:
            skip("zero-size weight")
            continue
        if pattern is not None and shape[1] % pattern.m:
            what = "input channels" if kind == "conv" else "input features"
            reason = f"{shape[1]} {what}, not a multiple of {pattern.m}"
            skip(reason)
            if warn:
                warnings.warn(
                    f"{kind} `{name}` has {reason}: excluded from {pattern}; pass "
                    f"exclude=[{name!r}] to silence",
                    NMCompileWarning,
                    stacklevel=2,
                )
            continue
        pid = id(mod.weight)
        if pid in owner_of_param:  # tied weight: share the first owner's mask
            i = owner_of_param[pid]
            sites[i] = PrunableSite(
                sites[i].name,
                sites[i].param,
                sites[i].kind,
                sites[i].shape,
                sites[i].group_axis,
                (*sites[i].aliases, name),
            )
            continue
        owner_of_param[pid] = len(sites)
        sites.append(PrunableSite(name=name, param=f"{name}.weight", kind=kind, shape=shape))

    by_module = {s.name if s.kind != "matmul" else s.param: s for s in sites}
    for s in sites:
        for a in s.aliases:
            by_module[a] = s
    for name, nodes in calls.items():
        for node in nodes:
            if name in by_module:
                node.meta["nm_site"] = by_module[name]
            else:
                node.meta.pop("nm_site", None)
    gm.meta["nm_sites"] = sites
    gm.meta["nm_excluded"] = excluded
    # An analysis: it annotates node.meta / gm.meta but changes neither graph nor tensors.
    return PassResult(gm, False)


def get_sites(gm: fx.GraphModule) -> list[PrunableSite]:
    """The sites ``find_sites`` recorded on ``gm`` (empty if it never ran)."""
    return list(gm.meta.get("nm_sites", []))


def get_excluded(gm: fx.GraphModule) -> list[ExcludedLayer]:
    return list(gm.meta.get("nm_excluded", []))
