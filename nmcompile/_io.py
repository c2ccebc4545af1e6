"""Output paths that are never left half-written.

``atomic_path(dest)`` yields a temporary path in the destination's folder; the caller writes it,
and only on success is it fsynced and renamed over ``dest`` (rename is atomic on POSIX within one
filesystem). On failure the temporary file is removed, so a crash or an exception leaves either
the old file or no file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import OutputPathError

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text", "ensure_dir", "fsync_dir"]


def ensure_dir(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check it is writable; ``OutputPathError`` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(
            f"cannot create the {what} {str(folder)!r}: {exc.strerror or exc}. Pick a folder you "
            "can write to"
        ) from exc
    if not folder.is_dir():
        raise OutputPathError(f"the {what} {str(folder)!r} exists and is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nmcompile-probe-"):
            pass
    except OSError as exc:
        raise OutputPathError(
            f"the {what} {str(folder)!r} is not writable ({exc.strerror or exc}); pick a folder "
            "you can write to"
        ) from exc
    return folder


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, what: str = "output file") -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it over ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.is_dir():
        raise OutputPathError(f"the {what} {str(dest)!r} is a folder; give a file path")
    ensure_dir(dest.parent if str(dest.parent) else ".", what=f"folder of the {what}")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def atomic_write_json(dest: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(dest, json.dumps(data, indent=2, default=str) + "\n")
