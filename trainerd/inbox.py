"""The inbox: which files are finished, and a watchdog observer whose events are only hints.

The folder is the truth; inotify events only make the daemon look sooner. A file is taken
when all of these hold:

- its name ends in ``.jsonl`` and does not start with ``.`` (``*.part`` never matches);
- ``lstat`` says it is a regular file (a symlink, FIFO, socket, device or directory named
  ``x.jsonl`` is never opened: :meth:`Inbox.scan` reports it as rejected and the daemon
  moves the entry itself, unread, to ``failed/``);
- its size, mtime and inode have not changed for ``supervisor.settle_s``;
- no process has it open for writing (``/proc/*/fd`` + ``fdinfo`` flags) — so a slow
  ``cp`` straight into the inbox is not taken half-way, and a write-then-rename is taken
  as soon as it settles. A writer under another user is invisible to an unprivileged
  daemon; settle_s covers that case.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainerd.contract import data_suffix

__all__ = ["EVAL_SUFFIX", "Inbox", "Rejected", "eval_partner", "is_candidate_name", "is_inbox_name",
           "open_for_writing"]


EVAL_SUFFIX = ".eval.jsonl"
# A lone eval file (its data file never came) is reported once after this long.
LONE_EVAL_REPORT_S = 60.0


def is_inbox_name(name: str) -> bool:
    """A name the inbox looks at: ``*.jsonl`` (or ``*.jsonl.gz``, ``*.jsonl.zst``), not a dot-file
    (``*.part`` never matches)."""
    suffix = data_suffix(name)
    return suffix is not None and not name.startswith(".") and len(name) > len(suffix)


def _stem(name: str) -> str:
    return name[: -len(data_suffix(name) or "")]


def is_candidate_name(name: str) -> bool:
    """A data file to claim: an inbox name that is not an eval file (``name.eval.jsonl``; eval
    files are plain JSONL only, a compressed one is never claimed)."""
    return is_inbox_name(name) and not _stem(name).endswith(".eval")


def eval_partner(name: str) -> str:
    """``name.jsonl`` (or ``name.jsonl.gz|zst``) -> ``name.eval.jsonl``: the eval file that comes
    with a data file."""
    return _stem(name) + EVAL_SUFFIX


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def open_for_writing(path: Path) -> int | None:
    """The pid of a process that has ``path`` open for writing, or None.

    Reads ``/proc/<pid>/fd/*`` links and their ``fdinfo`` flags. Costs a walk of every fd on
    the machine, so it runs only for files that already look settled.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's process we may not look into
            continue
        for fd in fds:
            try:
                # stat() follows the magic link to the open file itself, even after a rename.
                fst = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if fst.st_ino != st.st_ino or fst.st_dev != st.st_dev:
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                return pid
    return None


@dataclass
class Rejected:
    """An inbox entry with a candidate name that is not a regular file."""

    name: str
    kind: str
    reason: str
    folder: Path | None = None  # the inbox lane it lies in (None: the inbox itself)


@dataclass
class _Seen:
    key: tuple[int, int, int]  # (size, mtime_ns, inode)
    since: float  # when this key was first seen
    writer_checked_at: float | None = None  # last /proc walk that found a writer


# A /proc walk costs ~5 ms per 100 processes: for a file that stays open without changing
# (a writer that paused), look again at most this often. Its close also wakes the daemon
# through inotify, so the claim is late by at most this much.
WRITER_RECHECK_S = 2.0


class Inbox:
    """Finds finished files in ``inbox_dir``. Call :meth:`scan` with the current time."""

    def __init__(self, inbox_dir: Path, *, settle_s: float, log: Any,
                 writer_check: Callable[[Path], int | None] = open_for_writing):
        self.dir = Path(inbox_dir)
        self.settle_s = settle_s
        self.log = log
        self.writer_check = writer_check
        self._seen: dict[str, _Seen] = {}
        self._writing_logged: set[tuple[str, int]] = set()
        self._lone_reported: set[tuple[str, int]] = set()
        self._observer: Any = None

    # --- watchdog hints ------------------------------------------------------------------

    def start_watching(self, on_hint: Callable[[], None]) -> None:
        """Start an inotify observer; every event in the folder calls ``on_hint`` (from its thread)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # noqa: D401 - watchdog's API
                on_hint()

        self._observer = Observer()
        self._observer.schedule(_Handler(), str(self.dir), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def watch_also(self, folder: Path, names: set[str] | None, on_hint: Callable[[], None]) -> None:
        """Also call ``on_hint`` when an entry named one of ``names`` (None: any) in ``folder`` is
        created, removed or renamed (the daemon watches ``root/.stop`` and ``requests/`` so)."""
        from watchdog.events import FileSystemEventHandler

        class _Named(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # noqa: D401 - watchdog's API
                paths = (getattr(event, "src_path", ""), getattr(event, "dest_path", ""))
                if names is None or any(os.path.basename(str(p)) in names for p in paths if p):
                    on_hint()

        if self._observer is not None:
            self._observer.schedule(_Named(), str(folder), recursive=False)

    def stop_watching(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5.0)
            self._observer = None

    # --- the rule ------------------------------------------------------------------------

    def scan(self, now: float) -> tuple[list[str], list[Rejected], float | None]:
        """Return (finished names oldest first, rejected entries, when to look again or None)."""
        ready: list[tuple[float, str]] = []
        rejected: list[Rejected] = []
        recheck_at: float | None = None
        present: set[str] = set()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return [], [], None
        settled: set[str] = set()
        for entry in entries:
            name = entry.name
            if not is_inbox_name(name):
                continue
            try:
                st = os.lstat(entry.path)  # never follow a symlink
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = _kind(st.st_mode)
                rejected.append(Rejected(name, kind, f"not a regular file ({kind}); never read", self.dir))
                continue
            present.add(name)
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            seen = self._seen.get(name)
            if seen is None or seen.key != key:
                self._seen[name] = seen = _Seen(key, now)
            due = seen.since + self.settle_s
            if now < due:
                recheck_at = due if recheck_at is None else min(recheck_at, due)
                continue
            if seen.writer_checked_at is not None and now < seen.writer_checked_at + WRITER_RECHECK_S:
                nxt = seen.writer_checked_at + WRITER_RECHECK_S
                recheck_at = nxt if recheck_at is None else min(recheck_at, nxt)
                continue
            writer = self.writer_check(Path(entry.path))
            if writer is not None:
                seen.writer_checked_at = now
                if (name, st.st_ino) not in self._writing_logged:
                    self._writing_logged.add((name, st.st_ino))
                    self.log.info("inbox_file_still_open", file=name, writer_pid=writer)
                # Still open: its close produces an inotify event; poll as well, slowly.
                nxt = now + WRITER_RECHECK_S
                recheck_at = nxt if recheck_at is None else min(recheck_at, nxt)
                continue
            settled.add(name)
            if is_candidate_name(name):
                ready.append((st.st_mtime_ns, name))
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        # What was reported once is forgotten with the file: over weeks of files these sets
        # would otherwise grow with every name the inbox ever held.
        self._writing_logged = {k for k in self._writing_logged if k[0] in present}
        self._lone_reported = {k for k in self._lone_reported if k[0] in present}
        # A data file whose eval file is there but not finished waits for it (they are claimed
        # together); an eval file alone is reported once, and never trained.
        ready = [(t, n) for t, n in ready if eval_partner(n) not in present or eval_partner(n) in settled]
        for name in present - settled:
            if name.endswith(EVAL_SUFFIX):
                nxt = now + self.settle_s
                recheck_at = nxt if recheck_at is None else min(recheck_at, nxt)
        self._report_lone_evals(present, now)
        ready.sort()
        return [n for _, n in ready], rejected, recheck_at

    def _report_lone_evals(self, present: set[str], now: float) -> None:
        for name in present:
            if not is_candidate_name(name) and not name.endswith(EVAL_SUFFIX):
                # name.eval.jsonl.gz: eval files are small and read by several rooms; plain only.
                key = (name, self._seen[name].key[2])
                if key not in self._lone_reported:
                    self._lone_reported.add(key)
                    self.log.warning("eval_file_compressed", file=name, folder=str(self.dir),
                                     hint="eval files are taken as plain .eval.jsonl only; decompress it")
                continue
            if not name.endswith(EVAL_SUFFIX):
                continue
            data = name[: -len(EVAL_SUFFIX)] + ".jsonl"
            seen = self._seen[name]
            key = (name, seen.key[2])
            if not any(data + z in present for z in ("", ".gz", ".zst")) and now - seen.since >= LONE_EVAL_REPORT_S and key not in self._lone_reported:
                self._lone_reported.add(key)
                self.log.warning("eval_file_alone", file=name, waiting_for=data,
                                 hint=f"an eval file is claimed with {data}; alone it is never trained")

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
