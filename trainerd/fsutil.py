"""Crash-safe file helpers (stdlib only; used by the supervisor and the worker).

The rule everywhere: write to a temporary name in the same directory, fsync the data,
``os.replace`` into place, fsync the directory. A reader sees the old file or the new one,
never half of either; after power loss the rename is durable only once the directory is
fsynced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "fsync_tree",
    "publish_dir",
    "read_json",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o640, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically. ``durable=False`` skips fsync (progress files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(),
                       durable=durable)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (bottom-up), then ``path`` itself."""
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def publish_dir(src_tmp: Path, dest: Path) -> None:
    """Move a fully written, fsynced temporary directory to ``dest`` atomically.

    ``dest`` must not exist (versions are immutable); if it does, the caller raced itself.
    """
    src_tmp, dest = Path(src_tmp), Path(dest)
    fsync_tree(src_tmp)
    os.rename(src_tmp, dest)  # rename(2) of a directory fails if dest is a non-empty dir
    fsync_dir(dest.parent)


def write_ballast(path: Path, size: int) -> bool:
    """Write a ballast file of ``size`` bytes (written for real: tmpfs and ext4 allocate on write,
    a sparse file reserves nothing). Deleting it later frees room for the writes that must still
    succeed on a full disk. False (and nothing left behind) when there is no room for it."""
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return False


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
