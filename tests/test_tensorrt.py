"""TensorRT path: everything short of a real engine build runs everywhere; the real build and run
skip themselves without the ``tensorrt`` package and a GPU.

The fixtures under ``tests/fixtures/trt`` follow the documented engine-inspector schemas (10.x
``Bindings`` + ``Format/Datatype``; 11.x ``I/O Tensors`` + separate ``Format`` / ``Datatype``).
``FakeTensorRT`` below stands in for the ``tensorrt`` module only to check nmcompile's own
decisions (which flags it sets, what it refuses, what it writes); it produces no TensorRT result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nmcompile
import nmcompile.runtime.tensorrt as trt_module
from nmcompile import ConfigError, NMCompileError, NMCompileWarning, NMPattern, OnnxFileError
from nmcompile.runtime import check_onnx
from nmcompile.runtime.tensorrt import (
    TensorRTNotAvailable,
    TrtRunner,
    build_engine,
    parse_engine_info,
    parse_sparsity_log,
    sparsity_report,
    trtexec_command,
)

FIXTURES = Path(__file__).parent / "fixtures" / "trt"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_parse_trt10_inspector_json():
    layers, io = parse_engine_info((FIXTURES / "engine_info_trt10.json").read_text())
    assert io == ["input", "output"]
    by = {layer.name: layer for layer in layers}
    conv = by["conv1 + relu1"]
    assert conv.sparse is True and conv.has_sparse_weights is True and conv.dtypes == ("FP16",)
    # eligible weights, dense tactic: TensorRT timed both and kept the dense one
    fc = by["fc"]
    assert fc.has_sparse_weights is True and fc.sparse is False
    reformat = by["Reformatting CopyNode for Input Tensor 0 to conv1 + relu1"]
    assert reformat.sparse is None and reformat.tactic is None


def test_parse_trt11_inspector_json():
    layers, io = parse_engine_info(json.loads((FIXTURES / "engine_info_trt11.json").read_text()))
    assert io == ["input", "output"]
    assert [(layer.name, layer.sparse, layer.dtypes) for layer in layers] == [
        ("conv1 + relu1", True, ("Half",)),
        ("fc", False, ("Half",)),
    ]


def test_parse_names_only_inspector_json():
    layers, io = parse_engine_info({"Layers": ["conv1 + relu1", "fc"], "Bindings": ["x", "y"]})
    assert [(layer.name, layer.sparse) for layer in layers] == [
        ("conv1 + relu1", None),
        ("fc", None),
    ]
    assert io == ["x", "y"]


def test_parse_sparsity_log_lines():
    log = parse_sparsity_log(
        [
            "[I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, fc",
            "unrelated message",
            "(Sparsity) TRT inference plan picked sparse implementation for layers: conv2",
        ]
    )
    assert log == {"eligible": ["conv1", "conv2", "fc"], "picked": ["conv2"]}


def _fp16_model_onnx(tmp_path: Path):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    r = nmcompile.compile(
        m, "asp", "2:4", example_inputs=(torch.randn(1, 3, 64, 64),), finetune_iterations=0
    )
    path = tmp_path / "r18_fp16.onnx"
    r.export_onnx(path, dtype=torch.float16)
    return r, path


def test_sparsity_report_joins_onnx_check_and_engine_layers(tmp_path):
    _r, path = _fp16_model_onnx(tmp_path)
    report = check_onnx(path, NMPattern(2, 4))
    convs = [e for e in report.entries if e.op_type == "Conv"]
    # an engine where TensorRT fused each conv with its ReLU, ran the first two eligible convs
    # sparse and kept the rest dense (10.x schema, names as the ONNX parser gives them)
    eligible = [e for e in convs if e.ok]
    layers = []
    for i, e in enumerate(convs):
        layers.append(
            {
                "Name": f"{e.node} + relu_{i}",
                "LayerType": "CaskConvolution",
                "TacticName": "sm80_xmma_fprop_sparse_conv_x"
                if e in eligible[:2]
                else "sm80_xmma_fprop_implicit_gemm_x",
            }
        )
    rows = sparsity_report(report, parse_engine_info({"Layers": layers, "Bindings": []})[0])
    by = {row["weight"]: row for row in rows}
    assert (
        by["conv1.weight"]["eligible_2_4"] is False and by["conv1.weight"]["sparse_picked"] is False
    )
    assert by[eligible[0].initializer]["sparse_picked"] is True
    assert by[eligible[2].initializer]["eligible_2_4"] is True
    assert by[eligible[2].initializer]["sparse_picked"] is False
    assert all(row["trt_layer"] for row in rows if row["op"] == "Conv")


def test_sparsity_report_matches_whole_node_names_and_myelin_ranges():
    from types import SimpleNamespace

    from nmcompile.runtime.tensorrt import TrtLayer

    def entry(node, weight):
        return SimpleNamespace(
            node=node, initializer=weight, op_type="MatMul", shape=(64, 64), ok=True, status="ok"
        )

    report = SimpleNamespace(
        entries=[entry("node_MatMul_1", "a"), entry("node_MatMul_12", "b"), entry("mm_5", "c")]
    )
    layers = [
        TrtLayer("node_MatMul_12", "Gemm", "sm90_sparse_gemm", True),
        TrtLayer("{ForeignNode[mm_3...mm_7]}", "Myelin", "", False),
    ]
    order = ["node_MatMul_1", "node_MatMul_12", "mm_3", "mm_4", "mm_5", "mm_7"]
    by = {r["weight"]: r for r in sparsity_report(report, layers, None, order)}
    # node_MatMul_1 is not a part of node_MatMul_12's name: no layer, not a false "sparse"
    assert by["a"]["trt_layer"] is None and by["a"]["sparse_picked"] is None
    assert by["b"]["trt_layer"] == "node_MatMul_12" and by["b"]["sparse_picked"] is True
    # inside a Myelin range: matched, its tactic unknown rather than "dense"
    assert by["c"]["trt_layer"] == "{ForeignNode[mm_3...mm_7]}"
    assert by["c"]["opaque"] is True and by["c"]["sparse_picked"] is None


def test_trtexec_command():
    cmd = trtexec_command("m.onnx", "m.plan", dtype="fp16", workspace=4 << 30, trt_version=10)
    assert cmd.startswith("trtexec --onnx=m.onnx --saveEngine=m.plan --sparsity=enable")
    assert "--profilingVerbosity=detailed" in cmd and "--exportLayerInfo=m.layers.json" in cmd
    assert "--stronglyTyped" in cmd and "--memPoolSize=workspace:4096M" in cmd
    assert "--stronglyTyped" not in trtexec_command(
        "m.onnx", "m.plan", dtype="fp16", trt_version=11
    )
    assert "--sparsity=disable" in trtexec_command("m.onnx", "m.plan", sparse=False)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_build_engine_without_tensorrt_says_how_to_get_it(tmp_path):
    _, path = _fp16_model_onnx(tmp_path)
    with pytest.raises(TensorRTNotAvailable, match=r"`tensorrt` is not installed.*pypi.nvidia.com"):
        build_engine(path, tmp_path / "m.plan")
    assert isinstance(TensorRTNotAvailable("x"), ImportError)
    with pytest.raises(OnnxFileError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan")


# -- nmcompile's own decisions, against a stand-in for the tensorrt module ------------------------
class _Flag:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value


def _fake_trt(
    version: str,
    plan: bytes | None = b"PLAN",
    info: dict | None = None,
    loadable: bool = True,
):
    # like TensorRT, the fake keeps the first logger it is given and logs only to that one
    calls: dict = {
        "flags": set(),
        "network_flags": None,
        "pool": None,
        "loggers": [],
        "executed": [],
        "events": [],
    }
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    def keep(logger):
        calls["loggers"].append(logger)
        return calls["loggers"][0]

    class ILogger:
        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        WARNING = 2

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS", FP16="FP16")
    if version.startswith("11"):
        del trt.BuilderFlag.FP16
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=_Flag("ST", 1))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")

    class Config:
        profiling_verbosity = None

        def set_flag(self, flag):
            calls["flags"].add(flag)

        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def create_timing_cache(self, blob):
            return types.SimpleNamespace(serialize=lambda: b"CACHE")

        def set_timing_cache(self, cache, ignore):
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = keep(logger)

        def create_network(self, flags=0):
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            # severities as ILogger::Severity: 2 WARNING, 3 INFO, 4 VERBOSE
            self.logger.log(4, "(Sparsity) Layers eligible for sparse math: verbose_only")
            self.logger.log(2, "fake warning from the builder")
            self.logger.log(3, "[I] [TRT] (Sparsity) Layers eligible for sparse math: x")
            return plan

    class OnnxParser:
        def __init__(self, network, logger):
            keep(logger)
            self.num_errors = 0

        def parse_from_file(self, path):
            return True

    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Context:
        def set_input_shape(self, name, shape):
            calls["events"].append(("shape", name, shape))
            return True

        def set_tensor_address(self, name, ptr):
            return True

        def get_tensor_shape(self, name):
            return (2, 3)

        def execute_async_v3(self, stream_handle):
            calls["events"].append(("execute", stream_handle))
            return True

    class Engine:
        num_io_tensors = 2

        def create_engine_inspector(self):
            return types.SimpleNamespace(
                get_engine_information=lambda fmt: json.dumps(
                    info or {"Layers": [], "Bindings": []}
                )
            )

        def create_execution_context(self):
            return Context()

        def get_tensor_name(self, i):
            return ["input", "output"][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name="FLOAT")

    class Runtime:
        def __init__(self, logger):
            self.logger = keep(logger)

        def deserialize_cuda_engine(self, data):
            if not loadable:
                self.logger.log(1, "fake error: out of device memory")
                return None
            self.logger.log(3, "Loaded engine size: 1 MiB")
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt, calls


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version, **kw):
        trt, calls = _fake_trt(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        # a fresh process as far as the module's one TensorRT logger goes
        monkeypatch.setattr(trt_module, "_LOGGER", None, raising=False)
        calls["trt"] = trt
        return calls

    return install


class _FakeStream:
    """Stands in for torch.cuda.Stream: a handle, a device, and a record of the waits."""

    def __init__(self, name: str, handle: int, events: list) -> None:
        self.name, self.cuda_stream, self._events = name, handle, events
        self.device = torch.device("cpu")

    def wait_stream(self, other: _FakeStream) -> None:
        self._events.append(("wait", self.name, other.name))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream API on a CPU-only machine: the caller runs on stream "caller"
    (handle 111), ``torch.cuda.Stream()`` makes stream "runner" (handle 222) on the CPU, so the
    runner's tensors are CPU tensors. Install after ``fake_trt``; returns the event list."""

    def install(events: list) -> _FakeStream:
        caller = _FakeStream("caller", 111, events)
        current = [caller]

        @contextlib.contextmanager
        def stream(s):
            current.append(s)
            try:
                yield s
            finally:
                current.pop()

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Stream", lambda: _FakeStream("runner", 222, events))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(
            torch.Tensor, "record_stream", lambda t, s: events.append(("record", s.name))
        )
        return caller

    return install


