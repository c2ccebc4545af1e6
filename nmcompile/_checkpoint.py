"""Round checkpoints: written atomically, verified by checksum, never loaded torn.

After each finished round the whole run state (model weights and buffers, masks, rewind snapshot,
method state, trainer data position, RNG states, history, FLOPs) goes to
``<dir>/round-<r>.pt`` with a sidecar ``round-<r>.json`` holding its SHA-256, the method and its
config. The payload is written to a temporary file, fsynced and renamed; the sidecar is written
the same way after it. A round counts as saved only when both exist and the checksum matches, so a
kill at any moment leaves the previous good round loadable. Older rounds beyond ``keep`` are
removed only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ._errors import ConfigError, NMCompileError
from ._io import atomic_path, atomic_write_json, ensure_dir, fsync_dir

__all__ = [
    "CheckpointError",
    "find_latest",
    "load_round",
    "remove_stale_temps",
    "rounds_in",
    "save_round",
    "set_aside",
]

_NAME = re.compile(r"^round-(\d{4,})\.pt$")


class CheckpointError(NMCompileError):
    """A checkpoint that is missing, corrupt, or from a different run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_round(
    folder: str | os.PathLike,
    round_index: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write round ``round_index`` atomically; prune older rounds beyond ``keep``."""
    folder = ensure_dir(folder, what="checkpoint folder")
    path = folder / f"round-{round_index:04d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    with atomic_path(path, what="checkpoint") as tmp:
        tmp.write_bytes(payload)  # atomic_path fsyncs, then renames over the destination
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write_json(path.with_suffix(".json"), {**meta, "round": round_index, "sha256": digest})
    fsync_dir(folder)
    # Only rounds older than the one just written go; a newer number is never this run's.
    rounds = sorted(r for r in _rounds(folder) if r <= round_index)
    for old in rounds[:-keep] if keep > 0 else []:
        for suffix in (".pt", ".json"):
            (folder / f"round-{old:04d}{suffix}").unlink(missing_ok=True)
    return path


def rounds_in(folder: str | os.PathLike) -> list[int]:
    """The round numbers of every checkpoint file in ``folder``, usable or not, ascending."""
    return sorted(_rounds(Path(folder)))


def set_aside(folder: str | os.PathLike, rounds: list[int]) -> list[Path]:
    """Rename unusable rounds to ``round-<r>.pt.unusable`` (and their sidecars): kept for a look,
    never matched again, so they can neither be resumed nor make a new round look old."""
    folder = Path(folder)
    moved = []
    for r in rounds:
        for suffix in (".pt", ".json"):
            src = folder / f"round-{r:04d}{suffix}"
            if src.exists():
                dst, k = src.with_name(src.name + ".unusable"), 1
                while dst.exists():  # an earlier set-aside of the same round stays too
                    dst, k = src.with_name(f"{src.name}.unusable.{k}"), k + 1
                os.replace(src, dst)
                moved.append(dst)
    if moved:
        fsync_dir(folder)
    return moved


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete temporary files a killed writer left (``.round-*.tmp``); they are never read."""
    folder = Path(folder)
    for p in folder.glob(".round-*.tmp") if folder.is_dir() else []:
        p.unlink(missing_ok=True)


def _rounds(folder: Path) -> list[int]:
    out = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _NAME.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return out


def _check(folder: Path, r: int, meta: dict[str, Any]) -> tuple[bool, str]:
    """(usable, reason) for round ``r``: sidecar present, checksum matches, same run."""
    path = folder / f"round-{r:04d}.pt"
    side = path.with_suffix(".json")
    if not side.is_file():
        return False, "its metadata file is missing (the write was interrupted)"
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return False, f"its metadata file is unreadable ({exc})"
    if _sha256(path) != info.get("sha256"):
        return False, "its checksum does not match (truncated or corrupted)"
    for key in meta:
        if key not in info:
            raise ConfigError(
                f"checkpoint {path} was written by an older nmcompile that did not record the "
                f"run's {key}; it cannot be checked against this run. Start a fresh "
                "checkpoint_dir"
            )
        if info.get(key) != meta.get(key):
            theirs, ours = repr(info.get(key))[:300], repr(meta.get(key))[:300]
            raise ConfigError(
                f"checkpoint {path} was written by a run with {key}={theirs}, this run has "
                f"{key}={ours}. Resume with the same model, method, pattern and options, or pass "
                "a fresh checkpoint_dir"
            )
    return True, ""


def find_latest(folder: str | os.PathLike, meta: dict[str, Any]) -> int | None:
    """The newest round in ``folder`` that is complete and matches ``meta``; None if there is
    none. A newer round that is torn or corrupt is skipped with a warning naming it."""
    folder = Path(folder)
    for r in sorted(_rounds(folder), reverse=True):
        ok, reason = _check(folder, r, meta)
        if ok:
            return r
        warnings.warn(
            f"checkpoint {folder / f'round-{r:04d}.pt'} is not usable: {reason}; falling back to "
            "the previous round",
            stacklevel=2,
        )
    return None


def load_round(folder: str | os.PathLike, r: int) -> dict[str, Any]:
    path = Path(folder) / f"round-{r:04d}.pt"
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and containers, never code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # checksum verified first, so the format itself is unreadable
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
