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
