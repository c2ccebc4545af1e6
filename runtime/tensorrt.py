"""TensorRT engines with 2:4 sparse weights (TensorRT 10.x and 11.x Python API).

``build_engine(onnx, plan, sparse=True)`` parses the ONNX file, sets
``BuilderFlag.SPARSE_WEIGHTS`` and detailed profiling verbosity, builds and serialises the plan
(atomically), and reports per layer whether it was *eligible* for 2:4 (nmcompile's own N:M check
of the constant weight in the ONNX file) and whether TensorRT actually *picked* a sparse tactic
(engine inspector JSON, plus TensorRT's own "(Sparsity)" log lines). TensorRT times sparse and
dense tactics and keeps the faster, so eligible-but-dense is normal for small layers.

Precision comes from the ONNX dtypes. TensorRT 11 is always strongly typed and has no FP16
builder flag: export the ONNX in fp16 (``CompileResult.export_onnx(path, dtype=torch.float16)``)
for sparse tensor cores. On TensorRT 10 an fp16 file is built strongly typed too; ``fp16=True``
(weak typing, 10.x only) lets TensorRT pick fp16 kernels for an fp32 file.

An fp32 file built with ``sparse=True`` runs no 2:4 kernel: sparse tensor cores take fp16, bf16,
int8 or fp8 inputs, TensorRT 11 keeps an fp32 network in fp32, and TensorRT 10 without
``fp16=True`` runs it in fp32/TF32 (TensorRT's sparsity guide asks for FP16 or INT8 precision;
TF32 is not among them). ``build_engine`` warns (``NMCompileWarning``) and records the reason
in ``EngineBuild.notes`` rather than let an all-dense engine pass for a sparse one.

TensorRT keeps the first ``ILogger`` a process gives it and ignores every later one, so the
module owns one logger, created on first use and shared by every Builder, OnnxParser and
Runtime. It drops VERBOSE messages at once (recording them slows a build), forwards WARNING
and ERROR to Python logging (``nmcompile.tensorrt``), and lets ``build_engine`` capture just
the messages of its own build, which hold TensorRT's "(Sparsity)" report.

``TrtRunner`` enqueues on its own CUDA stream (``runner.stream``) and orders it against the
caller's stream both ways, so a timing harness can record events on it and outputs are safe to
read on the caller's stream.

``tensorrt`` is imported lazily; without it every entry point raises ``TensorRTNotAvailable``
naming the package and how to install it. ``trtexec_command`` gives the equivalent command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcompile._errors import ConfigError, NMCompileError, NMCompileWarning, OnnxFileError
from nmcompile._io import atomic_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "EngineBuild",
    "TensorRTNotAvailable",
    "TrtLayer",
    "TrtRunner",
    "build_engine",
    "onnx_node_order",
    "parse_engine_info",
    "parse_sparsity_log",
    "sparsity_report",
    "trtexec_command",
]

_INSTALL = (
    "TensorRT's Python package `tensorrt` is not installed. It is not on PyPI proper: on a machine "
    "with an NVIDIA GPU run `pip install --extra-index-url https://pypi.nvidia.com tensorrt` "
    "(or use an NGC TensorRT container); `pip install 'nmcompile[gpu]'` asks for it too. "
    "Without it, export the ONNX file and use `trtexec` (see trtexec_command())."
)


class TensorRTNotAvailable(NMCompileError, ImportError):
    """The ``tensorrt`` package is missing (or cannot find a GPU)."""


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTNotAvailable(_INSTALL) from exc
    return trt


def trt_major(trt: Any) -> int:
    return int(str(getattr(trt, "__version__", "10")).split(".")[0])


# -- the process's one TensorRT logger -------------------------------------------------------------
# ILogger::Severity values (NvInferRuntimeBase.h, unchanged since TensorRT 5); the Python enum
# is bound with py::arithmetic, so int(severity) gives them.
_INTERNAL_ERROR, _ERROR, _WARNING, _INFO = 0, 1, 2, 3
_RECENT = 500  # messages kept for error reports: a long-lived process must not grow without end
# TensorRT's INFO is hundreds of lines a build: Python DEBUG, so an app logging at INFO stays quiet
_PY_LEVEL = {
    _INTERNAL_ERROR: logging.CRITICAL,
    _ERROR: logging.ERROR,
    _WARNING: logging.WARNING,
    _INFO: logging.DEBUG,
}
_log = logging.getLogger("nmcompile.tensorrt")
_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def _trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger (a ``trt.ILogger``), created on first use.

    TensorRT keeps the first logger a process hands to a Builder, Runtime or Refitter and
    ignores later ones: with a logger per build and another per runner, a build after a
    ``TrtRunner`` logged into the runner's and its "(Sparsity)" report came back empty. It is a
    module global also because TensorRT holds a raw pointer to it for the life of the process.
    """
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = _make_logger(trt)
        return _LOGGER


