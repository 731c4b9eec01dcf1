"""Files the commands write on request (``report -o``, ``compare -o``): checked first, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from harness import trace


class OutputPathError(ValueError):
    """An output file cannot be written where asked; the message says why and what to do."""


def check_output_file(path: str | Path, option: str = "-o") -> Path:
    """Refuse, before any work, an output path that cannot become a file.

    Catches an existing folder, a path under a file and a folder without write
    permission; what only the write itself reveals (a full disk, a read-only
    mount) is reported by ``write_output_file``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file path (a new name, or one inside it)")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{option} {path}: {folder} is a file, not a folder; choose another {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: folder {folder} is not writable; choose another {option}")
    return path


def write_output_file(path: str | Path, data: bytes, option: str = "-o") -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder); OS errors become ``OutputPathError``."""
    path = check_output_file(path, option)
    try:
        trace.atomic_write_bytes(path, data)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"{option} {path}: cannot write it ({reason}); choose another {option}") from None
    return path
