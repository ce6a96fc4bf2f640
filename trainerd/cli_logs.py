"""``trainerd logs [-f] [--batch N] [--level LEVEL] [--json] [-n N]``: the JSON log for people.

Reads ``root/logs/trainerd.jsonl`` (the daemon's lines and its workers', relayed) and renders
each line with structlog's ConsoleRenderer, in colour when stdout is a terminal; ``--json``
passes the lines through unchanged (for jq). ``--batch`` and ``--level`` filter. ``-f`` follows
like ``tail -F``: it keeps reading as the daemon appends, and when logrotate moves the file
away (the daemon's WatchedFileHandler then opens a new one at the same path) it finishes the
old file and reopens the path; a truncated file (copytruncate) is read again from its start.
Read-only, never imports torch, never talks to the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainerd.cli_root import subcommand
from trainerd.contract import ExitCode

__all__ = ["add_commands", "follow", "wanted"]

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


def follow(path: Path, f: IO[bytes] | None = None, *, poll_s: float = POLL_S) -> Iterator[str]:
    """The lines of ``path`` (from where ``f``, already open on it, stands; else from the start)
    and every line appended later, across rotations (``tail -F``). Runs until interrupted."""
    pending = bytearray()
    while True:
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 - held across turns, closed on rotation
            except FileNotFoundError:
                time.sleep(poll_s)
                continue
        yield from _lines(f, pending)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        mine = os.fstat(f.fileno())
        if st is None or (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev):
            # Rotated: finish what was written to the old file before the move, then open the
            # new file at the path (on the next turn, or once it appears).
            yield from _lines(f, pending)
            if pending:
                yield pending.decode("utf-8", errors="replace")
            f.close()
            f, pending = None, bytearray()
            continue
        if st.st_size < f.tell():  # truncated in place (copytruncate): read it again
            f.seek(0)
            pending.clear()
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
    if not path.exists() and not args.follow:
        print(f"trainerd logs: no log at {path} yet (log.file off, or the daemon has not started)", file=sys.stderr)
        return ExitCode.NOINPUT
    try:
        f = open(path, "rb") if path.exists() else None  # noqa: SIM115 - follow() takes it over
        backlog = args.lines if args.lines is not None else (10 if args.follow else None)
        if f is not None:
            kept = (ln for ln in _decoded(f) if p.keep(ln))
            for ln in deque(kept, backlog) if backlog is not None else kept:
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
