"""The benchmarks' resumable JSON-lines log keeps every finished run through a kill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _runlog import RunLog


def test_runlog_appends_resumes_and_drops_a_torn_line(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    log = RunLog(path, {"model": "cnn"})
    log.append({"seed": 0, "acc": 0.5})
    log.append({"seed": 1, "acc": 0.6})
    other = RunLog(path, {"model": "mlp"})  # another setting shares the file
    other.append({"seed": 0, "acc": 0.1})
    with open(path, "ab") as fh:  # a kill in the middle of an append
        fh.write(b'{"seed": 2, "acc": 0.')
    again = RunLog(path, {"model": "cnn"})
    assert "torn line" in capsys.readouterr().err
    assert again.done(lambda r: r["seed"]) == {0, 1}
    again.append({"seed": 2, "acc": 0.7})
    rows = [json.loads(x) for x in path.read_text().splitlines()]  # every line valid again
    assert [(r["setting"]["model"], r["seed"]) for r in rows] == [
        ("cnn", 0), ("cnn", 1), ("mlp", 0), ("cnn", 2),
    ]  # fmt: skip
