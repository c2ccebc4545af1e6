"""Check that the weights of any ONNX model satisfy an N:M sparsity pattern.

``check_onnx(path_or_model, pattern)`` returns an :class:`OnnxNMReport` with one
:class:`OnnxNMEntry` per (compute node, constant weight) pair. The rules:

* **N:M** means: in every group of ``m`` consecutive elements along the weight's *reduction axis*
  there are at most ``n`` nonzeros. ``-0.0`` is zero; NaN and inf are nonzero.
* **Which weights.** Only nodes of the default ONNX domain, in the main graph and in nested
  subgraphs (``If``/``Loop``/``Scan`` bodies; outer-scope constants are visible inside them):

  - ``Conv``: input[1], weight ``[K, C/group, *kernel]``, reduction axis 1. The ``group``
    attribute is recorded (``group > 1`` is grouped: not eligible for sparse tensor cores, but it
    is still checked).
  - ``MatMul``: input[1] (B), reduction axis ``-2`` (axis 0 of a 2-D ``[K, N]`` B and of a 1-D B).
  - ``Gemm``: input[1] (B), reduction axis 1 if ``transB == 1`` else 0.

  ``ConvTranspose``, the A operand of ``MatMul``/``Gemm``, and functions in ``model.functions``
  are not checked.
* **Constant** means a graph initializer (also when it is listed as a graph input, as old opsets
  do), a sparse initializer, or the output of a ``Constant`` node, followed backwards through
  ``Identity``, ``Cast``, ``Transpose`` and ``DequantizeLinear`` (input[0] is the quantized
  constant). The chain is then *evaluated forwards* with numpy, so the check sees the values the
  compute node sees: a ``Transpose`` moves the reduction axis (output axis ``a`` is input axis
  ``perm[a]``; no ``perm`` reverses the axes), a ``Cast`` to a narrower type can flush tiny values
  to zero, and ``DequantizeLinear`` maps ``x == zero_point`` to zero (per-tensor, per-axis and
  blocked scales). An entry's ``axis``, ``shape`` and ``dtype`` describe the constant in its own
  layout. Any other producer (a ``Mul``, a ``Reshape``, a graph input, ...) gives status
  ``"not-constant"`` and the operand is not checked.
* **Statuses.** ``"ok"``, ``"violates"`` (``violations`` groups hold more than ``n`` nonzeros),
  ``"not-divisible"`` (the reduction dim is not a multiple of ``m``), ``"not-constant"``, or
  ``"error: <msg>"`` (e.g. external data missing, tensor data that does not match its dims, an
  unsupported data type). Only ``"ok"`` and ``"violates"`` entries count as *checked*.
* **Data types.** Anything ``onnx.numpy_helper.to_array`` reads: float32/16/64, bfloat16, fp8,
  int8/uint8 and other integers, bool. Strings are an error entry.
* **External data** is read lazily, per weight, from beside the model file; a missing or short
  file, or a location outside the model's directory, is an error entry. A ``ModelProto`` passed
  in memory has no directory, so its unloaded external tensors are error entries.
* **Robustness.** Bad files raise :class:`~nmcompile.OnnxFileError` naming the file, what is wrong
  and what to do (missing path, directory, empty, not an ONNX model, truncated). Nothing else
  escapes: every node is analysed under its own guard (a bad node becomes an ``"error: ..."``
  entry), and tensor sizes are validated against ``prod(dims)`` *before* any array is built, so
  a corrupt ``dims`` field cannot allocate huge memory. ``onnx.checker`` and shape inference are
  deliberately not used: the checker must work on files they reject.
* **Speed.** The count is vectorised: the nonzero mask is viewed as
  ``[pre, C/m, m, post]`` and summed over the group axis; no Python loop touches elements.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    SparseTensorProto,
    TensorProto,
    helper,
    numpy_helper,
)

from nmcompile._errors import OnnxFileError
from nmcompile._pattern import NMPattern

__all__ = ["OnnxNMEntry", "OnnxNMReport", "check_onnx"]

CHECKED_OPS: frozenset[str] = frozenset({"Conv", "MatMul", "Gemm"})
_PASS_THROUGH: frozenset[str] = frozenset({"Identity", "Cast", "Transpose", "DequantizeLinear"})
_DEFAULT_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx"})
_MAX_CHAIN = 64  # longest Identity/Cast/Transpose/DequantizeLinear chain followed back
_MAX_PARAM_DEPTH = 4  # DequantizeLinear scale/zero-point resolved this many levels deep
_MAX_DENSE_SPARSE = 1 << 28  # a sparse initializer is densified only up to this many elements
_MAX_LISTED = 5  # violating weights named in summary()

_STATUS_OK = "ok"
_STATUS_VIOLATES = "violates"
_STATUS_NOT_DIVISIBLE = "not-divisible"
_STATUS_NOT_CONSTANT = "not-constant"

# Elements packed below one byte in raw_data (bits per element) and per int32_data entry.
_PACKED_BITS: dict[int, int] = {}
_PER_INT32: dict[int, int] = {}
for _name, _bits, _per in (
    ("INT4", 4, 2),
    ("UINT4", 4, 2),
    ("FLOAT4E2M1", 4, 2),
    ("INT2", 2, 4),
    ("UINT2", 2, 4),
    ("FLOAT6E2M3", 6, 1),
    ("FLOAT6E3M2", 6, 1),
):
    _code = getattr(TensorProto, _name, None)
    if _code is not None:
        _PACKED_BITS[_code] = _bits
        _PER_INT32[_code] = _per

_MODEL_FIELDS: dict[int, str] = {
    1: "ir_version",
    2: "producer_name",
    3: "producer_version",
    4: "domain",
    5: "model_version",
    6: "doc_string",
    7: "graph",
    8: "opset_import",
    14: "metadata_props",
    20: "training_info",
    25: "functions",
    26: "configuration",
}


# ----------------------------------------------------------------------------------------------
# Report types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OnnxNMEntry:
    """One (compute node, constant weight) pair and its N:M verdict.

    ``axis`` is the reduction axis in the constant's own layout (``None`` when the operand is not
    a constant or could not be read); ``groups`` is the number of groups of ``m`` (0 when not
    checked); ``density`` is the nonzero fraction of the weight the node sees (``None`` when
    unknown); ``group`` is the ``Conv`` ``group`` attribute (1 for other ops); ``detail`` says
    why an entry is not-constant and how the constant reaches the node.
    """

    initializer: str
    node: str
    op_type: str
    axis: int | None
    shape: tuple[int, ...]
    dtype: str
    groups: int
    violations: int
    density: float | None
    status: str
    group: int = 1
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == _STATUS_OK

    @property
    def checked(self) -> bool:
        """Whether the pattern was evaluated (status ``"ok"`` or ``"violates"``)."""
        return self.status in (_STATUS_OK, _STATUS_VIOLATES)

    @property
    def grouped(self) -> bool:
        """A grouped conv (``group > 1``): checked, but not eligible for sparse tensor cores."""
        return self.group > 1

    def to_json(self) -> dict[str, Any]:
        return {
            "initializer": self.initializer,
            "node": self.node,
            "op_type": self.op_type,
            "axis": self.axis,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "groups": self.groups,
            "violations": self.violations,
            "density": self.density,
            "status": self.status,
            "group": self.group,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class OnnxNMReport:
    """The N:M verdict for every checkable weight of one ONNX model."""

    path: str
    pattern: NMPattern
    entries: tuple[OnnxNMEntry, ...]
    # What the file says of itself (nmcompile's export metadata): the weights it pruned and the
    # pattern it pruned them to. None for files without that metadata.
    declared: tuple[str, ...] | None = None
    declared_pattern: str | None = None

    @property
    def checked(self) -> list[OnnxNMEntry]:
        return [e for e in self.entries if e.checked]

    @property
    def ok(self) -> bool:
        """Every checked entry satisfies the pattern, and at least one entry was checked."""
        checked = self.checked
        return bool(checked) and all(e.ok for e in checked)

    @property
    def compliant(self) -> list[OnnxNMEntry]:
        return [e for e in self.entries if e.ok]

    @property
    def violating(self) -> list[OnnxNMEntry]:
        return [e for e in self.entries if e.status == _STATUS_VIOLATES]

    def satisfied(self, names: Iterable[str]) -> bool:
        """Whether every entry whose ``initializer`` is in ``names`` is ok.

        A name with no entry at all counts as *not* satisfied: the weight did not reach a checked
        node as a constant (renamed, folded away, or fed through an unsupported op), which is
        exactly what this helper exists to catch.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        seen: set[str] = set()
        for entry in self.entries:
            if entry.initializer in wanted:
                seen.add(entry.initializer)
                if not entry.ok:
                    return False
        return seen == wanted

    @property
    def declared_ok(self) -> bool | None:
        """Whether every weight the file declares as pruned satisfies the checked pattern (None
        when the file declares nothing). Other weights were left dense on purpose."""
        if self.declared is None:
            return None
        return self.satisfied(self.declared)

    def summary(self) -> str:
        """One line, e.g. ``"12/14 weights satisfy 2:4 (2 violate: a (123 of 4096 groups))"``."""
        checked = self.checked
        good = sum(e.ok for e in checked)
        head = f"{good}/{len(checked)} weights satisfy {self.pattern}"
        parts: list[str] = []
        bad = self.violating
        if bad:
            listed = ", ".join(
                f"{e.initializer or e.node} ({e.violations} of {e.groups} groups)"
                for e in bad[:_MAX_LISTED]
            )
            more = f", and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            parts.append(f"{len(bad)} violate: {listed}{more}")
        counts = {
            _STATUS_NOT_DIVISIBLE: f"not divisible by {self.pattern.m}",
            # activations (attention's q @ k^T, p @ v) or weights the file computes at run time
            _STATUS_NOT_CONSTANT: "operands computed at run time (not constant weights)",
        }
        for status, text in counts.items():
            k = sum(e.status == status for e in self.entries)
            if k:
                parts.append(f"{k} {text}")
        errors = [e for e in self.entries if e.status.startswith("error")]
        if errors:
            first = errors[0]
            parts.append(
                f"{len(errors)} unreadable (first: {first.initializer or first.node}: "
                f"{first.status.removeprefix('error: ')})"
            )
        if not self.entries:
            parts.append("no Conv/MatMul/Gemm weights found")
        elif not checked:
            parts.append("no weight could be checked")
        line = head + (f" ({'; '.join(parts)})" if parts else "")
        if self.declared is not None:
            wanted = set(self.declared)
            good_declared = len({e.initializer for e in checked if e.ok} & wanted)
            dense = sorted(
                {
                    e.initializer
                    for e in self.entries
                    if e.initializer and e.status != _STATUS_NOT_CONSTANT
                }
                - wanted
            )
            other = (
                f" (the file was pruned to {self.declared_pattern})"
                if self.declared_pattern != str(self.pattern)
                else ""
            )
            listed = ", ".join(dense[:_MAX_LISTED]) + (", ..." if len(dense) > _MAX_LISTED else "")
            line = (
                f"{good_declared}/{len(wanted)} pruned weights satisfy {self.pattern}{other}"
                + (f"; {len(dense)} left dense by design ({listed})" if dense else "")
                + f". All weights: {line}"
            )
        return line

    def to_markdown(self) -> str:
        """A title line and a table: initializer | op | shape | axis | groups | violations |
        density | status (the summary line is :meth:`summary`)."""
        lines = [
            f"N:M {self.pattern} check of `{self.path}`",
            "",
            "| initializer | op | shape | axis | groups | violations | density | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        computed = [e for e in self.entries if e.status == _STATUS_NOT_CONSTANT]
        for e in self.entries:
            if e.status == _STATUS_NOT_CONSTANT:
                continue  # an activation (attention scores): counted below, not a weight
            op = e.op_type if e.group == 1 else f"{e.op_type} (group={e.group})"
            cells = [
                e.initializer or "—",
                f"{op} `{e.node}`",
                "×".join(str(d) for d in e.shape) if e.shape else "—",
                "—" if e.axis is None else str(e.axis),
                str(e.groups),
                str(e.violations),
                "—" if e.density is None else f"{e.density:.3f}",
                e.status,
            ]
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
        if computed:
            names = ", ".join(f"{e.op_type} `{e.node}`" for e in computed[:_MAX_LISTED])
            more = ", ..." if len(computed) > _MAX_LISTED else ""
            lines += [
                "",
                f"{len(computed)} operand(s) computed at run time are not constant weights and "
                f"were not checked (activations such as attention scores): {names}{more}",
            ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps`` works on it)."""
        return {
            "path": self.path,
            "pattern": str(self.pattern),
            "ok": self.ok,
            "declared": list(self.declared) if self.declared is not None else None,
            "declared_pattern": self.declared_pattern,
            "declared_ok": self.declared_ok,
            "summary": self.summary(),
            "entries": [e.to_json() for e in self.entries],
        }


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def check_onnx(
    path_or_model: str | os.PathLike[str] | ModelProto, pattern: NMPattern | str
) -> OnnxNMReport:
    """Check every Conv/MatMul/Gemm constant weight of an ONNX model against ``pattern``.

    Raises :class:`OnnxFileError` for a path that is not a readable ONNX model; never anything
    else for a malformed file (per-weight problems become ``"error: ..."`` entries).
    """
    nm = NMPattern.parse(pattern)
    if isinstance(path_or_model, ModelProto):
        model, label, base_dir = path_or_model, "<model>", None
    elif isinstance(path_or_model, str | os.PathLike):
        label = _path_label(path_or_model)
        model, base_dir = _load(path_or_model, label)
    else:
        raise TypeError(
            f"check_onnx() takes a path or an onnx.ModelProto, got {type(path_or_model).__name__}"
        )
    try:
        entries = tuple(_Analyzer(model, nm, base_dir).run())
    except Exception as exc:
        raise OnnxFileError(
            f"{label}: could not analyse the model ({type(exc).__name__}: {exc}); the file is "
            "probably corrupt: re-export it"
        ) from exc
    declared, declared_pattern = _declared(model)
    return OnnxNMReport(
        path=label,
        pattern=nm,
        entries=entries,
        declared=declared,
        declared_pattern=declared_pattern,
    )


def _declared(model: ModelProto) -> tuple[tuple[str, ...] | None, str | None]:
    """The pruned weights and pattern nmcompile's exporter wrote into ``metadata_props``; a
    malformed entry is ignored (the file is then checked as any other)."""
    import json

    props = {p.key: p.value for p in model.metadata_props}
    raw = props.get("nmcompile.sparse_weights")
    if raw is None:
        return None, None
    try:
        names = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None, None
    return tuple(names), props.get("nmcompile.pattern")


def _path_label(path: str | os.PathLike[str]) -> str:
    try:
        return os.fsdecode(path)
    except Exception:
        return repr(path)


def _load(path: str | os.PathLike[str], label: str) -> tuple[ModelProto, str]:
    """Read and parse ``path`` as a binary (or text-format) ONNX model."""
    try:
        if not os.path.exists(path):
            raise OnnxFileError(
                f"{label}: no such file; check the path (an ONNX model is a .onnx file)"
            )
        if os.path.isdir(path):
            raise OnnxFileError(
                f"{label}: is a directory, not an ONNX file; pass the path of the .onnx file in it"
            )
        with open(path, "rb") as fh:
            data = fh.read()
    except OnnxFileError:
        raise
    except (OSError, ValueError) as exc:  # permissions, NUL in the path, name too long, ...
        raise OnnxFileError(
            f"{label}: cannot be read ({exc}); check the path and its permissions"
        ) from exc
    if not data:
        raise OnnxFileError(
            f"{label}: file is empty (0 bytes), not an ONNX model; the export or copy that wrote "
            "it did not finish: write it again"
        )
    base_dir = os.path.dirname(os.path.abspath(label))
    model = _parse(data)
    if model is not None and _looks_like_onnx(model):
        return model, base_dir
    text_model = _parse_text(data)
    if text_model is not None:
        return text_model, base_dir
    raise OnnxFileError(f"{label}: {_diagnose(data, parsed=model is not None)}")


def _parse(data: bytes) -> ModelProto | None:
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, TypeError):  # protobuf backends vary
        return None
    return model


def _parse_text(data: bytes) -> ModelProto | None:
    """An ONNX model in protobuf text format (``.textproto``), or None."""
    if b"\0" in data[:4096]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "graph" not in text:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.load_model_from_string(text, format="textproto")
    except Exception:
        return None
    return model if _looks_like_onnx(model) else None


def _looks_like_onnx(model: ModelProto) -> bool:
    """Random bytes (and empty input) can parse as a ModelProto made of unknown fields only."""
    return len(model.graph.node) > 0 or len(model.opset_import) > 0


def _diagnose(data: bytes, *, parsed: bool) -> str:
    """Why ``data`` is not an ONNX model, and what to do, from a walk of its top-level fields."""
    fix_trunc = (
        "the file is truncated (an interrupted export, download or copy); export or copy it again"
    )
    not_onnx = "is not an ONNX model"
    head = data[:24]
    if head.startswith(b"PK\x03\x04"):
        return f"{not_onnx} (it is a zip archive, e.g. a torch.save checkpoint); export the model with torch.onnx.export"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return (
            f"{not_onnx} (it looks like a Python pickle); export the model with torch.onnx.export"
        )
    pos, n, fields = 0, len(data), 0
    while pos < n:
        tag, pos = _varint(data, pos)
        if tag is None:
            return (
                f"{fix_trunc} (it ends inside a field tag at byte {n})"
                if fields
                else _not_onnx_msg(head)
            )
        field, wire = tag >> 3, tag & 7
        name = _MODEL_FIELDS.get(field, f"#{field}")
        if field == 0 or wire in (3, 4, 6, 7):
            return _not_onnx_msg(head)
        if wire == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return (
                    f"{fix_trunc} (it ends inside field '{name}')"
                    if fields
                    else _not_onnx_msg(head)
                )
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > n:
                return (
                    f"{fix_trunc} (it ends inside field '{name}')"
                    if fields
                    else _not_onnx_msg(head)
                )
        else:  # wire == 2, length-delimited
            length, pos = _varint(data, pos)
            if length is None or pos + length > n:
                if fields and name in _MODEL_FIELDS.values():
                    need = "?" if length is None else str(length)
                    return (
                        f"{fix_trunc} (field '{name}' declares {need} bytes at byte {pos} "
                        f"but the file has {n} bytes)"
                    )
                return _not_onnx_msg(head)
            pos += length
        fields += 1
    if parsed:
        return (
            f"{not_onnx}: it parses as a protobuf message but has no graph nodes and no "
            "opset_import (the bytes are not an ONNX export); pass the .onnx file written by "
            "torch.onnx.export or onnx.save"
        )
    return (
        f"{not_onnx}, or it is corrupted: the protobuf parser rejects a nested message; "
        "export or copy the model again"
    )


def _not_onnx_msg(head: bytes) -> str:
    return (
        f"is not an ONNX model (not a binary ONNX protobuf; it starts with {head[:16]!r}); "
        "pass the .onnx file written by torch.onnx.export or onnx.save"
    )


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


class _NotConstant(Exception):
    """The operand is not a constant; the message says what produces it."""


class _EntryError(Exception):
    """A problem with one weight; becomes an ``"error: ..."`` entry."""


@dataclass(frozen=True, slots=True)
class _Source:
    """The constant at the start of a chain: its value name and where its data lives."""

    name: str
    kind: str  # "tensor" | "sparse" | "attr"
    proto: Any  # TensorProto, SparseTensorProto, or the Constant NodeProto


_Scope = dict[str, tuple[str, Any]]


class _Analyzer:
    def __init__(self, model: ModelProto, pattern: NMPattern, base_dir: str | None) -> None:
        self.model = model
        self.pattern = pattern
        self.base_dir = base_dir

    def run(self) -> Iterator[OnnxNMEntry]:
        yield from self._graph(self.model.graph, [], "")

    # -- graph walk --------------------------------------------------------------------------

    def _graph(self, graph: GraphProto, outer: list[_Scope], prefix: str) -> Iterator[OnnxNMEntry]:
        scope: _Scope = {}
        for value in graph.input:
            scope[value.name] = ("input", value)
        for tensor in graph.initializer:
            scope[tensor.name] = ("tensor", tensor)
        for sparse in graph.sparse_initializer:
            scope[sparse.values.name] = ("sparse", sparse)
        for node in graph.node:
            for out in node.output:
                if out:
                    scope[out] = ("node", node)
        scopes = [scope, *outer]
        for index, node in enumerate(graph.node):
            label = prefix + (_s(node.name) or f"{_s(node.op_type)}_{index}")
            if node.domain in _DEFAULT_DOMAINS and node.op_type in CHECKED_OPS:
                yield self._entry(node, label, scopes)
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    yield from self._graph(attr.g, scopes, f"{label}/{_s(attr.name)}/")
                elif attr.type == AttributeProto.GRAPHS:
                    for k, sub in enumerate(attr.graphs):
                        yield from self._graph(sub, scopes, f"{label}/{_s(attr.name)}[{k}]/")

    def _entry(self, node: NodeProto, label: str, scopes: list[_Scope]) -> OnnxNMEntry:
        op = node.op_type
        operand = node.input[1] if len(node.input) > 1 else ""
        group = 1
        base = {"initializer": _s(operand), "node": label, "op_type": op}
        try:
            if op == "Conv":
                group = int(_attr(node, "group", 1))
            if not operand:
                raise _EntryError(f"{op} node has no weight input (input[1])")
            source, chain = self._resolve(operand, scopes)
        except _NotConstant as exc:
            return _blank(base, _STATUS_NOT_CONSTANT, group, str(exc))
        except Exception as exc:
            return _blank(base, _error(exc), group)
        base["initializer"] = _s(source.name)
        shape: tuple[int, ...] = ()
        dtype = ""
        axis: int | None = None
        try:
            array = self._array(source)
            shape, dtype = tuple(int(d) for d in array.shape), _dtype_name(source, array)
            value, chain_note = self._forward(array, chain, scopes)
            final_axis = _reduction_axis(node, value.ndim)
            axis = _axis_back(final_axis, chain, value.ndim)
            groups, violations, density, status = _count(value, final_axis, self.pattern)
        except Exception as exc:
            return OnnxNMEntry(
                initializer=base["initializer"],
                node=label,
                op_type=op,
                axis=axis,
                shape=shape,
                dtype=dtype,
                groups=0,
                violations=0,
                density=None,
                status=_error(exc),
                group=group,
                detail=_chain_text(chain),
            )
        return OnnxNMEntry(
            initializer=base["initializer"],
            node=label,
            op_type=op,
            axis=axis,
            shape=shape,
            dtype=dtype,
            groups=groups,
            violations=violations,
            density=density,
            status=status,
            group=group,
            detail=chain_note,
        )

    # -- following the operand back to a constant ---------------------------------------------

    def _resolve(self, name: str, scopes: list[_Scope]) -> tuple[_Source, list[NodeProto]]:
        """The constant behind ``name`` and the pass-through nodes from it to ``name``
        (in forward order)."""
        chain: list[NodeProto] = []
        seen: set[str] = set()
        current = name
        while True:
            if current in seen or len(chain) > _MAX_CHAIN:
                raise _NotConstant(
                    f"'{name}' is produced by a cycle or an over-long chain of nodes"
                )
            seen.add(current)
            found = _lookup(current, scopes)
            if found is None:
                raise _NotConstant(f"'{current}' has no producer in the graph")
            kind, obj = found
            if kind == "tensor":
                return _Source(current, "tensor", obj), chain[::-1]
            if kind == "sparse":
                return _Source(current, "sparse", obj), chain[::-1]
            if kind == "input":
                raise _NotConstant(f"'{current}' is a graph input")
            node: NodeProto = obj
            node_label = _s(node.name) or _s(node.op_type)
            if node.domain not in _DEFAULT_DOMAINS:
                raise _NotConstant(
                    f"'{current}' comes from {node.domain}::{node.op_type} '{node_label}'"
                )
            if node.op_type == "Constant":
                return _Source(current, "attr", node), chain[::-1]
            if (
                node.op_type in _PASS_THROUGH
                and node.input
                and node.input[0]
                and node.output[0] == current
            ):
                chain.append(node)
                current = node.input[0]
                continue
            raise _NotConstant(f"'{current}' is computed by {node.op_type} node '{node_label}'")

    def _constant_value(self, name: str, scopes: list[_Scope], depth: int) -> np.ndarray:
        """The evaluated value of a constant input (a DequantizeLinear scale or zero point)."""
        if depth > _MAX_PARAM_DEPTH:
            raise _EntryError(f"'{name}' is nested too deeply")
        source, chain = self._resolve(name, scopes)
        value, _ = self._forward(self._array(source), chain, scopes, depth + 1)
        return value

    # -- reading constants -------------------------------------------------------------------

    def _array(self, source: _Source) -> np.ndarray:
        # Not cached: holding every weight of a large model would double its memory.
        if source.kind == "tensor":
            return self._tensor(source.proto)
        if source.kind == "sparse":
            return self._sparse(source.proto)
        return self._constant_node(source.proto)

    def _tensor(self, tensor: TensorProto) -> np.ndarray:
        numel = _numel(tensor.dims)
        dt = tensor.data_type
        if dt in (TensorProto.UNDEFINED, TensorProto.STRING):
            kind = "undefined" if dt == TensorProto.UNDEFINED else "string"
            raise _EntryError(f"tensor '{tensor.name}' has {kind} data type; cannot check it")
        try:
            np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dt))
        except Exception as exc:
            raise _EntryError(f"tensor '{tensor.name}' has unknown data type {dt}") from exc
        if tensor.HasField("segment"):
            raise _EntryError(f"tensor '{tensor.name}' is segmented; segments are not supported")
        bits = _PACKED_BITS.get(dt, np_dtype.itemsize * 8)
        need_bytes = -(-numel * bits // 8)
        if tensor.data_location == TensorProto.EXTERNAL:
            raw = self._external(tensor, need_bytes)
            tensor = TensorProto(name=tensor.name, dims=tensor.dims, data_type=dt, raw_data=raw)
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) != need_bytes:
                raise _EntryError(
                    f"tensor '{tensor.name}' has {len(tensor.raw_data)} bytes of data but dims "
                    f"{list(tensor.dims)} of {helper.tensor_dtype_to_string(dt)} need {need_bytes}"
                )
        else:
            field = helper.tensor_dtype_to_field(dt)
            have = len(getattr(tensor, field))
            per = _PER_INT32.get(dt, 1)
            need = -(-numel // per) * (
                2 if dt in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
            )
            if have != need:
                raise _EntryError(
                    f"tensor '{tensor.name}' has {have} values in {field} but dims "
                    f"{list(tensor.dims)} need {need}"
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = np.asarray(numpy_helper.to_array(tensor))
        except Exception as exc:
            raise _EntryError(f"cannot read tensor '{tensor.name}': {exc}") from exc
        if tuple(array.shape) != tuple(tensor.dims):
            raise _EntryError(
                f"tensor '{tensor.name}' decodes to shape {array.shape}, not {list(tensor.dims)}"
            )
        return array

    def _external(self, tensor: TensorProto, need: int) -> bytes:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name
        if self.base_dir is None:
            raise _EntryError(
                f"'{name}' stores its data externally ('{location}') but the model was passed in "
                "memory; pass the .onnx path so the data can be found beside it"
            )
        if not location:
            raise _EntryError(f"'{name}' is marked external but has no location")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as exc:
            raise _EntryError(f"'{name}' has a malformed external offset/length: {exc}") from exc
        if offset < 0 or (length is not None and length != need):
            raise _EntryError(
                f"'{name}' external data has offset {offset} and length {length}, but its dims "
                f"need {need} bytes"
            )
        root = os.path.realpath(self.base_dir)
        target = os.path.realpath(os.path.join(root, location))
        if os.path.isabs(location) or os.path.commonpath([root, target]) != root:
            raise _EntryError(
                f"'{name}' external location '{location}' is outside the model's directory"
            )
        if not os.path.isfile(target):
            raise _EntryError(
                f"external data file '{location}' for '{name}' is missing; copy it next to the "
                f"model in {root}"
            )
        size = os.path.getsize(target)
        if offset + need > size:
            raise _EntryError(
                f"external data file '{location}' has {size} bytes; '{name}' needs bytes "
                f"{offset}..{offset + need}: the file is truncated or belongs to another export"
            )
        with open(target, "rb") as fh:
            fh.seek(offset)
            data = fh.read(need)
        if len(data) != need:
            raise _EntryError(f"short read of external data file '{location}' for '{name}'")
        return data

    def _sparse(self, sparse: SparseTensorProto) -> np.ndarray:
        numel = _numel(sparse.dims)
        if numel > _MAX_DENSE_SPARSE:
            raise _EntryError(
                f"sparse tensor '{sparse.values.name}' of {numel} elements is too large to check"
            )
        values = self._tensor(sparse.values).reshape(-1)
        indices = self._tensor(sparse.indices).astype(np.int64, copy=False)
        dims = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(dims, dtype=values.dtype)
        if values.size == 0:
            return dense
        if indices.ndim == 1 and indices.size == values.size:
            flat = indices
        elif indices.ndim == 2 and indices.shape == (values.size, len(dims)):
            if (indices < 0).any() or (indices >= np.array(dims, dtype=np.int64)).any():
                raise _EntryError(f"sparse tensor '{sparse.values.name}' has out-of-range indices")
            flat = np.ravel_multi_index(tuple(indices.T), dims)
        else:
            raise _EntryError(
                f"sparse tensor '{sparse.values.name}' indices have shape {indices.shape}"
            )
        if (flat < 0).any() or (flat >= numel).any():
            raise _EntryError(f"sparse tensor '{sparse.values.name}' has out-of-range indices")
        dense.reshape(-1)[flat] = values
        return dense

    def _constant_node(self, node: NodeProto) -> np.ndarray:
        for attr in node.attribute:
            if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                return self._tensor(attr.t)
            if attr.name == "sparse_value" and attr.type == AttributeProto.SPARSE_TENSOR:
                return self._sparse(attr.sparse_tensor)
            if attr.name == "value_float" and attr.type == AttributeProto.FLOAT:
                return np.asarray(attr.f, dtype=np.float32)
            if attr.name == "value_floats" and attr.type == AttributeProto.FLOATS:
                return np.asarray(attr.floats, dtype=np.float32)
            if attr.name == "value_int" and attr.type == AttributeProto.INT:
                return np.asarray(attr.i, dtype=np.int64)
            if attr.name == "value_ints" and attr.type == AttributeProto.INTS:
                return np.asarray(attr.ints, dtype=np.int64)
        raise _EntryError(
            f"Constant node '{node.name or node.output[0]}' has no numeric value attribute"
        )

    # -- evaluating the chain ----------------------------------------------------------------

    def _forward(
        self, array: np.ndarray, chain: Sequence[NodeProto], scopes: list[_Scope], depth: int = 0
    ) -> tuple[np.ndarray, str]:
        value = array
        for node in chain:
            if node.op_type == "Transpose":
                value = np.transpose(value, _perm(node, value.ndim))
            elif node.op_type == "Cast":
                value = _cast(value, int(_attr(node, "to", 0)))
            elif node.op_type == "DequantizeLinear":
                value = self._dequantize(node, value, scopes, depth)
            # Identity: unchanged
        return value, _chain_text(chain)

    def _dequantize(
        self, node: NodeProto, x: np.ndarray, scopes: list[_Scope], depth: int
    ) -> np.ndarray:
        if len(node.input) < 2 or not node.input[1]:
            raise _EntryError("DequantizeLinear has no scale input")
        axis = int(_attr(node, "axis", 1))
        block = int(_attr(node, "block_size", 0))
        if x.ndim:
            if not -x.ndim <= axis < x.ndim:
                raise _EntryError(f"DequantizeLinear axis {axis} out of range for rank {x.ndim}")
            axis %= x.ndim
        try:
            scale = self._constant_value(node.input[1], scopes, depth)
        except _NotConstant:
            scale = None  # unknown scale: assume nonzero, zero-ness follows x == zero_point
        zero = None
        if len(node.input) > 2 and node.input[2]:
            try:
                zero = self._constant_value(node.input[2], scopes, depth)
            except _NotConstant as exc:
                raise _EntryError(f"DequantizeLinear zero point is not a constant: {exc}") from exc
        if x.dtype.kind in "iub":
            diff: np.ndarray = x.astype(np.int64)
            if zero is not None:
                diff = diff - _broadcast_param(zero, x.shape, axis, block).astype(np.int64)
        else:
            with np.errstate(all="ignore"):
                diff = x.astype(np.float32)
                if zero is not None:
                    diff = diff - _broadcast_param(zero, x.shape, axis, block).astype(np.float32)
        if scale is None:
            return diff
        out_code = int(_attr(node, "output_dtype", 0))
        out_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(out_code)) if out_code else scale.dtype
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = diff.astype(np.float32) * _broadcast_param(scale, x.shape, axis, block).astype(
                np.float32
            )
            return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _s(value: str | bytes) -> str:
    """protobuf hands back ``bytes`` for a string field holding invalid UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _lookup(name: str, scopes: list[_Scope]) -> tuple[str, Any] | None:
    for scope in scopes:
        found = scope.get(name)
        if found is not None:
            return found
    return None


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            if isinstance(default, int) and not isinstance(value, int):
                raise _EntryError(f"attribute {name} of {node.op_type} is {value!r}, not an int")
            return value
    return default


def _numel(dims: Iterable[int]) -> int:
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise _EntryError(f"negative dims {dims}")
    return math.prod(dims)


def _perm(node: NodeProto, ndim: int) -> list[int]:
    perm = _attr(node, "perm", None)
    if perm is None:
        return list(range(ndim))[::-1]
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(ndim)):
        raise _EntryError(f"Transpose perm {perm} is not a permutation of rank {ndim}")
    return perm


