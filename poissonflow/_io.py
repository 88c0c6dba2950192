"""Atomic file writes: the one implementation behind the feature cache and the experiment's
outputs.

A file is written to a temporary file in the same folder (same file system, so the final rename
is atomic), flushed and fsync'ed, then renamed onto its name with `os.replace`. An interruption
at any moment (Ctrl-C, a crash, a full disk) leaves either the previous file or the complete new
one, never a half-written file under the final name. The temporary file is removed on any
Python exception (KeyboardInterrupt included); only a hard kill can leave one behind, under a
name that starts with `TMP_PREFIX` and is never read as a result.

The temporary file is created with `os.open(..., 0o666)`, so the operating system applies the
process umask exactly as it does for `open(path, "w")`: results are readable by the group and
others under the usual umask 022 (mode 0644). `tempfile.mkstemp` would create them 0600, which
made shared result folders unreadable to collaborators.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "TMP_PREFIX"]

TMP_PREFIX = ".tmp-"

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, exclusively created file next to the target; 0o666 before the umask."""
    for _ in range(100):
        tmp = folder / f"{TMP_PREFIX}{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    raise FileExistsError(f"could not create a temporary file next to {folder / name}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls write(f) on a binary file object, then puts the result at `path` atomically.

    The parent folder is created if needed. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the final name was never touched, drop the partial file.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))
