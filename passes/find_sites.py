"""``find_sites``: which weights the pruning passes may touch, found by what the graph computes.

A site is a weight whose every use is a product reduced along one axis of it:

- a conv module call (``groups == 1``, zero padding, not transposed) or a linear module call:
  N:M groups along axis 1 (input channels / input features);
- a *matmul site*: a 2-D parameter the graph feeds to a product itself, read through
  ``_weight_uses`` from torch functions, Tensor methods and ATen ops alike: ``linear(x, W)``
  (attention's packed ``in_proj_weight``, a weight handed to ``F.linear``), ``addmm(b, x, W)`` /
  ``x @ W`` (transformers' ``Conv1D``, weight stored ``[in, out]``: groups along axis 0), and
  weights passed into a function the graph keeps opaque (torchvision's
  ``shifted_window_attention``), looked into by ``propagate_shapes``' probe.

Every conv, linear and ``Conv1D`` of the traced model, and every 2-D parameter used by a product,
is either a site or an :class:`ExcludedLayer` with its reason, so nothing is left dense in
silence. Reasons, in the order they are decided:

- ``include`` / ``exclude`` (fnmatch patterns over module paths or parameter names);
- not called by the traced forward; inside a leaf module (``leaf_modules``); a subclass that
  overrides ``forward`` and is kept opaque;
- also used by something that is not a product (an embedding tied to an LM head: a mask would
  prune the embedding's rows too), or along two different axes;
- transposed convs, grouped / depthwise convs, non-zero padding modes, zero-size weights;
- the stem and the classifier, by role (``prune_stem`` / ``prune_classifier`` to prune them).
  The *stem* reads the raw input: its activation operand is computed from the model's inputs
  and constants alone, with no parameter on the way (pixels into the first conv, a patch
  embedding); a layer whose output feeds attention (``scaled_dot_product_attention`` or a
  product of two activations) is never a stem. The *classifier* produces the model's output: its
  result reaches the graph output through parameter-free ops alone (a classification head, an LM
  head);
- a reduction dimension that is not a multiple of ``m`` (warned, naming the layer).

The pass writes ``node.meta["nm_site"]`` on every call of a site and ``gm.meta["nm_sites"]`` /
``gm.meta["nm_excluded"]``; read them back with :func:`get_sites` / :func:`get_excluded`.
A weight shared by two modules that both only multiply with it (tied weights) is one site: the
later modules are recorded as its ``aliases`` and share its mask.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from nmcompile._errors import ConfigError, NMCompileWarning
from nmcompile._pattern import NMPattern

from ._infra import PassResult
from ._weight_uses import WeightUse, graph_weight_uses, op_name
from .trace import AttentionDropout

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


@dataclass(frozen=True)
class PrunableSite:
    """One weight the passes may prune.

    ``name`` is the module path (``"layer1.0.conv1"``), ``param`` the parameter's fully-qualified
    name (``"layer1.0.conv1.weight"``), the key of masks everywhere. ``group_axis`` is the
    reduction axis along which N:M groups run.
    """

    name: str
    param: str
    kind: str  # "conv" | "linear" (module calls) | "matmul" (a parameter fed to a product)
    shape: tuple[int, ...]
    group_axis: int = 1
    aliases: tuple[str, ...] = field(default=())
    attr: str = "weight"  # the parameter's attribute on module ``name``

    @property
    def reduction(self) -> int:
        return self.shape[self.group_axis]

    @property
    def out_axis(self) -> int:
        """The output axis of the weight: 0, except for a 2-D weight reduced along axis 0 (a
        ``[in, out]`` weight such as transformers' ``Conv1D``), whose outputs run along axis 1."""
        return 1 if self.group_axis == 0 and len(self.shape) == 2 else 0

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (weight-shaped) as ``[outputs, rest]``: one row per output channel / feature."""
        return t.movedim(self.out_axis, 0).reshape(t.shape[self.out_axis], -1)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rows`: back to the weight's shape."""
        moved = [self.shape[self.out_axis]] + [
            d for i, d in enumerate(self.shape) if i != self.out_axis
        ]
        return rows.reshape(moved).movedim(0, self.out_axis)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def mask_target(self) -> str:
        """Attribute path of this site's persistent mask buffer."""
        return f"{self._owner_prefix}{self.attr}_mask"

    @property
    def masker_target(self) -> str:
        """Module path of this site's masker (learned / straight-through masks)."""
        return f"{self._owner_prefix}{self.attr}_masker"

    @property
    def owner(self) -> str:
        """Path of the module that holds the parameter (``""``: the root module, whose sites are
        named after the parameter)."""
        return self.param.rpartition(".")[0]

    @property
    def _owner_prefix(self) -> str:
        return f"{self.owner}." if self.owner else ""

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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -- roles: what reads the raw input, what produces the output ----------------------------------
_RAW, _CONST, _WEIGHT, _ACT = "raw", "const", "weight", "act"
_ATTENTION_OPS = frozenset(
    {"scaled_dot_product_attention", "multi_head_attention_forward", "einsum", "baddbmm"}
)
_PRODUCTS = frozenset({"matmul", "bmm", "mm", "rmatmul"})


class _Roles:
    """Data-flow states of every node (``raw``: a function of the inputs and constants alone;
    ``weight``: of parameters and constants; ``act``: anything that mixes them) and which nodes
    are the model's output: they reach the graph output through parameter-free ops and feed
    nothing else (a block whose result is also returned, as ``output_hidden_states`` returns
    every block's, feeds the next block too, so it is no classifier)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.state: dict[fx.Node, str] = {}
        for n in gm.graph.nodes:
            self.state[n] = self._state(n)
        reach: set[fx.Node] = set()  # reaches the output through parameter-free ops
        only: set[fx.Node] = set()  # ... and feeds nothing but such paths (or dead ends)
        for n in reversed(gm.graph.nodes):
            if any(u.op == "output" or (u in reach and self.weight_free(u)) for u in n.users):
                reach.add(n)
            if all(u.op == "output" or (u in only and self.weight_free(u)) for u in n.users):
                only.add(n)
        self.to_output = reach & only

    def _has_params(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return any(True for _ in self.gm.get_submodule(n.target).parameters())
        return False

    def _state(self, n: fx.Node) -> str:
        if n.op == "placeholder":
            return _RAW
        if n.op == "get_attr":
            return _WEIGHT if _is_param(self.gm, n.target) else _CONST
        if n.op == "output":
            return _ACT
        ins = {self.state.get(a, _ACT) for a in n.all_input_nodes}
        if self._has_params(n):
            ins.add(_WEIGHT)
        if _ACT in ins or {_RAW, _WEIGHT} <= ins:
            return _ACT
        if _RAW in ins:
            return _RAW
        return _WEIGHT if _WEIGHT in ins else _CONST

    def weight_free(self, n: fx.Node) -> bool:
        return not self._has_params(n) and all(
            self.state.get(a) != _WEIGHT for a in n.all_input_nodes
        )

    def reads_raw(self, n: fx.Node) -> bool:
        """Whether a call's activation operands (its inputs that are no function of parameters
        alone: the weight and its views are) are raw input."""
        acts = [a for a in n.all_input_nodes if self.state[a] != _WEIGHT]
        return (
            bool(acts)
            and any(self.state[a] == _RAW for a in acts)
            and all(self.state[a] in (_RAW, _CONST) for a in acts)
        )

    def feeds_attention(self, n: fx.Node) -> bool:
        seen: set[fx.Node] = set()
        stack = list(n.users)
        while stack:
            u = stack.pop()
            if u in seen or u.op == "output":
                continue
            seen.add(u)
            name = op_name(u.target, u.op) if u.op in ("call_function", "call_method") else ""
            if name in _ATTENTION_OPS or name.startswith("_scaled_dot_product"):
                return True
            if u.op == "call_module" and isinstance(
                self.gm.get_submodule(u.target), AttentionDropout
            ):
                return True
            if name in _PRODUCTS and all(self.state.get(a) == _ACT for a in u.all_input_nodes):
                return True
            if self.weight_free(u):
                stack.extend(u.users)
        return False


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


# -- candidates ----------------------------------------------------------------------------------
@dataclass
class _Candidate:
    """Everything the graph does with one parameter (keyed by identity, so ties are one)."""

    param: str  # the first name it is read under
    owner: str
    attr: str
    shape: tuple[int, ...]
    module: nn.Module | None = None  # the weight layer, for module calls
    kind: str = "matmul"
    calls: list[fx.Node] = field(default_factory=list)  # module calls (first = owner's)
    callers: list[str] = field(default_factory=list)  # module path of each module call
    products: list[WeightUse] = field(default_factory=list)  # direct product uses
    others: list[str] = field(default_factory=list)  # descriptions of non-product uses
    first: int = 0  # graph position of the first use

    @property
    def use_nodes(self) -> list[fx.Node]:
        return self.calls + [u.node for u in self.products if u.node is not None]


def _where(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return f"`{path}`"
    return f"`{n.name}`"


def _describe_use(u: WeightUse) -> str:
    if u.node is None:
        return f"`{u.op}`"
    if u.op == "output":
        return "the model's output"
    return f"`{u.op}` in {_where(u.node)}"


def _collect(gm: fx.GraphModule) -> dict[int, _Candidate]:
    cands: dict[int, _Candidate] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def cand(p: torch.Tensor, name: str, pos: int) -> _Candidate:
        c = cands.get(id(p))
        if c is None:
            owner, _, attr = name.rpartition(".")
            c = cands[id(p)] = _Candidate(name, owner, attr, tuple(p.shape), first=pos)
        c.first = min(c.first, pos)
        return c

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = site_kind(mod)
            if kind is not None and isinstance(getattr(mod, "weight", None), nn.Parameter):
                c = cand(mod.weight, f"{node.target}.weight", order[node])
                if c.module is None and not c.calls:
                    c.module, c.kind = mod, kind
                    c.param, c.owner, c.attr = f"{node.target}.weight", node.target, "weight"
                c.calls.append(node)
                c.callers.append(node.target)
                if c.module is not mod and c.module is not None and kind != c.kind:
                    c.others.append(f"the {kind} `{node.target}`")
                continue
            params = list(mod.named_parameters())
            for pname, p in params:
                if p.dim() < 2:
                    continue
                c = cand(p, f"{node.target}.{pname}", order[node])
                if "." in pname:  # a weight layer inside a module called as one opaque call
                    c.others.append(
                        f"inside `{node.target}` ({type(mod).__name__}), a module called as one "
                        "opaque call (leaf_modules)"
                    )
                else:
                    c.others.append(f"the {type(mod).__name__} `{node.target}`")
        elif node.op == "get_attr" and _is_param(gm, node.target):
            p = gm.get_parameter(node.target)
            if p.dim() < 2:
                continue
            c = cand(p, node.target, order[node])
            for u in graph_weight_uses(node, p.dim()):
                if u.is_product:
                    c.products.append(u)
                else:
                    c.others.append(_describe_use(u))
    return cands


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
    layers: dict[str, tuple[str, tuple[int, ...]]] = gm.meta.get("nm_weight_layers", {})
    names = {name for name, _ in gm.named_modules()} | set(layers)
    params = {name for name, _ in gm.named_parameters()}
    for opt, pats in (("exclude", exclude), ("include", include or ())):
        for p in pats:
            if not any(fnmatch.fnmatchcase(n, p) for n in names | params):
                raise ConfigError(
                    f"{opt} pattern {p!r} matches no module of the model; module paths look like "
                    f"{sorted(n for n in names if n)[:6]}"
                )

    roles = _Roles(gm)
    cands = sorted(_collect(gm).values(), key=lambda c: c.first)
    sites: list[PrunableSite] = []
    excluded: list[ExcludedLayer] = []
    seen_layers: set[str] = set()
    # FLOPs of the sites' products inside opaque calls, per call (summed over a call's uses)
    site_flops: dict[fx.Node, dict[str, float]] = {}

    for c in cands:
        is_layer = c.module is not None or c.owner in layers
        if not c.calls and not c.products and not is_layer:
            continue  # an embedding table, a norm, a position table: not a weight layer
        kind = c.kind if c.module is not None else "matmul"
        name = c.owner if c.module is not None else c.param
        seen_layers.update(c.callers or [c.owner])
        axes = {u.axis for u in c.products} | ({1} if c.calls else set())

        def skip(reason: str, *, _c=c, _kind=kind) -> None:
            excluded.append(ExcludedLayer(_c.owner or _c.param, _kind, _c.shape, reason))

        def warn_skip(reason: str, message: str) -> None:
            skip(reason)
            if warn:
                warnings.warn(message, NMCompileWarning, stacklevel=3)

        if include is not None and not (_matches(c.owner, include) or _matches(c.param, include)):
            skip("not matched by include")
            continue
        if _matches(c.owner, exclude) or _matches(c.param, exclude):
            skip("excluded by the exclude option")
            continue
        if c.module is not None and kind != "conv_transpose":
            base = _overridden_forward(c.module)
            if base is not None:
                reason = (
                    f"{type(c.module).__name__} overrides nn.{base.__name__}.forward, so its call "
                    "cannot be rewritten into a masked one; kept dense"
                )
                warn_skip(
                    reason,
                    f"{kind} `{name}`: {reason}. Leave it out of leaf_modules so torch.fx traces "
                    "into its forward and prunes the weight there, or pass "
                    f"exclude=[{c.owner!r}] to silence",
                )
                continue
        if c.calls and c.products:
            skip(
                f"used both by its module call and directly as a matrix product "
                f"({', '.join(sorted({u.op for u in c.products}))}), which a mask on the call would "
                "not reach; kept dense"
            )
            continue
        if len(axes) > 1:
            skip(f"reduced along different axes by its uses ({sorted(axes)}); kept dense")
            continue
        if kind == "conv_transpose":
            skip("transposed conv: its reduction axis is not axis 1 of the weight; kept dense")
            continue
        if kind == "conv" and c.module.groups != 1:
            skip(
                f"grouped/depthwise conv (groups={c.module.groups}): sparse tensor cores run only "
                "groups=1 convs; kept dense"
            )
            continue
        if kind == "conv" and c.module.padding_mode != "zeros":
            skip(f"padding_mode={c.module.padding_mode!r} (only 'zeros' is lowered); kept dense")
            continue
        if not c.calls and not c.products:
            if c.others:
                skip(f"used only {', '.join(sorted(set(c.others))[:3])}; kept dense")
            else:
                skip("not called by the traced forward (dead code for these inputs); kept dense")
            continue
        if 0 in c.shape:
            skip("zero-size weight")
            continue
        uses = c.use_nodes
        attention = any(roles.feeds_attention(u) for u in uses)
        stem = not attention and any(roles.reads_raw(u) for u in uses)
        if stem and not prune_stem:
            skip(
                "stem layer: reads the raw input (kept dense as in the papers; prune_stem=True "
                "to prune it)"
            )
            continue
        if any(u in roles.to_output for u in uses) and not prune_classifier:
            skip(
                "classifier: its output is the model's output (kept dense as in the papers; "
                "prune_classifier=True to prune it)"
            )
            continue
        if c.others:
            uses = sorted(set(c.others))
            tied = [u for u in uses if "Embedding" in u or "`embedding`" in u]
            reason = (
                f"tied to an embedding ({tied[0]}): a mask would prune the embedding's rows too; "
                "kept dense"
                if tied
                else f"also used by {', '.join(uses[:3])}: a mask would change that use too; "
                "kept dense"
            )
            warn_skip(
                reason,
                f"{kind} `{name}`: {reason}. Untie the weights to prune it, or pass "
                f"exclude=[{c.owner!r}] to silence",
            )
            continue
        axis = axes.pop()
        if pattern is not None and c.shape[axis] % pattern.m:
            what = "input channels" if kind == "conv" else "input features"
            reason = f"{c.shape[axis]} {what}, not a multiple of {pattern.m}"
            warn_skip(
                reason,
                f"{kind} `{name}` has {reason}: excluded from {pattern}; pass "
                f"exclude=[{c.owner!r}] to silence",
            )
            continue
        site = PrunableSite(
            name=c.owner or c.param,  # a parameter of the root module: its own name
            param=c.param,
            kind=kind,
            shape=c.shape,
            group_axis=axis,
            aliases=tuple(dict.fromkeys(x for x in c.callers[1:] if x != c.owner)),
            attr=c.attr,
        )
        sites.append(site)
        for n in c.calls:
            n.meta["nm_site"] = site
        for u in c.products:
            if u.node is None:
                continue
            if u.flops is not None:  # inside an opaque call: the probe counted it
                per_param = site_flops.setdefault(u.node, {})
                per_param[site.param] = per_param.get(site.param, 0.0) + u.flops
            else:
                u.node.meta["nm_site"] = site

    for layer, (cls, shape) in layers.items():
        if layer not in seen_layers and not any(e.name == layer for e in excluded):
            if (include is not None and not _matches(layer, include)) or _matches(layer, exclude):
                continue
            excluded.append(
                ExcludedLayer(
                    layer,
                    cls,
                    shape,
                    "not called by the traced forward (dead code for these inputs); kept dense",
                )
            )
    for node in gm.graph.nodes:  # a re-run forgets what an earlier run decided
        site = node.meta.get("nm_site")
        if site is not None and site not in sites:
            node.meta.pop("nm_site", None)
        if node in site_flops:
            node.meta["nm_site_flops"] = site_flops[node]
        else:
            node.meta.pop("nm_site_flops", None)
    gm.meta["nm_sites"] = sites
    gm.meta["nm_excluded"] = excluded
    # An analysis: it annotates node.meta / gm.meta but changes neither graph nor tensors.
    return PassResult(gm, False)


def get_sites(gm: fx.GraphModule) -> list[PrunableSite]:
    """The sites ``find_sites`` recorded on ``gm`` (empty if it never ran)."""
    return list(gm.meta.get("nm_sites", []))


def get_excluded(gm: fx.GraphModule) -> list[ExcludedLayer]:
    return list(gm.meta.get("nm_excluded", []))
