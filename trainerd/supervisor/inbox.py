"""The inbox: which files are finished, and a watchdog observer whose events are only hints.

The folder is the truth; inotify events only make the daemon look sooner. A file is taken
when all of these hold:

- its name ends in ``.jsonl`` and does not start with ``.`` (``*.part`` never matches);
- ``lstat`` says it is a regular file (a symlink, FIFO, socket, device or directory named
  ``x.jsonl`` is never opened: :meth:`Inbox.scan` reports it as rejected and the daemon
  moves the entry itself, unread, to ``failed/``);
- its size, mtime and inode have not changed for ``supervisor.settle_s``;
- no process has it open for writing — so a slow ``cp`` straight into the inbox is not taken
  half-way, and a write-then-rename is taken as soon as it settles. Asked once per scan for all
  the files in doubt (:mod:`trainerd.supervisor.writers`): a file whose writer closed it (inotify's
  close-after-write) and that has not changed since needs no look; the others share one walk of
  ``/proc/*/fd``. A writer under another user is invisible to an unprivileged daemon's walk
  (its close is not); settle_s covers that case.

A scan is done in slices (:class:`ScanPass`, :meth:`ScanPass.step` with a deadline), so a huge
inbox never holds the supervisor's loop for long; :meth:`Inbox.scan` does a whole one at once.
"""

from __future__ import annotations

import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainerd.core.contract import COMPRESSED_SUFFIXES, data_suffix
from trainerd.supervisor.writers import CloseLog, FileId, WriterWalk, open_for_writing

__all__ = ["EVAL_SUFFIX", "Inbox", "Rejected", "ScanPass", "eval_partner", "is_candidate_name", "is_inbox_name",
           "open_for_writing"]


EVAL_SUFFIX = ".eval.jsonl"
# A lone eval file (its data file never came) is reported once after this long.
LONE_EVAL_REPORT_S = 60.0


# The two rules below as regular expressions, from the contract's suffixes: every scan and every
# metrics write tests each name in the inbox (thousands during a burst), so they run at C speed.
_COMPRESSED = "(?:" + "|".join(re.escape(s[len(".jsonl"):]) for s in COMPRESSED_SUFFIXES) + ")?"
_INBOX_NAME = re.compile(r"[^.].*\.jsonl" + _COMPRESSED, re.S)
_CANDIDATE_NAME = re.compile(r"[^.].*(?<!\.eval)\.jsonl" + _COMPRESSED, re.S)


def is_inbox_name(name: str) -> bool:
    """A name the inbox looks at: ``*.jsonl`` (or ``*.jsonl.gz``, ``*.jsonl.zst``), not a dot-file
    (``*.part`` never matches)."""
    return _INBOX_NAME.fullmatch(name) is not None


def _stem(name: str) -> str:
    return name[: -len(data_suffix(name) or "")]


def is_candidate_name(name: str) -> bool:
    """A data file to claim: an inbox name that is not an eval file (``name.eval.jsonl``; eval
    files are plain JSONL only, a compressed one is never claimed)."""
    return _CANDIDATE_NAME.fullmatch(name) is not None


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


# A file found open for writing (a writer that paused) is looked at again at most this often;
# its close also wakes the daemon through inotify, so the claim is late by at most this much.
WRITER_RECHECK_S = 2.0

# The inotify events that can make a file ready (it appeared, was renamed in, or was closed after
# writing). Modifications are not among them: a file still changing is not ready anyway, and a
# copy of a big file would otherwise wake the loop a hundred times a second.
_INBOX_EVENTS = ("FileCreatedEvent", "FileMovedEvent", "FileClosedEvent")


