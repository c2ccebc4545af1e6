"""The GPU latency script cannot rot: its dry run goes through every code path of a GPU run
(torch's semi-structured classes, our conversion, the timing, the per-row JSON, the report) on
CPU with stand-in kernels, in a process that cannot import what the GPU host lacks (pymetis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nmcompile.runtime.latency import capture_cuda_graph

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_latency.py"
# the GPU host has torch, onnx and onnxruntime, and none of these
LIKE_GPU_HOST = (
    "import sys, runpy\n"
    "for name in ('pymetis', 'kahypar', 'transformers', 'timm'):\n"
    "    sys.modules[name] = None\n"
    f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
    f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
)


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-c", LIKE_GPU_HOST, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_gpu_run_sh_dry_run_writes_every_row_and_the_tables(tmp_path):
    # what the GPU host lacks cannot be imported; the package tree stands in for pip install
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("pymetis", "kahypar"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('no {name} on the GPU host')\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(blocked),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check = json.loads((out / "check.log").read_text().splitlines()[0])
    assert check["nmcompile"].endswith("nmcompile")  # importable, pymetis or not
    body = json.loads((out / "gpu_latency.json").read_text())
    assert body["dry_run"] is True and body["stopped"] is None
    pf = body["preflight"]
    assert pf["ok"] and pf["output_row_major"] and pf["rel_err"] < 2e-2
    linear = [r for r in body["rows"] if r["part"] == "linear"]
    bert = [r for r in body["rows"] if r["part"] == "bert"]
    assert len(linear) == 4 and len(bert) == 2
    for r in linear:
        assert set(r["graph_ms"]) == {"dense", "torch_sparse", "sparse"}
        assert r["rel_err"] < 2e-2 and r["speedup"] > 0
    for r in bert:
        assert set(r["graph_ms"]) == {"dense", "masked", "sparse", "torch_sparse"}
        assert r["converted"] == 8 and r["rel_err"] < 5e-2
        assert r["speedup"] == pytest.approx(r["graph_ms"]["masked"] / r["graph_ms"]["sparse"])
        assert set(r["graph_fallback"]) == set(r["graph_ms"])  # labelled: no CUDA graph on CPU
    assert body["parts"]["trt"].startswith(("skipped", "ok"))
    md = (out / "gpu_latency.md").read_text()
    assert "Dry run on CPU" in md and "| bert_tiny | bf16 | 8 |" in md and "Crossover" in md


@pytest.mark.slow
def test_sigterm_keeps_the_rows_measured_and_says_why_it_stopped(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(["--dry-run", "--parts", "linear,vit", "--out", str(out)])
    deadline = time.time() + 240
    while time.time() < deadline:  # the linear rows land one by one, then vit compiles
        if out.exists() and any(r["part"] == "linear" for r in json.loads(out.read_text())["rows"]):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no row was written")
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, log[-2000:]
    body = json.loads(out.read_text())  # complete JSON: written atomically
    assert body["stopped"].startswith("SIGTERM during")
    assert any(r["part"] == "linear" for r in body["rows"])


def test_budget_is_checked_before_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run(["--dry-run", "--parts", "linear", "--budget-s", "0", "--out", str(out)])
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-2000:]
    body = json.loads(out.read_text())
    assert body["rows"] == [] and body["parts"]["linear"].startswith("stopped: linear")


def test_capture_falls_back_to_eager_with_the_reason():
    calls = []
    cap = capture_cuda_graph(lambda: calls.append(1))
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the capture itself is checked by the GPU run's preflight")
    assert not cap.graph and "no CUDA device" in cap.note
    cap.fn()
    assert calls == [1]


@pytest.mark.gpu
def test_cuda_graph_replay_reruns_the_kernels_on_new_input_values():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.zeros(64, 64, device="cuda")
    out = torch.empty_like(x)
    cap = capture_cuda_graph(lambda: torch.mul(x, 2, out=out))
    assert cap.graph, cap.note
    x.fill_(3.0)
    cap.fn()
    torch.cuda.synchronize()
    assert float(out[0, 0]) == 6.0


def test_runtime_does_not_depend_on_the_cli():
    code = (
        "import sys, nmcompile.runtime.bench, nmcompile.runtime.latency_lut; "
        "sys.exit('nmcompile.cli' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
