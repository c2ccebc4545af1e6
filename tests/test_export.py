"""ONNX round trip fp32 / fp16: finalized graph, onnx.checker, ONNX Runtime vs torch, N:M kept."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
import torchvision
from torch import nn

import nmcompile
from nmcompile import ExportError, NMPattern, NMViolationError, OutputPathError
from nmcompile.runtime import check_onnx, export_onnx, ort_latency, ort_session, time_interleaved


@pytest.fixture(scope="module")
def resnet_result():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))  # real BN statistics
    return nmcompile.compile(
        m.eval(), "asp", "2:4", example_inputs=(torch.randn(2, 3, 32, 32),), finetune_iterations=0
    )


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_export_fp32_round_trip(resnet_result, tmp_path):
    path = tmp_path / "r18.onnx"
    res = resnet_result.export_onnx(path)
    assert res.path == path and path.is_file()
    assert res.max_rel_error is not None and res.max_rel_error <= 1e-3
    ops = _ops(path)
    assert "Mul" not in ops and "BatchNormalization" not in ops and "Conv" in ops
    onnx.checker.check_model(str(path))
    report = check_onnx(path, NMPattern(2, 4))
    assert report.satisfied([s.param for s in resnet_result.sites])
    # the stem conv and the classifier stay dense, so the file as a whole is not all-2:4
    by_name = {e.initializer: e for e in report.entries}
    assert not by_name["conv1.weight"].ok
    # ONNX Runtime on a fresh batch agrees with torch too
    x = torch.randn(2, 3, 32, 32)
    sess = ort_session(path)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = resnet_result.module.eval()(x)
    assert float((got - ref).norm() / ref.norm()) < 1e-3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_export_fp16_keeps_nm(resnet_result, tmp_path):
    path = tmp_path / "r18_fp16.onnx"
    res = resnet_result.export_onnx(path, dtype=torch.float16)
    assert res.max_rel_error <= 1e-2
    model = onnx.load(str(path))
    conv_w = next(i for i in model.graph.initializer if i.name == "layer1.0.conv1.weight")
    assert conv_w.data_type == onnx.TensorProto.FLOAT16
    assert res.nm_report.satisfied([s.param for s in resnet_result.sites])


class TokenMLP(nn.Module):
    """Linear layers on [batch, tokens, features]: the exporter turns them into MatMul with a
    transposed, renamed constant; export must find and name them again."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.hidden = nn.Linear(32, 64)
        self.hidden2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.hidden2(torch.relu(self.hidden(torch.relu(self.inp(x)))))))


def test_export_matmul_weights_are_found_and_named(tmp_path):
    torch.manual_seed(0)
    r = nmcompile.compile(
        TokenMLP(), "asp", "2:8", example_inputs=(torch.randn(2, 5, 16),), finetune_iterations=0
    )
    res = r.export_onnx(tmp_path / "tok.onnx")
    names = {i.name for i in onnx.load(str(res.path)).graph.initializer}
    assert {"hidden.weight", "hidden2.weight"} <= names
    entries = {e.initializer: e for e in res.nm_report.entries}
    assert entries["hidden.weight"].op_type == "MatMul" and entries["hidden.weight"].ok


def test_failed_export_leaves_nothing(resnet_result, tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"max \|difference\| .* > atol 0 \+ rtol 0"):
        export_onnx(resnet_result.masked, resnet_result.example_inputs, path, rtol=0.0, atol=0.0)
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(ExportError, match="dtype"):
        resnet_result.export_onnx(path, dtype=torch.int8)


def test_external_data_export_lands_both_files_and_nothing_else(monkeypatch, tmp_path):
    # Force the > 2 GB path (weights in <name>.data beside the model) on a small model.
    from nmcompile.runtime import onnx_export

    monkeypatch.setattr(onnx_export, "_TWO_GB", 0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    r = nmcompile.compile(net, "asp", "2:4", example_inputs=(torch.randn(2, 8),))
    res = r.export_onnx(tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert res.nm_report.satisfied(["2.weight"]) and res.max_rel_error < 1e-3
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert check_onnx(tmp_path / "m.onnx", "2:4").satisfied(["2.weight"])
    with pytest.raises(NMViolationError, match="break 1:4"):  # fails after the data was written
        export_onnx(r.module, r.example_inputs, tmp_path / "bad.onnx", pattern="1:4", sites=r.sites)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_export_declares_its_pruned_weights(resnet_result, tmp_path):
    res = resnet_result.export_onnx(tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["nmcompile.pattern"] == "2:4"
    report = check_onnx(tmp_path / "m.onnx", "2:4")
    assert set(report.declared) == {s.param for s in resnet_result.sites}
    # the stem and the classifier are dense by design: the file as a whole does not satisfy 2:4,
    # but every weight it declares pruned does
    assert report.declared_ok and not report.ok and res.nm_report.declared_ok
    assert "pruned weights satisfy 2:4; 2 left dense by design (conv1.weight, fc.weight)" in (
        report.summary()
    )


def test_unwritable_output_folder(resnet_result, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputPathError, match="cannot create"):
        resnet_result.export_onnx(blocker / "sub" / "m.onnx")
    with pytest.raises(OutputPathError, match="is a folder"):
        resnet_result.export_onnx(tmp_path)


def test_dense_model_export_and_latency_harness(resnet_result, tmp_path):
    m = torchvision.models.resnet18(num_classes=10).eval()
    dense = export_onnx(m, (torch.randn(1, 3, 32, 32),), tmp_path / "dense.onnx")
    sparse = resnet_result.export_onnx(
        tmp_path / "sparse.onnx", example_inputs=(torch.randn(1, 3, 32, 32),)
    )
    stats = ort_latency(
        {"dense": dense.path, "sparse": sparse.path},
        (torch.randn(1, 3, 32, 32),),
        warmup=2,
        repeat=7,
    )
    assert set(stats) == {"dense", "sparse"}
    for s in stats.values():
        assert s.runs == 7 and 0 < s.min_ms <= s.median_ms <= s.p90_ms <= s.p99_ms


def test_time_interleaved_counts_and_order():
    calls = []
    stats = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeat=4
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert stats["a"].runs == stats["b"].runs == 4
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeat=0)
    # several calls per timed sample: counted, and the time reported is per call
    import time

    calls.clear()
    stats = time_interleaved(
        {"a": lambda: calls.append("a"), "s": lambda: time.sleep(0.002)},
        warmup=0, repeat=3, calls_per_sample=5,
    )  # fmt: skip
    assert calls.count("a") == 15 and stats["s"].runs == 3
    assert 1.9 < stats["s"].median_ms < 20
    with pytest.raises(ValueError, match="calls_per_sample"):
        time_interleaved({"a": lambda: None}, calls_per_sample=0)
