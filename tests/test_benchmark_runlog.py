"""The benchmarks' resumable JSON-lines log keeps every finished run through a kill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _runlog import RunLog, result_row


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


def test_result_row_keeps_early_bird_checks_and_drops_tensors():
    """L-mIMP's per-round checks are lists ([iteration, distance]); they are what the early-bird
    claim is judged from, so the row must keep them (it used to keep scalars only)."""
    import time
    from types import SimpleNamespace

    import torch

    history = [
        {"round": 0, "accuracy": 0.5, "train_flops": 1.0, "eb_checks": [], "mask": torch.ones(2)},
        {
            "round": 1,
            "accuracy": 0.6,
            "train_flops": 2.0,
            "eb_checks": [[10, None], [20, 0.05]],
            "eb_stop_iteration": 20,
        },
    ]
    eb = {"distance": "pool", "rounds": [{"round": 1, "checks": [[10, None], [20, 0.05]]}]}
    result = SimpleNamespace(history=history, sparsity=0.5, diagnostics={"early_bird": eb})
    row = result_row(result, time.perf_counter())
    assert row["history"][1]["eb_checks"] == [[10, None], [20, 0.05]]
    assert row["history"][1]["eb_stop_iteration"] == 20
    assert "mask" not in row["history"][0]
    assert row["early_bird"] == eb
    json.dumps(row)  # a JSON-lines row
    no_eb = SimpleNamespace(history=history, sparsity=0.5, diagnostics={})
    assert "early_bird" not in result_row(no_eb, time.perf_counter())