@dataclass(eq=False)
class ScanPass:
    """One look at a lane, in slices: :meth:`step` reads the folder and lstat's its entries until a
    deadline; then the files in doubt (settled, not known closed) are :attr:`in_doubt` for one
    writer walk shared by every lane; :meth:`finish` with that walk's findings gives (ready names
    oldest first, rejected entries, when to look again). The folder stays open between slices:
    an entry renamed away meanwhile is skipped, one added is found by the next scan."""

    inbox: "Inbox"
    now: float
    in_doubt: dict[FileId, list[str]] = field(default_factory=dict)  # settled, not known closed -> names
    ready: list[tuple[int, str]] = field(default_factory=list)
    rejected: list["Rejected"] = field(default_factory=list)
    present: set[str] = field(default_factory=set)
    settled: set[str] = field(default_factory=set)
    evals: list[str] = field(default_factory=list)  # inbox names that are no candidates (eval files)
    recheck_at: float | None = None
    entries: int = 0
    skip: Callable[[str], bool] | None = None  # names already on their way to be claimed
    _it: Any = None
    _done: bool = False

    def step(self, deadline: float) -> bool:
        """Look at entries until ``time.monotonic() >= deadline`` (at least a few); True when done."""
        if self._done:
            return True
        if self._it is None:
            try:
                self._it = os.scandir(self.inbox.dir)
            except FileNotFoundError:
                self._done = True
                return True
        box, n = self.inbox, 0
        for entry in self._it:
            if is_inbox_name(entry.name):
                box._look(self, entry)
            n += 1
            # Every few entries: each lstat gives the GIL away, and getting it back can take a
            # switch interval while the claim threads run.
            if n % 16 == 0 and time.monotonic() >= deadline:
                self.entries += n
                return False
        self.entries += n
        self._it.close()
        self._done = True
        return True

    def _later(self, at: float) -> None:
        self.recheck_at = at if self.recheck_at is None else min(self.recheck_at, at)

    def finish(self, writers: dict[FileId, int]) -> tuple[list[str], list["Rejected"], float | None]:
        return self.inbox._finish(self, writers)


