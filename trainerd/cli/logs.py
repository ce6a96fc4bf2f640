"""``trainerd logs [-f] [--batch N] [--level LEVEL] [--json] [-n N]``: the JSON log for people.

Reads ``root/logs/trainerd.jsonl`` (the daemon's lines and its workers', relayed) and the files
it rotated into (``trainerd.jsonl.1``, ``.2.gz`` ...: oldest first, gzip read as it streams), and
renders each line with structlog's ConsoleRenderer, in colour when stdout is a terminal;
``--json`` passes the lines through unchanged (for jq). ``--batch`` and ``--level`` filter; ``-n``
reads back only as many files as it needs. ``-f`` follows like ``tail -F``: it keeps reading as
the daemon appends, and when the file is rotated (by the daemon, or moved away by logrotate) it
finishes the old file and reopens the path; a truncated file (copytruncate) is read again from
its start. Read-only, never imports torch, never talks to the daemon.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainerd.cli.root import subcommand
from trainerd.core.contract import ExitCode

__all__ = ["add_commands", "follow", "rotated_files", "wanted"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40, "critical": 50}
POLL_S = 0.25


def wanted(rec: dict[str, Any] | None, *, batch: int | None, level: int) -> bool:
    """Whether a parsed line passes ``--batch`` and ``--level`` (a line that is not JSON passes
    only when there is no filter)."""
    if rec is None:
        return batch is None and level <= LEVELS["debug"]
    if batch is not None and rec.get("batch") != batch:
        return False
    return LEVELS.get(str(rec.get("level", "info")).lower(), LEVELS["info"]) >= level


def _parse(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "event" in rec else None


def _lines(f: IO[bytes], pending: bytearray) -> Iterator[str]:
    """Complete lines read from ``f`` now; a partial last line waits in ``pending``."""
    while chunk := f.read(1 << 16):
        pending += chunk
    *complete, rest = bytes(pending).split(b"\n")
    pending[:] = rest
    for raw in complete:
        yield raw.decode("utf-8", errors="replace")


def _first_line(f: IO[bytes]) -> bytes | None:
    """The first complete line of an open file, read in place (None while it has none)."""
    head = os.pread(f.fileno(), 1 << 16, 0)
    return head.split(b"\n", 1)[0] if b"\n" in head else None


def _head(p: Path) -> tuple[IO[bytes], bytes | None] | None:
    """A rotated file opened (gzip or plain) with its first line, the handle at its start; None if gone."""
    try:
        g = gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")  # noqa: SIM115
    except FileNotFoundError:
        if p.name.endswith(".gz"):
            return None
        return _head(p.with_name(p.name + ".gz"))  # compressed since it was listed
    try:
        first = g.readline().rstrip(b"\n") or None
        g.seek(0)
    except (OSError, EOFError):
        g.close()
        return None
    return g, first


def _newer(path: Path, mark: bytes | None, skip_ino: int | None) -> list[tuple[IO[bytes], bytes | None]]:
    """The rotated files newer than the one whose first line is ``mark``, opened, oldest first (all
    of them when it has rotated out of the kept ones), stopping at inode ``skip_ino`` (the file now
    followed, if it was rotated meanwhile). Opened before they are read: a rotation while they are
    read moves or compresses them, and an open handle still reads the same bytes."""
    if mark is None:
        return []
    for _ in range(50):
        # The numbers are positions: a rotation while they are opened shifts them. It renames the
        # path first, so an unchanged inode at the path around the opening means none happened.
        before = _inode(path)
        heads = [h for p in rotated_files(path) if (h := _head(p)) is not None]
        if _inode(path) == before:
            break
        for g, _ in heads:
            g.close()
        time.sleep(0.01)
    at = next((i for i, (_, first) in enumerate(heads) if first == mark), None)
    keep = heads[at + 1:] if at is not None else heads
    out = []
    for g, first in keep:
        ino = os.fstat(g.fileno()).st_ino if not isinstance(g, gzip.GzipFile) else None
        if skip_ino is not None and ino == skip_ino:
            break
        out.append((g, first))
    for g, _ in heads:
        if all(g is not o for o, _ in out):
            g.close()
    return out


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def follow(path: Path, f: IO[bytes] | None = None, *, poll_s: float = POLL_S) -> Iterator[str]:
    """The lines of ``path`` (from where ``f``, already open on it, stands; else from the start)
    and every line appended later, across rotations (``tail -F``). Runs until interrupted.

    Lines are never skipped by a rotation, however many happened between two looks: a file is
    known by its first line, and after finishing the one it was on it reads every rotated file
    newer than that one (``.1``, ``.2.gz`` ...) before the new file at the path."""
    pending = bytearray()
    mark: bytes | None = None  # the first line of the file being followed
    while True:
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 - held across turns, closed on rotation
            except FileNotFoundError:
                time.sleep(poll_s)
                continue
            # Files rotated after the last one finished and before this one was opened.
            for g, first in _newer(path, mark, os.fstat(f.fileno()).st_ino):
                with g:
                    yield from (raw.decode("utf-8", errors="replace").rstrip("\n") for raw in g)
                mark = first
            mark = None
        if mark is None:
            mark = _first_line(f)
        yield from _lines(f, pending)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        mine = os.fstat(f.fileno())
        if st is None or (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev):
            # Rotated: finish what was written to the old file before the move, then the files
            # rotated after it, then the new file at the path (once it appears).
            yield from _lines(f, pending)
            if pending:
                yield pending.decode("utf-8", errors="replace")
            mark = _first_line(f) if mark is None else mark
            f.close()
            f, pending = None, bytearray()
            for g, first in _newer(path, mark, None):
                with g:
                    yield from (raw.decode("utf-8", errors="replace").rstrip("\n") for raw in g)
                mark = first
            continue
        if st.st_size < f.tell():  # truncated in place (copytruncate): read it again
            f.seek(0)
            pending.clear()
            mark = None
            continue
        time.sleep(poll_s)


class _Printer:
    def __init__(self, args: argparse.Namespace, out: IO[str]):
        self.out = out
        self.batch = args.batch
        self.level = LEVELS[args.level]
        self.raw = args.json
        self.render: Any = None
        if not self.raw:
            import structlog

            colors = out.isatty() and "NO_COLOR" not in os.environ
            self.render = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)

    def keep(self, line: str) -> bool:
        return bool(line.strip()) and wanted(_parse(line), batch=self.batch, level=self.level)

    def show(self, line: str) -> None:
        rec = _parse(line)
        if self.raw or rec is None:
            self.out.write(line + "\n")
        else:
            # ConsoleRenderer reads timestamp/level/event and prints the rest as key=value.
            self.out.write(self.render(None, str(rec.get("level", "info")), dict(rec)) + "\n")
        self.out.flush()


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of ``path``, oldest first: ``path.N.gz`` ... ``path.2.gz``, ``path.1`` (a
    plain ``path.N`` wins over a ``path.N.gz`` being written beside it; temporaries are skipped)."""
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    for e in entries:
        if not e.name.startswith(path.name + "."):
            continue
        num, _, ext = e.name[len(path.name) + 1:].partition(".")
        if num.isdigit() and ext in ("", "gz") and (ext == "" or int(num) not in found):
            found[int(num)] = Path(e.path)
    return [found[n] for n in sorted(found, reverse=True)]