def _tiny_onnx(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    r = nmcompile.compile(net, "asp", example_inputs=(torch.randn(2, 8),))
    path = tmp_path / f"tiny_{str(dtype).split('.')[-1]}.onnx"
    r.export_onnx(path, dtype=dtype)
    return path


def test_build_engine_decisions_trt10(fake_trt, tmp_path):
    _, path = _fp16_model_onnx(tmp_path)
    calls = fake_trt("10.9.0")
    build = build_engine(
        path, tmp_path / "out" / "m.plan", workspace=1 << 30, timing_cache=tmp_path / "t.cache"
    )
    assert calls["flags"] == {"SPARSE_WEIGHTS"}
    assert calls["network_flags"] == 1 << 1  # fp16 file: strongly typed on 10.x
    assert calls["pool"] == ("WORKSPACE", 1 << 30)
    assert (tmp_path / "out" / "m.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "t.cache").read_bytes() == b"CACHE"
    assert (tmp_path / "out" / "m.layers.json").is_file()
    assert build.sparsity_log["eligible"] == ["x"]
    assert "--stronglyTyped" in build.command and "--sparsity=enable" in build.command
    assert len(build.rows) >= 19  # every checked weight of the file has a row
    assert "eligible for 2:4" in build.report()


def test_build_engine_decisions_trt11(fake_trt, tmp_path):
    _, path = _fp16_model_onnx(tmp_path)
    calls = fake_trt("11.1.0")
    build_engine(path, tmp_path / "a.plan", sparse=False)
    assert calls["flags"] == set() and calls["network_flags"] == 0  # strongly typed by default
    with pytest.raises(ConfigError, match="TensorRT 11 is strongly typed"):
        build_engine(path, tmp_path / "b.plan", fp16=True)


def test_failed_build_writes_no_plan(fake_trt, tmp_path):
    _, path = _fp16_model_onnx(tmp_path)
    fake_trt("10.9.0", plan=None)
    with pytest.raises(NMCompileError, match="could not build an engine"):
        build_engine(path, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def test_one_logger_serves_runner_and_builds(fake_trt, fake_cuda, tmp_path):
    path = _tiny_onnx(tmp_path, torch.float16)
    calls = fake_trt("10.9.0")
    fake_cuda(calls["events"])
    # a runner first: its logger is the one TensorRT keeps, so builds must log through it too
    TrtRunner(b"PLAN")
    calls["loggers"][0].log(3, "(Sparsity) Layers eligible for sparse math: outside_a_build")
    first = build_engine(path, tmp_path / "a.plan")
    second = build_engine(path, tmp_path / "b.plan")
    # each build reports its own "(Sparsity)" lines: not those logged outside it, not the
    # other build's, and not the VERBOSE ones, which are dropped
    assert first.sparsity_log["eligible"] == ["x"]
    assert second.sparsity_log["eligible"] == ["x"]
    loggers = calls["loggers"]
    assert len(loggers) == 7  # Runtime; Builder, OnnxParser, Runtime per build
    assert all(logger is loggers[0] for logger in loggers)
    assert isinstance(loggers[0], calls["trt"].ILogger)


def test_trt_logger_forwards_warnings_and_stays_bounded(fake_trt, tmp_path, caplog):
    path = _tiny_onnx(tmp_path, torch.float16)
    calls = fake_trt("10.9.0")
    with caplog.at_level(logging.WARNING, logger="nmcompile.tensorrt"):
        build_engine(path, tmp_path / "m.plan")
    assert "TensorRT: fake warning from the builder" in caplog.messages
    logger = calls["loggers"][0]
    for i in range(trt_module._RECENT * 3):
        logger.log(3, f"message {i}")
    assert len(logger.recent) == trt_module._RECENT
    assert logger.recent[-1] == (3, f"message {trt_module._RECENT * 3 - 1}")
    logger.log(4, "verbose")
    assert logger.recent[-1][1] != "verbose"


def test_runner_enqueues_on_its_own_stream(fake_trt, fake_cuda):
    calls = fake_trt("10.9.0")
    events = calls["events"]
    fake_cuda(events)
    runner = TrtRunner(b"PLAN")
    assert runner.stream.cuda_stream == 222 and runner.input_dtype(0) == torch.float32
    (out,) = runner(torch.randn(2, 4, dtype=torch.float64))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    # from the caller's stream: the runner's stream waits for the caller's (inputs written
    # there), the engine runs on the runner's stream, the caller's waits for it (outputs)
    assert events == [
        ("wait", "runner", "caller"),
        ("shape", "input", (2, 4)),
        ("execute", 222),
        ("wait", "caller", "runner"),
        ("record", "caller"),
    ]
    # from the runner's own stream (a timing harness): no handoff, once the last caller's
    # reads of the outputs are waited for
    events.clear()
    with torch.cuda.stream(runner.stream):
        runner(torch.randn(2, 4))
        runner(torch.randn(2, 4))
    enqueue = [("shape", "input", (2, 4)), ("execute", 222)]
    assert events == [("wait", "runner", "caller"), *enqueue, *enqueue]
    # from a third stream, after the caller's: the caller may still read the reused outputs
    events.clear()
    runner(torch.randn(2, 4))
    with torch.cuda.stream(_FakeStream("other", 333, events)):
        runner(torch.randn(2, 4))
    assert events[5:] == [
        ("wait", "runner", "other"),
        ("wait", "runner", "caller"),
        ("shape", "input", (2, 4)),
        ("execute", 222),
        ("wait", "other", "runner"),
        ("record", "other"),
    ]


def test_build_engine_says_when_the_written_plan_does_not_load(fake_trt, tmp_path):
    path = _tiny_onnx(tmp_path, torch.float16)
    fake_trt("10.9.0", loadable=False)
    with pytest.raises(NMCompileError, match=r"wrote the plan to .*out of device memory.*kept"):
        build_engine(path, tmp_path / "m.plan")
    assert (tmp_path / "m.plan").read_bytes() == b"PLAN"


def test_fp32_file_warns_it_gets_no_sparse_kernels_trt11(fake_trt, tmp_path):
    path = _tiny_onnx(tmp_path, torch.float32)
    fake_trt("11.1.0")
    with pytest.warns(NMCompileWarning, match="strongly typed") as record:
        build = build_engine(path, tmp_path / "m.plan")
    message = str(record[0].message)
    assert str(path) in message and "fp32" in message
    assert "export_onnx(path, dtype=torch.float16)" in message
    assert build.notes == [message]
    assert build.to_json()["notes"] == [message] and message in build.to_markdown()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NMCompileWarning)
        assert build_engine(path, tmp_path / "d.plan", sparse=False).notes == []
        fp16 = _tiny_onnx(tmp_path, torch.float16)
        assert build_engine(fp16, tmp_path / "h.plan").notes == []


def test_fp32_file_warns_it_gets_no_sparse_kernels_trt10(fake_trt, tmp_path):
    path = _tiny_onnx(tmp_path, torch.float32)
    calls = fake_trt("10.9.0")
    with pytest.warns(NMCompileWarning, match="fp16=False") as record:
        build = build_engine(path, tmp_path / "m.plan")
    message = str(record[0].message)
    assert str(path) in message and "TF32" in message and "fp16=True" in message
    assert "export_onnx(path, dtype=torch.float16)" in message
    assert build.notes == [message] and build.to_json()["notes"] == [message]
    assert calls["network_flags"] == 0  # fp32 file: weakly typed, as before
    with warnings.catch_warnings():
        warnings.simplefilter("error", NMCompileWarning)
        # fp16=True lets TensorRT 10 pick fp16 (sparse) kernels for the fp32 file
        assert build_engine(path, tmp_path / "h.plan", fp16=True).notes == []
    assert calls["flags"] == {"SPARSE_WEIGHTS", "FP16"}


# -- the real thing --------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(), reason="needs tensorrt and a GPU")
def test_real_engine_build_and_run(tmp_path):
    from nmcompile.runtime.tensorrt import TrtRunner

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 256, 3, padding=1)
            self.body = nn.Sequential(
                *[nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()) for _ in range(4)]
            )
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    r = nmcompile.compile(
        Wide().eval(),
        "asp",
        "2:4",
        example_inputs=(torch.randn(8, 3, 56, 56),),
        finetune_iterations=0,
    )
    onnx_path = tmp_path / "wide.onnx"
    r.export_onnx(onnx_path, dtype=torch.float16)
    cache = tmp_path / "timing.cache"
    build = build_engine(onnx_path, tmp_path / "wide.plan", timing_cache=cache)
    assert sum(1 for row in build.rows if row["eligible_2_4"]) == 4
    if torch.cuda.get_device_capability() >= (8, 0):  # sparse tensor cores
        assert build.sparsity_log["eligible"], "TensorRT's (Sparsity) lines were not captured"
    runner = TrtRunner(build.engine_path)
    assert runner.stream != torch.cuda.current_stream()
    x = torch.randn(8, 3, 56, 56, device="cuda")
    got = runner(x)[0].float()
    ref = r.module.cuda().half().eval()(x.half()).float()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    # called from another stream, the outputs are ready to read on that stream
    with torch.cuda.stream(torch.cuda.Stream()):
        side = runner(x)[0].float()
    torch.cuda.synchronize()
    assert torch.allclose(side, got, rtol=1e-3, atol=1e-3)
    # a build after a runner exists still hears TensorRT's log (one logger per process)
    again = build_engine(onnx_path, tmp_path / "again.plan", timing_cache=cache)
    assert again.sparsity_log == build.sparsity_log


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_compile_result_build_engine_fails_before_exporting(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    r = nmcompile.compile(net, "asp", example_inputs=(torch.randn(2, 8),))
    with pytest.raises(TensorRTNotAvailable):
        r.build_engine(tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []
