"""Small file helpers shared across the package: reading a JSON file with an error that names it (model configs,
processors, data ingestion) and replacing a file atomically (reports, datasets, figures)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable


def read_json(path: str, error: type[Exception], missing_hint: str = "") -> object:
    """Parse `path`; a missing file or malformed JSON raises `error` with the path (and `missing_hint`)."""
    if not os.path.isfile(path):
        raise error(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON: {e}") from e


def atomic_write(path: str, write: Callable[[IO], object], binary: bool = False) -> str:
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename it to `path`; returns the path.

    Readers see the old file or the new one, never a partial one; on an error the temporary file is removed and
    `path` is untouched. Text files are UTF-8. Missing directories are created; the file is readable (0644).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make outputs unreadable to other users
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
