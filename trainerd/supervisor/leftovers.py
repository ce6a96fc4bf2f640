"""Workers an earlier life of the supervisor, or an earlier attempt, left behind: found by their
command line, and stopped before anything writes where they write.

A worker from the previous life read EOF on its lifeline and is checkpointing: restart recovery
(reconcile.py) lets it finish within the stop grace, then SIGKILLs its whole group. A rank orphaned
when its torchrun was killed from outside: attempts.py kills it before a new attempt of its batch
starts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil

from trainerd.core.contract import BatchFiles, RootLayout

__all__ = ["find_leftover_workers", "stop_leftover_workers", "stop_orphans"]


def _command_lines() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every process: /proc's cmdline files read directly where there is a /proc
    (psutil's process_iter builds a Process, parsing its stat file, for each of the machine's
    processes: ~1 ms apiece, and this runs before every worker start)."""
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            out.append((p.info["pid"], p.info["cmdline"] or []))
        return out
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"--publish" in raw:  # the cheap filter; the decoding is for the few that pass it
            out.append((pid, [a.decode(errors="replace") for a in raw.split(b"\0") if a]))
    return out


def find_leftover_workers(layout: RootLayout) -> list[psutil.Process]:
    """Our workers from an earlier life: a command line with ``--publish`` and a batch folder
    of this root as an argument of its own (an operator's `less batches/000001/...` is not)."""
    prefix = str(layout.batches) + os.sep
    found = []
    for pid, cmd in _command_lines():
        ours = "--publish" in cmd and any(a.startswith(prefix) and a[len(prefix):].isdigit() for a in cmd[1:])
        if not ours or pid == os.getpid():
            continue
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_leftover_workers(layout: RootLayout, log: Any, stop_grace_s: float, notifier: Any) -> None:
    """A worker from the previous life read EOF on its lifeline and is checkpointing: let it
    finish within the stop grace, then SIGKILL its whole group."""
    procs = find_leftover_workers(layout)
    if not procs:
        return
    for p in procs:
        log.warning("leftover_worker_found", pid=p.pid, cmdline=" ".join(p.cmdline()[:6]))
    # Before READY: ask systemd for the time this may take instead of failing the start.
    notifier.extend_timeout(stop_grace_s + 30)
    deadline = time.monotonic() + stop_grace_s
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if _alive(p)]
        if pending:
            time.sleep(0.1)  # start-up, before the loop exists: nothing else to do meanwhile
    for p in procs:
        was_alive = _alive(p)
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the leader's pid is its group id
        except (ProcessLookupError, PermissionError):
            pass
        log.warning("leftover_worker_stopped", pid=p.pid,
                    how="SIGKILL after the stop grace" if was_alive else "exited by itself")
    deadline = time.monotonic() + 5.0
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_orphans(layout: RootLayout, files: BatchFiles, log: Any) -> None:
    """Processes of an earlier attempt of this batch still alive (a rank orphaned when its torchrun
    was killed from outside, checkpointing on its lifeline's EOF): SIGKILLed before a new attempt
    writes the same folder. Their writes are atomic, so nothing is torn."""
    for p in find_leftover_workers(layout):
        try:
            if str(files.dir) in p.cmdline():
                log.warning("orphan_worker_killed", pid=p.pid, cmdline=" ".join(p.cmdline()[:8]))
                p.kill()
                p.wait(5)
        except Exception:  # psutil.Error, TimeoutExpired: it is gone or going
            pass
