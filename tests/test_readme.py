"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    result = scope["result"]
    assert result.history[-1]["accuracy"] > 0.9
    assert os.path.isfile(tmp_path / "model.onnx")
    assert all(m.dtype == torch.bool for m in result.masks.values())


def test_readme_hugging_face_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("transformers")
    import warnings

    import nmcompile

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    hf = [b for b in blocks if "transformers.BertConfig" in b]
    assert len(hf) == 1, "README's Hugging Face example is missing"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nmcompile.NMCompileWarning)
        exec(compile(hf[0], "README.md", "exec"), scope)
    result = scope["result"]
    assert result.tracer == "export"
    assert [e.name for e in result.excluded] == ["classifier"]
    assert scope["logits"].shape == (4, 2)  # the other batch size and length ran
    assert scope["onnx"].nm_report.declared_ok
    assert os.path.isfile(tmp_path / "bert_fp16.onnx")


def test_readme_one_shot_example_runs(tmp_path, monkeypatch):
    """The calibrated one-shot example: sparsegpt with permutations on a digits MLP."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    one_shot = [b for b in blocks if "calibration=" in b]
    assert len(one_shot) == 1
    scope: dict = {}
    exec(compile(one_shot[0], "README.md", "exec"), scope)
    result = scope["result"]
    assert result.diagnostics["calibration_layers"] and (tmp_path / "mlp_2to4.onnx").exists()
    layers = result.diagnostics["permutation"]["layers"]
    assert any(v["retained_after"] > v["retained_before"] for v in layers.values())