def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):
        """Keeps INFO and above: the last ``_RECENT`` messages, and every message while a
        ``capture()`` is open. VERBOSE is dropped on arrival."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()  # TensorRT calls log() from its own threads
            self.recent: deque[tuple[int, str]] = deque(maxlen=_RECENT)
            self._captures: list[list[tuple[int, str]]] = []

        def log(self, severity: Any, msg: str) -> None:
            # called from C++ inside a noexcept function: an exception escaping here would
            # terminate the process, so none may
            with contextlib.suppress(Exception):
                level = int(severity)
                if level > _INFO:
                    return
                text = str(msg)
                with self._lock:
                    self.recent.append((level, text))
                    for sink in self._captures:
                        sink.append((level, text))
                _log.log(_PY_LEVEL.get(level, logging.ERROR), "TensorRT: %s", text)

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[tuple[int, str]]]:
            """``(severity, message)`` pairs logged while the block runs, from any thread:
            TensorRT's log has no owner, so two builds at once see each other's lines."""
            sink: list[tuple[int, str]] = []
            with self._lock:
                self._captures.append(sink)
            try:
                yield sink
            finally:
                with self._lock:
                    self._captures = [c for c in self._captures if c is not sink]

    return _Logger()


def _errors(messages: Sequence[tuple[int, str]], last: int = 5) -> str:
    """The error lines of ``messages`` (else its last lines), for an exception message."""
    errors = [text for level, text in messages if level <= _ERROR]
    return "; ".join((errors or [text for _, text in messages])[-last:]) or "no message logged"


# -- engine inspector / log parsing (pure, testable without TensorRT) ----------------------------
@dataclass(frozen=True)
class TrtLayer:
    """One layer of a built engine, from the engine inspector.

    ``sparse`` says whether TensorRT *runs* a sparse kernel: the tactic name says so (sparse
    tactics are named ``..._sparse_...``); None when the JSON has no tactic (names-only
    verbosity, reformat layers). ``has_sparse_weights`` is the inspector's ``HasSparseWeights``:
    the weights qualify, which does not mean a sparse tactic won the timing (seen in real dumps
    with a dense tactic next to ``HasSparseWeights: 1``).
    """

    name: str
    layer_type: str | None
    tactic: str | None
    sparse: bool | None
    has_sparse_weights: bool | None = None
    dtypes: tuple[str, ...] = ()


def _tensor_dtype(entry: Mapping[str, Any]) -> str | None:
    # 10.x: "Format/Datatype": "Row major linear FP16 format"; 11.x split it into "Format" and
    # "Datatype" (layer tensors) / "DataType" (I/O tensor objects).
    for key in ("Datatype", "DataType"):
        if key in entry:
            return str(entry[key])
    text = str(entry.get("Format/Datatype", ""))
    for token in ("FP32", "FP16", "BF16", "FP8", "INT8", "INT32", "INT64", "Float", "Half"):
        if token in text:
            return token
    return None


def parse_engine_info(info: str | Mapping[str, Any]) -> tuple[list[TrtLayer], list[str]]:
    """Layers and I/O tensor names from ``EngineInspector.get_engine_information(JSON)``.

    Accepts both schemas: 10.x (``"Bindings"``: a list of names, layer tensors with
    ``"Format/Datatype"``) and 11.x (``"I/O Tensors"``: objects with ``"Name"``, layer tensors
    with separate ``"Format"`` / ``"Datatype"``), and the names-only form (``"Layers"`` as
    strings) that lower profiling verbosity gives.
    """
    data = json.loads(info) if isinstance(info, str) else dict(info)
    layers = []
    for raw in data.get("Layers", []):
        if isinstance(raw, str):
            layers.append(TrtLayer(raw, None, None, None))
            continue
        tactic = raw.get("TacticName")
        sparse = None if not tactic else "sparse" in str(tactic).lower()
        has = raw.get("HasSparseWeights")
        has_sparse = None if has is None else bool(int(has))
        dtypes = tuple(
            d
            for d in (_tensor_dtype(e) for e in raw.get("Inputs", []) if isinstance(e, Mapping))
            if d
        )
        layers.append(
            TrtLayer(
                str(raw.get("Name", "")),
                raw.get("LayerType"),
                None if tactic is None else str(tactic),
                sparse,
                has_sparse,
                dtypes,
            )
        )
    if "I/O Tensors" in data:
        io = [str(t.get("Name")) for t in data["I/O Tensors"] if isinstance(t, Mapping)]
    else:
        io = [str(n) for n in data.get("Bindings", [])]
    return layers, io


_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$")


def parse_sparsity_log(messages: Iterable[str]) -> dict[str, list[str]]:
    """TensorRT's own 2:4 log lines: layers it found eligible and layers it ran sparse."""
    out: dict[str, list[str]] = {"eligible": [], "picked": []}
    for msg in messages:
        for key, pattern in (("eligible", _ELIGIBLE), ("picked", _PICKED)):
            m = pattern.search(msg.strip())
            if m:
                out[key] += [s.strip() for s in m.group(1).split(",") if s.strip()]
    return out


