"""The JSON-lines log the long benchmarks resume from.

One finished run per line, appended with flush + fsync, so a benchmark killed at any point keeps
every run it finished. A line torn by a kill during the append is the only thing lost: it is
skipped with a message on load (the run is redone) and cut off before the next append, so the
file stays valid JSON lines.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, path: str | os.PathLike, setting: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.setting = setting
        self.all: list[dict[str, Any]] = []
        self._valid_bytes = 0
        if self.path.exists():
            raw = self.path.read_bytes()
            for line in raw.splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    print(
                        f"{self.path}: skipping a torn line (a run killed while it was being "
                        "written); that run is redone",
                        file=sys.stderr,
                    )
                    break
                if not line.endswith(b"\n"):
                    break  # complete JSON, but its newline never landed: redo it too
                self.all.append(row)
                self._valid_bytes += len(line)
            if self._valid_bytes != len(raw):
                with open(self.path, "r+b") as fh:
                    fh.truncate(self._valid_bytes)
        # the runs of this setting (others stay in the file, untouched)
        self.runs = [r for r in self.all if r.get("setting") == setting]

    def done(self, key: Callable[[dict[str, Any]], Hashable]) -> set[Hashable]:
        return {key(r) for r in self.runs}

    def append(self, row: dict[str, Any]) -> None:
        row = {**row, "setting": self.setting}
        line = (json.dumps(row) + "\n").encode()
        with open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.all.append(row)
        self.runs.append(row)


def _plain(v: Any) -> bool:
    """A value JSON writes as itself: scalars, None, and lists of them (nested)."""
    if v is None or isinstance(v, (int, float, str, bool)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)


def result_row(result: Any, t0: float) -> dict[str, Any]:
    """What a benchmark logs of a finished ``nmcompile.compile`` run started at ``t0``
    (``time.perf_counter()``): final accuracy and training FLOPs, rounds, sparsity, wall time, the
    per-round history (plain values and lists of them, e.g. L-mIMP's early-bird checks) and the
    early-bird summary of ``result.diagnostics`` when the method has one."""
    import time

    last = result.history[-1]
    row = {
        "accuracy": last["accuracy"],
        "train_flops": last["train_flops"],
        "rounds": len(result.history),
        "sparsity": result.sparsity,
        "wall_s": time.perf_counter() - t0,
        "history": [{k: v for k, v in h.items() if _plain(v)} for h in result.history],
    }
    eb = (getattr(result, "diagnostics", None) or {}).get("early_bird")
    if eb is not None:
        row["early_bird"] = eb
    return row