def _file_lines(p: Path) -> Iterator[str]:
    """Every line of a rotated file (complete: nothing appends to it any more); gone is empty."""
    try:
        f = gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        try:
            for raw in f:
                yield raw.decode("utf-8", errors="replace").rstrip("\n")
        except (OSError, EOFError) as e:  # a truncated .gz: say so, keep going with the next file
            print(f"trainerd logs: {p}: {e}", file=sys.stderr)


def _backlog(files: list[Path], live: list[str], keep: Any, n: int | None) -> Iterator[str]:
    """The lines to show before following: every matching line of the rotated files then the live
    ones (``n`` None), or the last ``n``, reading back only as many rotated files as that needs."""
    if n is None:
        for p in files:
            yield from (ln for ln in _file_lines(p) if keep(ln))
        yield from live
        return
    got: deque[str] = deque(live[-n:] if n else [])
    for p in reversed(files):
        if len(got) >= n:
            break
        older = deque((ln for ln in _file_lines(p) if keep(ln)), n - len(got))
        got.extendleft(reversed(older))
    yield from got


def _decoded(f: IO[bytes]) -> Iterator[str]:
    """Complete lines to the end of ``f``; a partial last line (being written) is left unread."""
    for raw in f:
        if not raw.endswith(b"\n"):
            f.seek(-len(raw), os.SEEK_CUR)
            return
        yield raw.decode("utf-8", errors="replace").rstrip("\n")


def cmd_logs(args: argparse.Namespace) -> int:
    path = args.layout.log_file
    p = _Printer(args, sys.stdout)
    files = rotated_files(path)
    if not path.exists() and not files and not args.follow:
        print(f"trainerd logs: no log at {path} yet (log.file off, or the daemon has not started)", file=sys.stderr)
        return ExitCode.NOINPUT
    try:
        f = open(path, "rb") if path.exists() else None  # noqa: SIM115 - follow() takes it over
        backlog = args.lines if args.lines is not None else (10 if args.follow else None)
        # The live file first (opened before the listing's files could move on), held for -f.
        live = (ln for ln in _decoded(f) if p.keep(ln)) if f is not None else iter(())
        live_kept = list(deque(live, backlog)) if backlog is not None else live
        for ln in _backlog(files, live_kept, p.keep, backlog):
            p.show(ln)
        if not args.follow:
            if f is not None:
                f.close()
            return ExitCode.OK
        # From where the backlog ended, on the same open file: nothing is missed or shown twice.
        for ln in follow(path, f):
            if p.keep(ln):
                p.show(ln)
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = subcommand(sub, "logs", [common], cmd_logs, help="the log for a terminal (structlog console); -f follows",
                   description="The daemon's JSON log (root/logs/trainerd.jsonl, its workers' lines included) "
                   "rendered for a terminal, in colour when it is one. Filter by batch and level; -f follows like "
                   "tail -F, across logrotate.",
                   examples=["trainerd logs -f", "trainerd logs --batch 7 --level warning",
                             "trainerd logs --json -n 100 | jq .event"])
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (survives logrotate)")
    s.add_argument("--batch", type=int, metavar="N", help="only this batch's lines")
    # "warn" and "exception" are accepted (the log's own aliases) without cluttering the list.
    s.add_argument("--level", default="debug", choices=list(LEVELS), metavar="LEVEL", type=str.lower,
                   help="only lines at this level or above: debug, info, warning (warn), error, critical "
                        "(default debug)")
    s.add_argument("--json", action="store_true", help="print the JSON lines unchanged")
    s.add_argument("-n", "--lines", type=int, default=None, metavar="N",
                   help="only the last N matching lines (with -f: default 10, then new ones)")
