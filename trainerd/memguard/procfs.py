"""The small readers of procfs (and cgroupfs) files the guard polls ten times a second.

No psutil per poll: a read here is one pread of a file kept open, or an open/read/close of a
small generated file. psutil is only the fallback for the process tree where the kernel lacks
``/proc/<pid>/task/<tid>/children``.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on x86-64);
# anything this large is not a limit.
NO_LIMIT = 1 << 62


def read_text(path: str | Path, limit: int = 1 << 16) -> str:
    # os.open/os.read: no Python file object, no buffering layer — this runs ten times a
    # second. procfs/cgroupfs files are generated on read; loop until EOF.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while size < limit:
            b = os.read(fd, limit - size)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(fd)


def read_int(path: str | Path) -> int | None:
    """One number; None for "max", a v1 "no limit", garbage or a missing file."""
    try:
        text = read_text(path, 256).strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return None if v >= NO_LIMIT else v


class OpenFiles:
    """Hot files kept open and re-read with pread(fd, n, 0).

    Saves the path walk of open(2) on every poll (~30% of a cold read here). procfs and
    cgroupfs files are regenerated on every read from offset 0. An open /proc/<pid>/status
    stays bound to that process: once it is reaped, reads fail (ESRCH) instead of silently
    describing a new process that reused the pid.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, path: str, limit: int = 1 << 13) -> str:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[path] = fd
        try:
            data = os.pread(fd, limit, 0)
        except OSError:
            self.close(path)
            raise
        return data.decode("ascii", "replace")

    def close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_all(self, prefix: str = "") -> None:
        for path in [p for p in self._fds if p.startswith(prefix)]:
            self.close(path)

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown
        try:
            self.close_all()
        except Exception:
            pass


def meminfo(limit: int = 1 << 14) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in read_text("/proc/meminfo", limit).splitlines():
        k, _, rest = line.partition(":")
        f = rest.split()
        if f:
            try:
                out[k] = int(f[0]) * (1024 if len(f) > 1 else 1)
            except ValueError:
                pass
    return out


def mem_available(files: OpenFiles | None = None) -> int:
    # MemAvailable is the third line; 256 bytes cover it without formatting the whole file.
    text = files.read("/proc/meminfo", 256) if files is not None else read_text("/proc/meminfo", 256)
    i = text.find("MemAvailable:")
    if i < 0:
        return meminfo().get("MemAvailable", 0)
    return int(text[i + 13:].split(None, 1)[0]) * 1024


def _status_kib(text: str, key: str) -> int:
    i = text.find(key)
    if i < 0:
        return 0
    j = text.find("kB", i)
    return int(text[i + len(key):j]) * 1024


def proc_status(pid: int, files: OpenFiles | None = None) -> tuple[bool, int, int]:
    """(alive, unreclaimable_bytes, rss_bytes) from /proc/<pid>/status.

    Unreclaimable = RssAnon + RssShmem: file-backed pages (memory-mapped weights, libraries)
    are clean page cache the kernel can drop; anonymous and shmem pages are not.
    A zombie counts as dead: it holds no memory, only its pid (the supervisor reaps it).
    """
    try:
        path = f"/proc/{pid}/status"
        text = files.read(path) if files is not None else read_text(path, 1 << 13)
    except OSError:
        return False, 0, 0
    i = text.find("State:")
    st = text[i + 6:i + 16].strip()[:1] if i >= 0 else "?"
    if st in ("Z", "X"):
        return False, 0, 0
    # str.find, not a loop over ~55 lines: this runs for every process of the tree, every poll.
    rss = _status_kib(text, "VmRSS:")
    if "RssAnon:" not in text:  # kernels before 4.5: all of RSS, the conservative side
        return True, rss, rss
    return True, _status_kib(text, "RssAnon:") + _status_kib(text, "RssShmem:"), rss


def children(pid: int) -> list[int] | None:
    """Direct children through /proc/<pid>/task/*/children; None where the kernel lacks it."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            kids.extend(int(x) for x in read_text(f"/proc/{pid}/task/{tid}/children", 1 << 16).split())
        except FileNotFoundError:
            if tid == str(pid) and os.path.exists(f"/proc/{pid}"):
                return None  # CONFIG_PROC_CHILDREN is off: fall back to psutil
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """The pid and all its descendants."""
    out = [pid]
    i = 0
    while i < len(out):
        kids = children(out[i])
        if kids is None:
            try:
                return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                return [pid]
        out.extend(k for k in kids if k not in out)
        i += 1
    return out