class Inbox:
    """Finds finished files in ``inbox_dir``. :meth:`scan` with the current time does a whole
    look; :meth:`start_scan` gives a :class:`ScanPass` to do it in slices. ``closes`` is the
    record of inotify's close-after-write events, shared by every lane; ``walk`` makes the /proc
    walk for the files in doubt (a parameter for tests)."""

    def __init__(self, inbox_dir: Path, *, settle_s: float, log: Any, closes: CloseLog | None = None,
                 walk: Callable[[set[FileId]], WriterWalk] = WriterWalk):
        self.dir = Path(inbox_dir)
        self.settle_s = settle_s
        self.log = log
        self.closes = closes if closes is not None else CloseLog()
        self.walk = walk
        self._seen: dict[str, _Seen] = {}
        self._writing_logged: set[tuple[str, int]] = set()
        self._lone_reported: set[tuple[str, int]] = set()
        self._observer: Any = None

    # --- watchdog hints ------------------------------------------------------------------

    def start_watching(self, on_hint: Callable[[], None]) -> None:
        """Start an inotify observer on this folder: a new, renamed-in or closed file calls
        ``on_hint`` (from its thread); a close is also recorded in :attr:`closes`."""
        from watchdog.observers import Observer

        self._observer = Observer()
        self._observer.daemon = True
        self.watch_lane(self.dir, self.closes, on_hint)
        self._observer.start()

    def watch_lane(self, folder: Path, closes: CloseLog, on_hint: Callable[[], None]) -> None:
        """Watch another inbox lane the same way (its closes recorded in ``closes``)."""
        import watchdog.events as ev

        class _Lane(ev.FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # noqa: D401 - watchdog's API
                if isinstance(event, ev.FileClosedEvent):
                    closes.closed(event.src_path)
                if not event.is_directory:
                    on_hint()

        if self._observer is not None:
            self._observer.schedule(_Lane(), str(folder), recursive=False,
                                    event_filter=[getattr(ev, n) for n in _INBOX_EVENTS])

    def watch_also(self, folder: Path, names: set[str] | None, on_hint: Callable[[], None]) -> None:
        """Also call ``on_hint`` when an entry named one of ``names`` (None: any) in ``folder`` is
        created, removed or renamed (the daemon watches ``root/.stop`` and ``requests/`` so).
        Only those events: the root also holds the ledger, whose every write would be one."""
        import watchdog.events as ev

        class _Named(ev.FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # noqa: D401 - watchdog's API
                paths = (getattr(event, "src_path", ""), getattr(event, "dest_path", ""))
                if names is None or any(os.path.basename(str(p)) in names for p in paths if p):
                    on_hint()

        if self._observer is not None:
            self._observer.schedule(_Named(), str(folder), recursive=False,
                                    event_filter=[ev.FileCreatedEvent, ev.FileDeletedEvent, ev.FileMovedEvent])

    def stop_watching(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5.0)
            self._observer = None

    # --- the rule ------------------------------------------------------------------------

    def scan(self, now: float) -> tuple[list[str], list[Rejected], float | None]:
        """Return (finished names oldest first, rejected entries, when to look again or None)."""
        p = self.start_scan(now)
        p.step(math.inf)
        return p.finish(self.walk(set(p.in_doubt)).run() if p.in_doubt else {})

    def start_scan(self, now: float, skip: Callable[[str], bool] | None = None) -> ScanPass:
        """A pass to do in slices; ``skip``: names found ready before and not claimed yet (they
        are neither looked at nor walked for again)."""
        return ScanPass(self, now, skip=skip)

    def _look(self, p: ScanPass, entry: os.DirEntry[str]) -> None:
        """One entry of a pass: rejected, settling, in doubt, or settled."""
        name, now = entry.name, p.now
        if p.skip is not None and p.skip(name):
            p.present.add(name)
            return
        try:
            st = os.lstat(entry.path)  # never follow a symlink
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            p.rejected.append(Rejected(name, kind, f"not a regular file ({kind}); never read", self.dir))
            return
        p.present.add(name)
        if not is_candidate_name(name):
            p.evals.append(name)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        seen = self._seen.get(name)
        if seen is None or seen.key != key:
            self._seen[name] = seen = _Seen(key, now)
        due = seen.since + self.settle_s
        if now < due:
            p._later(due)
            return
        if seen.writer_checked_at is not None and now < seen.writer_checked_at + WRITER_RECHECK_S:
            p._later(seen.writer_checked_at + WRITER_RECHECK_S)
            return
        if self.closes.unchanged_since_close(st):
            self._settled(p, name, st.st_mtime_ns)  # closed after its last write: no walk needed
        else:
            p.in_doubt.setdefault((st.st_dev, st.st_ino), []).append(name)

    def _settled(self, p: ScanPass, name: str, mtime_ns: int) -> None:
        p.settled.add(name)
        if is_candidate_name(name):
            p.ready.append((mtime_ns, name))

    def _finish(self, p: ScanPass, writers: dict[FileId, int]) -> tuple[list[str], list[Rejected], float | None]:
        now = p.now
        for fid, names in p.in_doubt.items():
            writer = writers.get(fid)
            for name in names:
                seen = self._seen.get(name)
                if seen is None:
                    continue  # taken since (a claim from an earlier pass)
                if writer is None:
                    self._settled(p, name, seen.key[1])
                    continue
                seen.writer_checked_at = now
                if (name, fid[1]) not in self._writing_logged:
                    self._writing_logged.add((name, fid[1]))
                    self.log.info("inbox_file_still_open", file=name, writer_pid=writer)
                # Still open: its close produces an inotify event; poll as well, slowly.
                p._later(now + WRITER_RECHECK_S)
        present, settled = p.present, p.settled
        for name in [n for n in self._seen if n not in present]:
            del self._seen[name]
        # What was reported once is forgotten with the file: over weeks of files these sets
        # would otherwise grow with every name the inbox ever held.
        self._writing_logged = {k for k in self._writing_logged if k[0] in present}
        self._lone_reported = {k for k in self._lone_reported if k[0] in present}
        # A data file whose eval file is there but not finished waits for it (they are claimed
        # together); an eval file alone is reported once, and never trained. (Per eval file, not
        # per data file: a burst of thousands without any costs nothing here.)
        ready = p.ready
        if p.evals:
            ready = [(t, n) for t, n in ready if eval_partner(n) not in present or eval_partner(n) in settled]
            for name in p.evals:
                if name.endswith(EVAL_SUFFIX) and name not in settled:
                    p._later(now + self.settle_s)
            self._report_lone_evals(p.evals, present, now)
        ready.sort()
        return [n for _, n in ready], p.rejected, p.recheck_at

    def _report_lone_evals(self, evals: list[str], present: set[str], now: float) -> None:
        for name in evals:
            if not name.endswith(EVAL_SUFFIX):
                # name.eval.jsonl.gz: eval files are small and read by several rooms; plain only.
                key = (name, self._seen[name].key[2])
                if key not in self._lone_reported:
                    self._lone_reported.add(key)
                    self.log.warning("eval_file_compressed", file=name, folder=str(self.dir),
                                     hint="eval files are taken as plain .eval.jsonl only; decompress it")
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
