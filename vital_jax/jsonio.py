"""Small file helpers shared across the package: reading a JSON file with an error that names it (model configs,
processors, data ingestion), replacing a file atomically (reports, datasets, figures), making renames in a
directory durable, and a file's SHA-256."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from typing import IO, Callable


def file_sha256(path: str) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks (images, records, build inputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def url_problem(path: str) -> str | None:
    """Why `path` cannot be a directory vital_jax writes into, or None: a URL (gs://bucket/run, s3://...). The
    workdir's lock, metrics, JSON files and reports are written with local file operations, so a bucket must be
    mounted on every host (gcsfuse, a shared filesystem) and its mount path given."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        return (f"{path} is a URL: vital_jax writes its lock, metrics and reports with local file operations; "
                "mount the bucket on every host (e.g. gcsfuse) and give the mount's path")
    return None


def read_json(path: str, error: type[Exception], missing_hint: str = "") -> object:
    """Parse `path`; a missing file, bytes that are not UTF-8 or malformed JSON raise `error` with the path (and
    `missing_hint`)."""
    if not os.path.isfile(path):
        raise error(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else ""))
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON: {e}") from e


def read_text(path: str, error: type[Exception]) -> str:
    """The UTF-8 text of `path`; bytes that are not UTF-8 raise `error` naming the path, line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: {utf8_problem(data, e)}") from e


def utf8_problem(data: bytes, e: UnicodeDecodeError) -> str:
    """What is wrong with `data` (one line or a whole file), for a message: the bad byte and its column."""
    column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based; rfind gives -1 on the first line
    return f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})"


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


def fsync_directory(path: str) -> None:
    """fsync the directory `path`, so renames and removals in it survive a power loss (a file's own fsync covers
    its data, not its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (some network and FUSE mounts) refuse to fsync a directory; there is no stronger way
        # to ask for durability there, and refusing to write at all would be worse.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def append_json_line(path: str, value) -> None:
    """Append `value` as one JSON line and fsync, so a crash loses at most the line being written.

    A torn last line (a crash mid-write) is ended with a newline first, so it stays one malformed line that
    readers report (or skip) instead of swallowing the line appended after it.
    """
    line = json.dumps(value, ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
