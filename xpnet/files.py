"""Writing files so that nothing a user saved is ever lost or half-written.

A leaf module (it imports nothing from xpnet), shared by model files, run records and plots.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "check_file_target"]


def check_file_target(path, example: str) -> Path:
    """``path`` as a ``Path``, once it is sure to name a regular file that can be written.

    Refused: a folder (the message suggests ``path / example``), a missing parent folder, and
    anything that exists and is not a regular file (a rename onto a FIFO or a device node would
    replace it).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / example}")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file: xpnet writes only regular files")
    return path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it owner-only; a saved file is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
