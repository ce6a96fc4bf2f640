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
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "fmt_bytes",
    "fmt_duration",
    "free_bytes",
    "fsync_dir",
    "fsync_tree",
    "group_readable",
    "open_regular",
    "publish_dir",
    "read_json",
    "read_json_or_none",
    "unlink_quietly",
    "write_ballast",
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


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable, torn or not an object.

    For the files one process writes and the other only reads as a hint or a last word
    (result.json, progress.json, daemon.json): their absence is an answer, never an error.
    """
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading without following a symlink (O_NOFOLLOW) or blocking on a
    FIFO (O_NONBLOCK, cleared once fstat says it is a regular file). OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=1 << 16)
    except BaseException:
        os.close(fd)
        raise


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of ``path``; None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fmt_bytes(n: Any) -> str:
    """``3.2 GiB``; ``-`` for an unknown or non-positive figure."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_duration(s: Any) -> str:
    """``42s``, ``12m05s``, ``1h52m``, ``3d04h``: as precise as a person reads an ETA; ``-`` if unknown."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or s < 0:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


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


def group_readable(path: Path) -> None:
    """Modes 0640 for every file and 0750 for every folder under ``path`` (and ``path`` itself):
    what the daemon publishes is readable by its group (operators, a serving process) and by
    nobody else, whatever library wrote it. safetensors' ``save_pretrained`` creates
    ``adapter_model.safetensors`` 0600 whatever the umask; without this an operator in the group
    reads trainerd.json but not the weights, and a vLLM server in the group cannot load them.
    Symlinks are left alone (chmod would follow them)."""
    os.chmod(path, 0o750)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode):
                os.chmod(p, 0o750)
            elif stat.S_ISREG(mode):
                os.chmod(p, 0o640)


def publish_dir(src_tmp: Path, dest: Path, *, replace: bool = False) -> None:
    """Make a fully written temporary directory visible as ``dest`` in one step.

    Its modes are set (:func:`group_readable`), every file in it is fsynced, then it is renamed,
    then the parent is fsynced: a reader (or a restart after a power cut) sees no ``dest`` or the
    whole of it, never half. ``replace`` removes an existing ``dest`` first (re-saving the same
    checkpoint step); without it an existing ``dest`` fails the rename (versions are immutable;
    the caller raced itself).
    """
    src_tmp, dest = Path(src_tmp), Path(dest)
    group_readable(src_tmp)
    fsync_tree(src_tmp)
    if replace and dest.exists():
        shutil.rmtree(dest)
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
