"""The nmcompile command: run (the main job) on digits, check, methods, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from nmcompile.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_default_main_job(tmp_path):
    """`nmcompile run` with no arguments: digits, small CNN, asp 2:4, the whole pipeline."""
    proc = subprocess.run(
        [sys.executable, "-m", "nmcompile.cli"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "nmcompile-run"
    for name in (
        "report.md",
        "layers.csv",
        "summary.json",
        "model.onnx",
        "dense.onnx",
        "sparsity.png",
        "latency.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "asp" and summary["pattern"] == "2:4"
    assert summary["dense_accuracy"] > 0.9 and summary["accuracy"] > 0.9
    assert summary["sparsity"] == pytest.approx(0.5)
    assert summary["latency"]["dense"]["runs"] == 100
    assert summary["onnx"]["max_rel_error"] < 1e-3
    report = (out / "report.md").read_text()
    assert "all 3 pruned weights satisfy 2:4 in the file" in report
    assert "## Latency" in report and "| features.3 | conv | 64x32x3x3 | 0.5 | yes |" in report
    assert (out / "sparsity.png").read_bytes().startswith(PNG_MAGIC)
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert [r["layer"] for r in rows] == ["features.3", "features.7", "classifier.0"]


def test_run_options_and_unstructured_method(tmp_path, capsys):
    rc = main(
        [
            "run",
            "--method",
            "omp",
            "--option",
            "target_sparsity=0.8",
            "--out",
            str(tmp_path / "o"),
            "--pretrain-iterations",
            "60",
            "--finetune-iterations",
            "30",
            "--no-latency",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["pattern"] == "unstructured"
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["latency"] is None and summary["onnx"]["nm_check"] is None
    assert "omp" in capsys.readouterr().out


def test_run_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["run", "--pattern", "4:2", "--out", str(tmp_path / "x")]) == 2
    assert "valid pattern" in capsys.readouterr().err
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["run", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "--option",
                "bogus=1",
                "--out",
                str(tmp_path / "y"),
                "--pretrain-iterations",
                "0",
            ]
        )
        == 2
    )
    assert "unknown option ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # refused before anything was written or trained
    argv = ["run", "--method", "channel-taylor", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*argv, "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-dir applies to the methods" in err and "mimp" in err and "lbc" in err
    assert not (tmp_path / "z").exists() and not (tmp_path / "ck").exists()
    assert main(["run", "--lr", "0", "--out", str(tmp_path / "z")]) == 2
    assert "--lr must be > 0, got 0.0" in capsys.readouterr().err


def _gemm_model(path, weight):
    b = numpy_helper.from_array(weight, "W")
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[1]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[0]])],
        [b],
    )
    onnx.save(helper.make_model(graph), str(path))


def test_check_command(tmp_path, capsys):
    w = torch.randn(4, 8)
    good = (w * (torch.arange(8) % 4 < 2)).numpy()
    _gemm_model(tmp_path / "good.onnx", good)
    _gemm_model(tmp_path / "bad.onnx", w.numpy())
    assert main(["check", str(tmp_path / "good.onnx"), "--pattern", "2:4"]) == 0
    assert "1/1 weights satisfy 2:4" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "bad.onnx"), "--pattern", "2:4"]) == 1
    assert "violates" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "good.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entries"][0]["status"] == "ok"
    # A file nmcompile exported declares which weights it pruned: dense-by-design layers (stem,
    # classifier) do not fail the check unless --all asks for every weight.
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )
    import nmcompile

    r = nmcompile.compile(net, "asp", "2:4", example_inputs=(torch.randn(2, 8),))
    r.export_onnx(tmp_path / "ours.onnx")
    assert main(["check", str(tmp_path / "ours.onnx")]) == 0
    assert "1/1 pruned weights satisfy 2:4; 2 left dense by design" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "ours.onnx"), "--all"]) == 1
    assert main(["check", str(tmp_path / "ours.onnx"), "--pattern", "1:4"]) == 1
    assert "(the file was pruned to 2:4)" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("hello, not a model")
    assert main(["check", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "asp" in out and "omp" in out and "unstructured" in out


def test_run_iterative_method_with_checkpoints_and_diagnostic_plots(tmp_path):
    out = tmp_path / "m"
    ckpt = tmp_path / "ckpt"
    argv = [
        "run",
        "--method",
        "mimp",
        "--pattern",
        "1:4",
        "--iterations",
        "15",
        "--out",
        str(out),
        "--checkpoint-dir",
        str(ckpt),
        "--no-latency",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_iterations"] == 0  # round 0 of mIMP is the dense round
    assert summary["dense_accuracy"] == summary["history"][0]["accuracy"]
    assert summary["sparsity"] == pytest.approx(0.75)
    for name in ("rounds.png", "mask_hamming.png", "plp_misprediction.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    report = (out / "report.md").read_text()
    assert "PLP misprediction" in report and "![mask_hamming](mask_hamming.png)" in report
    assert list(ckpt.glob("round-*.pt"))
    # resuming the finished run reproduces it without training again
    assert main([*argv, "--resume", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["history"][-1]["accuracy"] == summary["history"][-1]["accuracy"]
