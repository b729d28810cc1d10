"""Atomic writes: a result file (or folder) is either the old complete one or the new complete one, never half."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to `path`, entirely or not at all: a write that fails part way
    (disk full, quota) is cut back off, so a reader never sees half a line. Not for concurrent
    writers (one process, rank zero, writes a run's metrics)."""
    if "\n" in line:
        raise ValueError("append_line writes one line; the text holds a newline")
    data = (line + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock (flock) held for the block: parallel runs of one sweep take turns
    at building a shared cache (a warm start) instead of each building it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file under a folder, to disk."""
    path = Path(path)
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False):
    """Yield a new temporary folder beside `path` to fill; when the block ends without an error,
    it is flushed to disk and renamed to `path`, so that `path` is never a half-written folder.
    An existing `path` is an error unless `replace`: then it is moved aside first and removed
    after (a crash between the two renames leaves it in `.<name>.old-*/` beside `path`)."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
