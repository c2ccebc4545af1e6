"""nmcompile.benchmark / nmcompile bench: dense vs sparse on the backends this machine has."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import nmcompile
from nmcompile import ConfigError, NMPattern
from nmcompile.cli import main
from nmcompile.runtime import check_onnx
from nmcompile.runtime.bench import _dense_twin


def test_benchmark_zoo_model_on_cpu_backends(tmp_path):
    r = nmcompile.benchmark(
        "cnn",
        backends=["ort-cpu", "torch", "trt", "torch-2:4"],
        dtypes=["fp32"],
        batch_sizes=[1, 3],
        warmup=1,
        repeat=5,
    )
    rows = {(row.backend, row.batch): row for row in r.rows}
    assert len(r.rows) == 8
    for b in (1, 3):
        for backend in ("ort-cpu", "torch"):
            row = rows[(backend, b)]
            assert row.dense.runs == 5 and row.sparse.runs == 5
            # a ratio of two real timings (no bound on it: a shared CI core can stall either)
            assert row.dense.median_ms > 0 and row.sparse.median_ms > 0
            assert row.speedup == pytest.approx(row.dense.median_ms / row.sparse.median_ms)
    if not torch.cuda.is_available():
        assert rows[("torch-2:4", 1)].note.startswith("skipped: needs a CUDA GPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rows[("trt", 1)].note == "skipped: the tensorrt package is not installed"
    files = r.save(tmp_path)
    data = json.loads(files["json"].read_text())
    assert data["model"] == "cnn" and len(data["rows"]) == 8
    assert "| ort-cpu | fp32 | 1 |" in files["markdown"].read_text()
    assert files["png"].read_bytes().startswith(b"\x89PNG")


def test_a_failing_row_is_recorded_and_the_others_still_run(monkeypatch):
    from nmcompile.runtime import bench

    real = bench._bench_torch

    def out_of_memory_at_batch_2(ctx, dtype, batch, semi):
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ctx, dtype, batch, semi)

    monkeypatch.setattr(bench, "_bench_torch", out_of_memory_at_batch_2)
    r = nmcompile.benchmark("cnn", backends=["torch"], batch_sizes=[1, 2, 3], warmup=1, repeat=3)
    assert [row.batch for row in r.rows] == [1, 2, 3]
    failed = r.rows[1]
    assert failed.dense is None and failed.speedup is None
    assert failed.note.startswith("failed: OutOfMemoryError: CUDA out of memory")
    assert failed.details["error"] == "OutOfMemoryError"
    assert r.rows[0].speedup and r.rows[2].speedup
    assert "failed: OutOfMemoryError" in r.to_markdown()


def test_benchmark_rejects_bad_options():
    with pytest.raises(ConfigError, match=r"unknown backends \['tensorflow'\]"):
        nmcompile.benchmark("cnn", backends=["tensorflow"])
    with pytest.raises(ConfigError, match=r"unknown dtypes \['fp8'\]"):
        nmcompile.benchmark("cnn", dtypes=["fp8"])
    with pytest.raises(ConfigError, match="batch sizes"):
        nmcompile.benchmark("cnn", batch_sizes=[0])
    with pytest.raises(ConfigError, match="unknown model"):
        nmcompile.benchmark("resnet9000")


def test_benchmark_onnx_file_uses_a_dense_twin(tmp_path):
    torch.manual_seed(0)
    net = nmcompile.zoo.create("bert_tiny", num_classes=2)
    r = nmcompile.compile(
        net,
        "asp",
        "2:4",
        example_inputs=(torch.randn(1, 16, 128),),
        prune_stem=True,
        finetune_iterations=0,
    )
    path = tmp_path / "m.onnx"
    r.export_onnx(path)
    twin = _dense_twin(path, tmp_path / "twin.onnx")
    rep_sparse = check_onnx(path, NMPattern(2, 4))
    rep_twin = check_onnx(twin, NMPattern(2, 4))
    names = [s.param for s in r.sites]
    assert rep_sparse.satisfied(names) and not rep_twin.satisfied(names)
    a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(twin)).graph.initializer}
    w, t = a["blocks.0.fc1.weight"], b["blocks.0.fc1.weight"]
    assert (t[w != 0] == w[w != 0]).all() and (t[w == 0] != 0).all()
    rep = nmcompile.benchmark(path, backends=["ort-cpu", "torch"], warmup=1, repeat=3)
    assert rep.rows[0].speedup is not None
    assert rep.rows[1].note.startswith("skipped: needs a torch model")


def test_bench_command(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "mlp",
            "--backends",
            "ort-cpu",
            "--batch-sizes",
            "2",
            "--repeat",
            "3",
            "--warmup",
            "1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "b" / "bench.json").is_file()
    assert "| ort-cpu | fp32 | 2 |" in capsys.readouterr().out