_FOREIGN = re.compile(r"\{ForeignNode\[(.+?)\.\.\.(.+?)\]\}")


def _names_node(layer_name: str, node: str) -> bool:
    """Whether ``node`` appears in ``layer_name`` as a whole name: ``node_Conv_1`` must not
    match inside ``node_Conv_12`` (exporters number nodes)."""
    return re.search(rf"(?<![\w.]){re.escape(node)}(?![\w.])", layer_name) is not None


def sparsity_report(
    nm_report: Any,
    layers: Sequence[TrtLayer],
    log: Mapping[str, list[str]] | None = None,
    node_order: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Join nmcompile's per-weight N:M check of the ONNX file with the engine's layers.

    A TensorRT layer name contains the ONNX node names it was built from (fused layers join them
    with ``" + "``), so each checked weight is matched to the layer whose name holds its node as
    a whole name. Transformer blocks that TensorRT hands to its Myelin compiler become one layer
    ``{ForeignNode[first...last]}`` naming only the first and last ONNX node of the range; given
    the file's ``node_order``, the nodes in between are matched to it, with ``opaque`` set: the
    inspector reports no tactic per operation inside it, so whether 2:4 kernels ran there is
    unknown (``sparse_picked`` None), not "dense".
    """
    picked_log = set((log or {}).get("picked", []))
    position = {name: i for i, name in enumerate(node_order or ())}
    ranges = []
    for layer in layers:
        m = _FOREIGN.search(layer.name)
        if m and m.group(1) in position and m.group(2) in position:
            ranges.append((position[m.group(1)], position[m.group(2)], layer))
    rows = []
    for entry in nm_report.entries:
        if entry.status == "not-constant":
            continue
        node = entry.node
        # exact or fused-part match first ("a + b"), then the name anywhere as a whole word
        match = next(
            (layer for layer in layers if node and node in re.split(r"\s*\+\s*", layer.name)),
            None,
        )
        if match is None and node:
            match = next((layer for layer in layers if _names_node(layer.name, node)), None)
        opaque = False
        if match is None and node in position:
            i = position[node]
            match = next((layer for lo, hi, layer in ranges if lo <= i <= hi), None)
            opaque = match is not None
        sparse = None if opaque else (match.sparse if match else None)
        if match and match.name in picked_log:
            sparse = True
        rows.append(
            {
                "onnx_node": node,
                "weight": entry.initializer,
                "op": entry.op_type,
                "shape": list(entry.shape),
                "eligible_2_4": entry.ok,
                "trt_layer": match.name if match else None,
                "tactic": match.tactic if match else None,
                "sparse_picked": sparse,
                "opaque": opaque,
            }
        )
    return rows


def onnx_node_order(onnx_path: str | os.PathLike) -> list[str]:
    """The node names of an ONNX file's main graph in file (topological) order."""
    import onnx

    return [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]


# -- build -----------------------------------------------------------------------------------------
@dataclass
class EngineBuild:
    engine_path: Path
    onnx_path: Path
    trt_version: str
    sparse: bool
    build_s: float
    layers: list[TrtLayer]
    io_tensors: list[str]
    sparsity_log: dict[str, list[str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""
    # why this engine may run fewer sparse kernels than its weights allow (e.g. an fp32 file)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """The same as :meth:`to_markdown` (the name ``CompileResult.build_engine`` documents)."""
        return self.to_markdown()

    def to_markdown(self) -> str:
        from nmcompile._report import md_table

        eligible = sum(1 for r in self.rows if r["eligible_2_4"])
        picked = sum(1 for r in self.rows if r["eligible_2_4"] and r["sparse_picked"])
        opaque = sum(1 for r in self.rows if r["eligible_2_4"] and r.get("opaque"))
        lines = [
            f"TensorRT {self.trt_version} engine `{self.engine_path}` from `{self.onnx_path}` "
            f"(sparse weights {'on' if self.sparse else 'off'}, built in {self.build_s:.1f} s): "
            f"{eligible} weights eligible for 2:4, {picked} of them run a sparse tactic"
            + (
                f", {opaque} inside Myelin-compiled blocks whose tactics the inspector does not "
                "show (sparse tactic: unknown)"
                if opaque
                else ""
            )
            + ".",
            *(f"\nNote: {note}" for note in self.notes),
            "",
            md_table(
                ["ONNX node", "weight", "op", "eligible 2:4", "TensorRT layer", "sparse tactic"],
                [
                    [
                        r["onnx_node"],
                        r["weight"],
                        r["op"],
                        r["eligible_2_4"],
                        r["trt_layer"],
                        "unknown (Myelin)" if r.get("opaque") else r["sparse_picked"],
                    ]
                    for r in self.rows
                ],
            ),
            "",
            f"Equivalent command: `{self.command}`",
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "engine_path": str(self.engine_path),
            "onnx_path": str(self.onnx_path),
            "trt_version": self.trt_version,
            "sparse": self.sparse,
            "build_s": self.build_s,
            "layers": [asdict(layer) for layer in self.layers],
            "io_tensors": self.io_tensors,
            "sparsity_log": self.sparsity_log,
            "rows": self.rows,
            "command": self.command,
            "notes": self.notes,
        }


def _onnx_precision(onnx_path: Path) -> tuple[str, bool]:
    """('fp16' | 'bf16' | 'fp32', quantized): the dtype of the model's floating-point
    initializers, and whether the file is quantized (int8 / fp8 initializers or Q/DQ nodes),
    whose weights sparse tensor cores take whatever the float dtype around them."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kinds = {init.data_type for init in model.graph.initializer}
    T = onnx.TensorProto
    low = {T.INT8, T.UINT8} | {
        getattr(T, name) for name in ("FLOAT8E4M3FN", "FLOAT8E5M2") if hasattr(T, name)
    }
    quantized = bool(kinds & low) or any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node
    )
    if T.FLOAT16 in kinds:
        return "fp16", quantized
    if T.BFLOAT16 in kinds:
        return "bf16", quantized
    return "fp32", quantized


def _onnx_float_dtype(onnx_path: Path) -> str:
    """'fp16', 'bf16' or 'fp32': the dtype of the model's floating-point initializers."""
    return _onnx_precision(onnx_path)[0]


def _dense_fp32_note(onnx_path: Path, trt_version: str, major: int) -> str:
    """Why an fp32 file built with sparse weights gets no 2:4 kernel, and the fix."""
    fix = (
        "export the model in fp16 (`result.export_onnx(path, dtype=torch.float16)`) and build "
        "that file"
    )
    if major >= 11:
        return (
            f"{onnx_path} has fp32 weights: TensorRT {trt_version} builds every network strongly "
            "typed, so its layers run in fp32 and no 2:4 sparse kernel can run (sparse tensor "
            f"cores take fp16/bf16/int8/fp8 inputs); sparse=True only adds build time. To run "
            f"sparse, {fix}."
        )
    return (
        f"{onnx_path} has fp32 weights and fp16=False: TensorRT {trt_version} runs its layers in "
        "fp32/TF32, and TensorRT's sparsity guide asks for FP16 or INT8 precision for 2:4 sparse "
        "tactics (TF32 is not among them), so no sparse kernel is expected to run. To run sparse, "
        f"{fix}, or pass fp16=True to let TensorRT 10 choose fp16 kernels for this file."
    )


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    sparse: bool = True,
    dtype: str | None = None,
    workspace: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    trt_version: int | None = None,
) -> str:
    """The ``trtexec`` command that builds the same engine (``--sparsity=enable``)."""
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--sparsity={'enable' if sparse else 'disable'}",
        "--profilingVerbosity=detailed",
        f"--exportLayerInfo={Path(str(engine_path)).with_suffix('.layers.json')}",
    ]
    if dtype in ("fp16", "bf16") and (trt_version is None or trt_version < 11):
        args.append("--stronglyTyped")  # opt-in on 10.x; always on (and a no-op) in 11.x
    if workspace:
        args.append(f"--memPoolSize=workspace:{max(1, workspace >> 20)}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    sparse: bool = True,
    workspace: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    pattern: str = "2:4",
) -> EngineBuild:
    """Build a TensorRT plan from ``onnx_path`` (see the module docstring).

    Warns (``NMCompileWarning``, also in ``EngineBuild.notes``) when ``sparse`` cannot give
    sparse kernels because the file is fp32. ``sparsity_log`` holds only the "(Sparsity)" lines
    logged during this build.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise OnnxFileError(f"ONNX file {str(onnx_path)!r} does not exist")
    trt = _import_trt()
    major = trt_major(trt)
    dtype, quantized = _onnx_precision(onnx_path)
    if fp16 and major >= 11:
        raise ConfigError(
            "TensorRT 11 is strongly typed and has no FP16 builder flag: export the model in fp16 "
            "(result.export_onnx(path, dtype=torch.float16)) and build that file"
        )
    notes: list[str] = []
    # said before the build, which takes minutes; fp16=True is refused on 11 above
    if sparse and dtype == "fp32" and not quantized and not fp16:
        notes.append(_dense_fp32_note(onnx_path, str(trt.__version__), major))
        warnings.warn(notes[-1], NMCompileWarning, stacklevel=2)
    from .onnx_check import check_onnx

    nm_report = check_onnx(onnx_path, pattern)
    logger = _trt_logger(trt)
    with logger.capture() as messages:
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = dtype in ("fp16", "bf16") and not fp16
        if (
            strongly_typed
            and major < 11
            and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        ):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise NMCompileError(
                f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors)}"
            )
        config = builder.create_builder_config()
        if sparse:
            if not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
                raise NMCompileError(
                    f"this TensorRT ({trt.__version__}) exposes no BuilderFlag.SPARSE_WEIGHTS; "
                    "build with trtexec --sparsity=enable instead"
                )
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        cache = None
        if timing_cache:
            blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, False)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t0
        if plan is None:
            raise NMCompileError(
                f"TensorRT could not build an engine from {onnx_path}: {_errors(messages)}"
            )
        with atomic_path(engine_path, what="TensorRT plan") as tmp:
            tmp.write_bytes(bytes(plan))
        if cache is not None:
            with atomic_path(timing_cache, what="timing cache") as tmp:
                tmp.write_bytes(bytes(cache.serialize()))
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(bytes(plan))
        if engine is None:
            raise NMCompileError(
                f"TensorRT built {onnx_path} and wrote the plan to {engine_path}, but could not "
                f"load it back to inspect its layers: {_errors(messages)}. The plan file is "
                "kept and may be sound: if TensorRT ran short of GPU memory, free some and load "
                f"it with TrtRunner({str(engine_path)!r}) or `trtexec --loadEngine={engine_path}`"
                "; otherwise delete it and rebuild"
            )
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layers, io = parse_engine_info(info)
    log = parse_sparsity_log(text for _, text in messages)
    build = EngineBuild(
        engine_path=engine_path,
        onnx_path=onnx_path,
        trt_version=str(trt.__version__),
        sparse=sparse,
        build_s=build_s,
        layers=layers,
        io_tensors=io,
        sparsity_log=log,
        rows=sparsity_report(nm_report, layers, log, onnx_node_order(onnx_path)),
        command=trtexec_command(
            onnx_path,
            engine_path,
            sparse=sparse,
            dtype=dtype,
            workspace=workspace,
            timing_cache=timing_cache,
            trt_version=major,
        ),
        notes=notes,
    )
    with atomic_path(engine_path.with_suffix(".layers.json"), what="engine layer info") as tmp:
        tmp.write_text(info if isinstance(info, str) else json.dumps(info))
    return build


# -- run -------------------------------------------------------------------------------------------
class TrtRunner:
    """Runs a serialized engine on CUDA tensors with ``execute_async_v3`` on its own stream.

    ``runner.stream`` is a ``torch.cuda.Stream`` on the device that was current when the runner
    was made; every call enqueues the engine there. Called from another stream (the default
    one, say), the runner first makes its stream wait for the caller's current stream (where
    the inputs were written) and afterwards makes the caller's stream wait for its own, so the
    outputs can be read on the caller's stream with no synchronize; a call from a different
    stream than the last call's also waits for that one, which may still read the outputs this
    call overwrites. A timing harness that wants the engine alone records its CUDA events on
    ``runner.stream`` and calls the runner inside ``with torch.cuda.stream(runner.stream):``,
    where no wait is added.
    """

    def __init__(self, engine: str | os.PathLike | bytes) -> None:
        trt = _import_trt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTNotAvailable("TrtRunner needs a CUDA GPU; none is visible to torch")
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        logger = _trt_logger(trt)
        self._runtime = trt.Runtime(logger)
        with logger.capture() as messages:
            self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise NMCompileError(
                "TensorRT could not deserialize the engine (built by another TensorRT version "
                f"or for another GPU? rebuild it here): {_errors(messages)}"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._device = self.stream.device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtype = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[str, torch.Tensor] = {}
        self._last_caller: torch.cuda.Stream | None = None

    def input_dtype(self, i: int = 0) -> torch.dtype:
        """The torch dtype of input ``i`` (cast inputs to it once, outside a timing loop)."""
        return self._dtype[self.inputs[i]]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run the engine. The outputs are the runner's own buffers, reused by the next call:
        clone them to keep them."""
        import torch

        if len(inputs) != len(self.inputs):
            raise ValueError(
                f"engine takes {len(self.inputs)} inputs ({self.inputs}), got {len(inputs)}"
            )
        caller = torch.cuda.current_stream(self._device)
        # casts run on the caller's stream; the wait below orders them before the engine, and
        # the caller's wait after it keeps their memory from being reused while the engine reads
        xs = [
            x.to(device=self._device, dtype=self._dtype[name]).contiguous()
            for name, x in zip(self.inputs, inputs)
        ]
        handoff = caller != self.stream
        if handoff:
            self.stream.wait_stream(caller)
        last, self._last_caller = self._last_caller, caller
        if last is not None and last != caller and last != self.stream:
            # the last call's caller may still be reading the outputs this call overwrites
            self.stream.wait_stream(last)
        with torch.cuda.stream(self.stream):
            for name, x in zip(self.inputs, xs):
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
            outs = []
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                buf = self._buffers.get(name)
                if buf is None or tuple(buf.shape) != shape:
                    # allocated from the runner's stream pool, which only this stream reuses
                    buf = torch.empty(shape, dtype=self._dtype[name], device=self._device)
                    self._buffers[name] = buf
                self.context.set_tensor_address(name, buf.data_ptr())
                outs.append(buf)
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        if handoff:
            caller.wait_stream(self.stream)
            for buf in outs:
                # read on the caller's stream: not freed (runner dropped) before those reads
                buf.record_stream(caller)
        if not ok:
            raise NMCompileError("TensorRT execute_async_v3 failed")
        return outs


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
    }
    name = getattr(dt, "name", str(dt)).split(".")[-1]
    if name not in table:
        raise NMCompileError(f"no torch dtype for TensorRT {name}")
    return table[name]
