"""TensorRT path: everything short of a real engine build runs everywhere; the real build and run
skip themselves without the ``tensorrt`` package and a GPU.

The fixtures under ``tests/fixtures/trt`` follow the documented engine-inspector schemas (10.x
``Bindings`` + ``Format/Datatype``; 11.x ``I/O Tensors`` + separate ``Format`` / ``Datatype``).
``FakeTensorRT`` below stands in for the ``tensorrt`` module only to check nmcompile's own
decisions (which flags it sets, what it refuses, what it writes); it produces no TensorRT result.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nmcompile
from nmcompile import ConfigError, NMCompileError, NMPattern, OnnxFileError
from nmcompile.runtime import check_onnx
from nmcompile.runtime.tensorrt import (
    TensorRTNotAvailable,
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


def _fake_trt(version: str, plan: bytes | None = b"PLAN", info: dict | None = None):
    calls: dict = {"flags": set(), "network_flags": None, "pool": None}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

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
            self.logger = logger

        def create_network(self, flags=0):
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            self.logger.log(3, "[I] [TRT] (Sparsity) Layers eligible for sparse math: x")
            return plan

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            return True

    class Engine:
        def create_engine_inspector(self):
            return types.SimpleNamespace(
                get_engine_information=lambda fmt: json.dumps(
                    info or {"Layers": [], "Bindings": []}
                )
            )

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt, calls


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version, **kw):
        trt, calls = _fake_trt(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return calls

    return install


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
    build = build_engine(onnx_path, tmp_path / "wide.plan")
    assert sum(1 for row in build.rows if row["eligible_2_4"]) == 4
    runner = TrtRunner(build.engine_path)
    x = torch.randn(8, 3, 56, 56, device="cuda")
    got = runner(x)[0].float()
    ref = r.module.cuda().half().eval()(x.half()).float()
    assert float((got - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_compile_result_build_engine_fails_before_exporting(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
    r = nmcompile.compile(net, "asp", example_inputs=(torch.randn(2, 8),))
    with pytest.raises(TensorRTNotAvailable):
        r.build_engine(tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []
