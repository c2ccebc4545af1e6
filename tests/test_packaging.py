"""Packaging: the namespace layout, nothing heavy at import, torch range, README <-> CI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_passes_and_runtime_live_under_nmcompile_only(tmp_path):
    for generic in ("passes", "runtime"):
        proc = _py(f"import {generic}", tmp_path)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
    proc = _py(
        "import nmcompile.passes, nmcompile.runtime; print(nmcompile.passes.trace.__module__)",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "nmcompile.passes.trace"


def test_import_is_light(tmp_path):
    code = (
        "import sys, nmcompile, nmcompile.runtime, nmcompile.passes, nmcompile.data, nmcompile.zoo; "
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'torchvision', 'sklearn', "
        "'matplotlib', 'pymetis', 'tensorrt', 'networkx', 'scipy') if m in sys.modules]; print(heavy)"
    )
    proc = _py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_torch_range_admits_2_11_to_2_14_1_and_nothing_newer():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {
        d.split(">")[0].split("<")[0].split("=")[0].strip(): d
        for d in meta["project"]["dependencies"]
    }
    spec = SpecifierSet(deps["torch"].removeprefix("torch"))
    for ok in ("2.11.0", "2.12.1", "2.13.0", "2.14.1"):
        assert ok in spec, ok
    for bad in ("2.10.0", "2.14.2", "2.15.0"):
        assert bad not in spec, bad
    for name in (
        "torchvision",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "networkx",
        "pymetis",
        "numpy",
        "scikit-learn",
        "tqdm",
    ):
        assert name in deps, name
    extras = meta["project"]["optional-dependencies"]
    assert {"pytest", "hypothesis", "ruff"} <= {d.split(">")[0] for d in extras["dev"]}
    assert {"onnxruntime-gpu", "tensorrt"} <= {d.split(">")[0] for d in extras["gpu"]}


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln for ln in readme.splitlines() if ln.strip()]
    # the README opens with the two commands, in a code block right under the title
    assert lines[0].startswith("# ") and lines[1].startswith("```")
    end = lines.index("```", 2)
    setup_run, setup_test = lines[2:end][:2]
    assert setup_run.endswith("nmcompile run") and setup_test.endswith("pytest -q")
    assert "pip install torch==2.14.1 torchvision==0.29.1" in setup_test
    # CI takes line 2 of that block from the README rather than a copy of it
    proc = subprocess.run(
        ["bash", "-c", "awk '/^```/ {n++; next} n == 1 {print}' README.md | sed -n 2p"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == setup_test
    assert "awk '/^```/ {n++; next} n == 1 {print}' README.md | sed -n 2p" in ci