def _cast(value: np.ndarray, to: int) -> np.ndarray:
    if to in (TensorProto.UNDEFINED, TensorProto.STRING):
        raise _EntryError(
            f"Cast to {helper.tensor_dtype_to_string(to) if to else 'UNDEFINED'} is not numeric"
        )
    try:
        target = np.dtype(helper.tensor_dtype_to_np_dtype(to))
    except Exception as exc:
        raise _EntryError(f"Cast to unknown data type {to}") from exc
    if target == np.bool_:
        return value != 0
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return value.astype(target)


def _broadcast_param(
    param: np.ndarray, shape: tuple[int, ...], axis: int, block: int
) -> np.ndarray:
    """A DequantizeLinear scale/zero point, broadcastable against ``x`` of ``shape``."""
    if param.size == 1:
        return param.reshape(())
    if block <= 0 and param.ndim == 1 and len(shape) > axis and param.shape[0] == shape[axis]:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return param.reshape(view)
    if block > 0 and param.ndim == len(shape) and len(shape) > axis:
        expected = list(shape)
        expected[axis] = -(-shape[axis] // block)
        if list(param.shape) == expected:
            # Index rather than np.repeat: a huge block_size must not allocate anything big.
            return np.take(param, np.arange(shape[axis]) // block, axis=axis)
    raise _EntryError(
        f"DequantizeLinear parameter of shape {param.shape} does not fit input {shape} "
        f"(axis={axis}, block_size={block})"
    )


def _reduction_axis(node: NodeProto, ndim: int) -> int:
    op = node.op_type
    if ndim == 0:
        raise _EntryError(f"the {op} weight is a scalar; it has no reduction axis")
    if op == "Conv":
        if ndim < 2:
            raise _EntryError(f"the Conv weight has rank {ndim}; expected [K, C/group, *kernel]")
        return 1
    if op == "Gemm":
        if ndim != 2:
            raise _EntryError(f"the Gemm B operand has rank {ndim}; expected 2")
        return 1 if int(_attr(node, "transB", 0)) else 0
    return 0 if ndim == 1 else ndim - 2  # MatMul


def _axis_back(axis: int, chain: Sequence[NodeProto], ndim: int) -> int:
    """Map the reduction axis of the operand back to the constant's own layout."""
    for node in reversed(chain):
        if node.op_type == "Transpose":
            axis = _perm(node, ndim)[axis]
    return axis


def _count(value: np.ndarray, axis: int, pattern: NMPattern) -> tuple[int, int, float, str]:
    """(groups, violations, density, status) for ``value`` grouped along ``axis``."""
    if value.dtype.kind in "OSUM" or value.dtype.fields is not None:
        raise _EntryError(f"weight of dtype {value.dtype} is not numeric")
    nonzero = value if value.dtype == np.bool_ else value != 0
    total = nonzero.size
    nnz = int(np.count_nonzero(nonzero))
    density = nnz / total if total else 0.0
    size = value.shape[axis]
    if size % pattern.m:
        return 0, 0, density, _STATUS_NOT_DIVISIBLE
    pre = math.prod(value.shape[:axis])
    post = math.prod(value.shape[axis + 1 :])
    groups = nonzero.reshape(pre, size // pattern.m, pattern.m, post)
    counts = groups.sum(axis=2, dtype=np.uint8)
    violations = int(np.count_nonzero(counts > pattern.n))
    status = _STATUS_VIOLATES if violations else _STATUS_OK
    return int(counts.size), violations, density, status


def _dtype_name(source: _Source, array: np.ndarray) -> str:
    proto = source.proto
    code = None
    if source.kind == "tensor":
        code = proto.data_type
    elif source.kind == "sparse":
        code = proto.values.data_type
    if code:
        try:
            return str(np.dtype(helper.tensor_dtype_to_np_dtype(code)))
        except Exception:
            return TensorProto.DataType.Name(code).lower()
    return str(array.dtype)


def _chain_text(chain: Sequence[NodeProto]) -> str:
    if not chain:
        return ""
    return "via " + " -> ".join(n.op_type for n in chain)


def _error(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if not isinstance(exc, _EntryError | _NotConstant):
        msg = f"{type(exc).__name__}: {msg}"
    return f"error: {msg[:300]}"


def _blank(base: dict[str, str], status: str, group: int, detail: str = "") -> OnnxNMEntry:
    return OnnxNMEntry(
        initializer=base["initializer"],
        node=base["node"],
        op_type=base["op_type"],
        axis=None,
        shape=(),
        dtype="",
        groups=0,
        violations=0,
        density=None,
        status=status,
        group=group,
        detail=detail,
    )
