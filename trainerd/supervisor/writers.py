"""Is anyone still writing this file? Answered for a whole inbox scan at once.

Two sources, the cheap one first:

- **inotify's close-after-write** (``IN_CLOSE_WRITE``; watchdog's ``FileClosedEvent``): when a
  writer closes a file in a watched folder, :class:`CloseLog` records the file's (size, mtime)
  as it was then, by inode. A settled file whose size and mtime are still those needs no further
  look: its writer closed it and nobody wrote since. inotify reports every process's close,
  whoever it runs as. It misses a file written elsewhere and renamed in (no close in the folder),
  events lost to a queue overflow, and a second writer that opened the file and stays silent.
- **one /proc walk per scan** (:class:`WriterWalk`): every ``/proc/<pid>/fd/*`` is stat'ed once
  and compared with the inodes still in doubt; only a match has its ``fdinfo`` flags read. The
  cost is O(open fds on the machine) per scan, whatever the number of files; the walk is done in
  slices (:meth:`WriterWalk.step` with a deadline) so a host with 100k open fds never holds the
  loop for long. An unprivileged daemon cannot list another user's ``/proc/<pid>/fd`` (EACCES;
  ``hidepid=`` hides even the pids): their writers are invisible, and only ``supervisor.settle_s``
  (and the close events, which do see them) protects their files.

stdlib only; the supervisor side uses it (the inbox), never the worker.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["CloseLog", "FileId", "WriterWalk", "open_for_writing"]

FileId = tuple[int, int]  # (st_dev, st_ino)

# A close record whose file never became a candidate (a .part renamed away, a deleted file) is
# dropped after this long; the log never grows with the inbox's history.
CLOSE_RECORD_TTL_S = 600.0


class CloseLog:
    """Files closed after writing, as inotify reported them: ``(dev, ino) -> (size, mtime_ns)``
    at the moment of the close. Written from watchdog's thread, read by the loop."""

    def __init__(self) -> None:
        self._closed: dict[FileId, tuple[int, int, float]] = {}
        self._lock = threading.Lock()

    def closed(self, path: str | os.PathLike[str]) -> None:
        """A writer closed ``path`` (called from the observer's thread)."""
        try:
            st = os.lstat(path)
        except OSError:
            return  # renamed or removed since: the next close, or the walk, will tell
        with self._lock:
            self._closed[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, time.monotonic())

    def unchanged_since_close(self, st: os.stat_result) -> bool:
        """True when a writer closed this file and it has not changed since."""
        with self._lock:
            rec = self._closed.get((st.st_dev, st.st_ino))
        return rec is not None and rec[0] == st.st_size and rec[1] == st.st_mtime_ns

    def forget(self, fid: FileId) -> None:
        with self._lock:
            self._closed.pop(fid, None)

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for fid in [f for f, rec in self._closed.items() if now - rec[2] > CLOSE_RECORD_TTL_S]:
                del self._closed[fid]

    def __len__(self) -> int:
        return len(self._closed)


class WriterWalk:
    """One walk of ``/proc`` looking for writers of ``targets``, resumable across turns.

    ``step(deadline)`` walks processes until ``time.monotonic() >= deadline`` (at least one per
    call) and returns True once every process was looked at; ``found`` maps each target some
    process has open for writing (``O_WRONLY``/``O_RDWR``) to one such pid. A process that opens a
    target after the walk passed it is not seen: the walk is a snapshot, as a single check was.
    """

    def __init__(self, targets: set[FileId], proc: str = "/proc"):
        self.targets = set(targets)
        self.found: dict[FileId, int] = {}
        self.fds_seen = 0
        self.processes_seen = 0
        self.unreadable = 0   # processes whose fds we may not list (another user's, unprivileged)
        self._proc = proc
        self._pids: list[str] | None = None if self.targets else []
        self._next = 0

    @property
    def done(self) -> bool:
        return self._pids is not None and self._next >= len(self._pids)

    def step(self, deadline: float) -> bool:
        if self._pids is None:
            self._pids = [n for n in os.listdir(self._proc) if n.isdigit()]
        while self._next < len(self._pids):
            pid = self._pids[self._next]
            self._next += 1
            self._look(pid)
            if self.found.keys() >= self.targets:
                self._next = len(self._pids)  # every target has a writer: nothing left to learn
            elif time.monotonic() >= deadline:
                break
        return self.done

    def run(self) -> dict[FileId, int]:
        """The whole walk at once."""
        while not self.step(float("inf")):
            pass
        return self.found

    def _look(self, pid: str) -> None:
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            self.unreadable += 1
            return
        except OSError:  # gone
            return
        self.processes_seen += 1
        self.fds_seen += len(fds)
        targets, found = self.targets, self.found
        for fd in fds:
            try:
                # stat() follows the magic link to the open file itself, even after a rename.
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            fid = (st.st_dev, st.st_ino)
            if fid not in targets or fid in found:
                continue
            if _open_for_write(f"{self._proc}/{pid}/fdinfo/{fd}"):
                found[fid] = int(pid)


def _open_for_write(fdinfo: str) -> bool:
    try:
        with open(fdinfo) as f:
            flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
    except (OSError, ValueError):
        return False
    return bool(flags & (os.O_WRONLY | os.O_RDWR))


def open_for_writing(path: str | os.PathLike[str]) -> int | None:
    """The pid of a process that has ``path`` open for writing, or None (one whole walk)."""
    try:
        st = os.lstat(Path(path))
    except FileNotFoundError:
        return None
    fid = (st.st_dev, st.st_ino)
    return WriterWalk({fid}).run().get(fid)
