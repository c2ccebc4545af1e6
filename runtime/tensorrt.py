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

``tensorrt`` is imported lazily; without it every entry point raises ``TensorRTNotAvailable``
naming the package and how to install it. ``trtexec_command`` gives the equivalent command line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nmcompile._errors import ConfigError, NMCompileError, OnnxFileError
from nmcompile._io import atomic_path

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


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTNotAvailable(_INSTALL) from exc
    return trt


def trt_major(trt: Any) -> int:
    return int(str(getattr(trt, "__version__", "10")).split(".")[0])


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

    def report(self) -> str:
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
        }


def _onnx_float_dtype(onnx_path: Path) -> str:
    """'fp16', 'bf16' or 'fp32': the dtype of the model's floating-point initializers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kinds = {init.data_type for init in model.graph.initializer}
    T = onnx.TensorProto
    if T.FLOAT16 in kinds:
        return "fp16"
    if T.BFLOAT16 in kinds:
        return "bf16"
    return "fp32"


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
    """Build a TensorRT plan from ``onnx_path`` (see the module docstring)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise OnnxFileError(f"ONNX file {str(onnx_path)!r} does not exist")
    trt = _import_trt()
    major = trt_major(trt)
    dtype = _onnx_float_dtype(onnx_path)
    if fp16 and major >= 11:
        raise ConfigError(
            "TensorRT 11 is strongly typed and has no FP16 builder flag: export the model in fp16 "
            "(result.export_onnx(path, dtype=torch.float16)) and build that file"
        )
    from .onnx_check import check_onnx

    nm_report = check_onnx(onnx_path, pattern)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append(str(msg))

    logger = _Logger()
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
        raise NMCompileError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    if sparse:
        if not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
            raise NMCompileError(
                f"this TensorRT ({trt.__version__}) exposes no BuilderFlag.SPARSE_WEIGHTS; build "
                "with trtexec --sparsity=enable instead"
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
        tail = "; ".join(logger.messages[-5:])
        raise NMCompileError(f"TensorRT could not build an engine from {onnx_path}: {tail}")
    with atomic_path(engine_path, what="TensorRT plan") as tmp:
        tmp.write_bytes(bytes(plan))
    if cache is not None:
        with atomic_path(timing_cache, what="timing cache") as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layers, io = parse_engine_info(info)
    log = parse_sparsity_log(logger.messages)
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
    )
    with atomic_path(engine_path.with_suffix(".layers.json"), what="engine layer info") as tmp:
        tmp.write_text(info if isinstance(info, str) else json.dumps(info))
    return build


# -- run -------------------------------------------------------------------------------------------
class TrtRunner:
    """Runs a serialized engine on CUDA tensors with ``execute_async_v3`` on torch's stream."""

    def __init__(self, engine: str | os.PathLike | bytes) -> None:
        trt = _import_trt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTNotAvailable("TrtRunner needs a CUDA GPU; none is visible to torch")
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()

        class _Quiet(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                pass

        self._logger = _Quiet()
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise NMCompileError(
                "TensorRT could not deserialize the engine (built by another "
                "TensorRT version or GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtype = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[str, torch.Tensor] = {}

    def input_dtype(self, i: int = 0):
        """The torch dtype of input ``i`` (cast inputs to it once, outside a timing loop)."""
        return self._dtype[self.inputs[i]]

    def __call__(self, *inputs: Any) -> list[Any]:
        """Run the engine. The outputs are the runner's own buffers, reused by the next call:
        clone them to keep them."""
        import torch

        if len(inputs) != len(self.inputs):
            raise ValueError(
                f"engine takes {len(self.inputs)} inputs ({self.inputs}), got {len(inputs)}"
            )
        keep = []
        for name, x in zip(self.inputs, inputs):
            x = x.to(device="cuda", dtype=self._dtype[name]).contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = self._buffers.get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = torch.empty(shape, dtype=self._dtype[name], device="cuda")
                self._buffers[name] = buf
            self.context.set_tensor_address(name, buf.data_ptr())
            outs.append(buf)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise NMCompileError("TensorRT execute_async_v3 failed")
        return outs


def _torch_dtype(trt: Any, dt: Any):
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
