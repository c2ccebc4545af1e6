"""Checkpoints: written atomically, verified by checksum, never loaded torn.

The round engine saves the whole run state (model weights and buffers, masks, rewind snapshot,
method state, trainer data position, RNG states, history, FLOPs) after every pruning step to
``<dir>/round-<r>.pt``; single-run methods save theirs every ``checkpoint_every`` iterations to
``<dir>/step-<i>.pt`` (``stem``). Each file has a sidecar ``<stem>-<r>.json`` holding its SHA-256,
the method and its config. The payload is written to a temporary file, fsynced and renamed; the sidecar is written
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
    "choose_latest",
    "find_latest",
    "load_round",
    "prepare_folder",
    "remove_stale_temps",
    "rounds_in",
    "save_round",
    "set_aside",
]


def _name(stem: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(stem)}-(\d{{4,}})\.pt$")


class CheckpointError(NMCompileError):
    """A checkpoint that is missing, corrupt, or from a different run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file(folder: Path, r: int, stem: str, suffix: str = ".pt") -> Path:
    return folder / f"{stem}-{r:04d}{suffix}"


def save_round(
    folder: str | os.PathLike,
    round_index: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep: int = 2,
    stem: str = "round",
) -> Path:
    """Write checkpoint ``round_index`` atomically; prune older ones beyond ``keep``."""
    folder = ensure_dir(folder, what="checkpoint folder")
    path = _file(folder, round_index, stem)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    with atomic_path(path, what="checkpoint") as tmp:
        tmp.write_bytes(payload)  # atomic_path fsyncs, then renames over the destination
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write_json(path.with_suffix(".json"), {**meta, stem: round_index, "sha256": digest})
    fsync_dir(folder)
    # Only checkpoints older than the one just written go; a newer number is never this run's.
    rounds = sorted(r for r in _rounds(folder, stem) if r <= round_index)
    for old in rounds[:-keep] if keep > 0 else []:
        for suffix in (".pt", ".json"):
            _file(folder, old, stem, suffix).unlink(missing_ok=True)
    return path


def rounds_in(folder: str | os.PathLike, *, stem: str = "round") -> list[int]:
    """The numbers of every checkpoint file in ``folder``, usable or not, ascending."""
    return sorted(_rounds(Path(folder), stem))


def set_aside(folder: str | os.PathLike, rounds: list[int], *, stem: str = "round") -> list[Path]:
    """Rename unusable checkpoints to ``<stem>-<r>.pt.unusable`` (and their sidecars): kept for a
    look, never matched again, so they can neither be resumed nor make a new one look old."""
    folder = Path(folder)
    moved = []
    for r in rounds:
        for suffix in (".pt", ".json"):
            src = _file(folder, r, stem, suffix)
            if src.exists():
                dst, k = src.with_name(src.name + ".unusable"), 1
                while dst.exists():  # an earlier set-aside of the same one stays too
                    dst, k = src.with_name(f"{src.name}.unusable.{k}"), k + 1
                os.replace(src, dst)
                moved.append(dst)
    if moved:
        fsync_dir(folder)
    return moved


def remove_stale_temps(folder: str | os.PathLike, *, stem: str = "round") -> None:
    """Delete temporary files a killed writer left (``.<stem>-*.tmp``); they are never read."""
    folder = Path(folder)
    for p in folder.glob(f".{stem}-*.tmp") if folder.is_dir() else []:
        p.unlink(missing_ok=True)


def _rounds(folder: Path, stem: str) -> list[int]:
    name = _name(stem)
    out = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = name.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return out


def _check(folder: Path, r: int, meta: dict[str, Any], stem: str) -> tuple[bool, str]:
    """(usable, reason) for checkpoint ``r``: sidecar present, checksum matches, same run."""
    path = _file(folder, r, stem)
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


def find_latest(
    folder: str | os.PathLike, meta: dict[str, Any], *, stem: str = "round"
) -> int | None:
    """The newest checkpoint in ``folder`` that is complete and matches ``meta``; None if there
    is none. A newer one that is torn or corrupt is skipped with a warning naming it."""
    folder = Path(folder)
    for r in sorted(_rounds(folder, stem), reverse=True):
        ok, reason = _check(folder, r, meta, stem)
        if ok:
            return r
        warnings.warn(
            f"checkpoint {_file(folder, r, stem)} is not usable: {reason}; falling back to "
            "the previous one",
            stacklevel=2,
        )
    return None


def choose_latest(
    folder: str | os.PathLike, meta: dict[str, Any], *, stem: str = "round"
) -> int | None:
    """The newest usable checkpoint; newer torn or corrupt ones are set aside, so the
    checkpoints this run writes next are never taken for older ones. Run it on rank 0 only."""
    latest = find_latest(folder, meta, stem=stem)
    newer = [r for r in rounds_in(folder, stem=stem) if latest is None or r > latest]
    set_aside(folder, newer, stem=stem)
    return latest


def prepare_folder(folder: str | os.PathLike, *, resume: bool, stem: str = "round") -> None:
    """Before any training (rank 0): the folder is writable, free of temp files a killed writer
    left, and not another run's unless this run resumes."""
    ensure_dir(folder, what="checkpoint folder")
    remove_stale_temps(folder, stem=stem)
    existing = rounds_in(folder, stem=stem)
    if not resume and existing:
        raise ConfigError(
            f"checkpoint_dir {str(folder)!r} already holds the checkpoints of a run (newest: "
            f"{stem}-{existing[-1]:04d}.pt); pass resume=True to continue it, or a fresh "
            "checkpoint_dir for a new run"
        )


def load_round(folder: str | os.PathLike, r: int, *, stem: str = "round") -> dict[str, Any]:
    path = _file(Path(folder), r, stem)
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and containers, never code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # checksum verified first, so the format itself is unreadable
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
