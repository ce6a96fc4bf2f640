"""Fault injection for the chaos tests: the one reader of ``TRAINERD_FAULT`` (stdlib only).

``TRAINERD_FAULT=<point>`` or ``<point>:<number>`` in a process's environment makes that
process fail at that point, as a power cut or the OOM killer would (docs/architecture.md):

  crash_in_checkpoint           worker: SIGKILL itself in the middle of writing a checkpoint
  crash_in_publish              worker: SIGKILL itself in the middle of writing the adapter
  crash_at_step:N               worker: SIGKILL itself right after optimizer step N
  raise_at_step:N               worker: raise an exception right after optimizer step N (a crash with a
                                traceback, at the same place every time)
  term_at_step:N                worker: SIGTERM itself right after optimizer step N
  freeze_at_step:N              worker: SIGSTOP itself right after optimizer step N (a rank frozen
                                between two collectives)
  oom_above_micro:K             worker: raise a CUDA out-of-memory error for micro-batches above K
  supervisor_crash_in_publish   supervisor: SIGKILL itself after adapters/<n> appears, before
                                ``current`` moves
  supervisor_crash_in_claim:N   supervisor: SIGKILL itself right after the N-th file it renamed out
                                of the inbox, before that file is hashed or queued (its group's
                                rows are in the ledger, other files of the group half-way)
  supervisor_stall_loop:S       supervisor: hold its loop busy in pure Python for S seconds, once,
                                while a worker runs (the memory guard must not notice)
  term_in_evaluation            worker: SIGTERM itself after the first evaluation batch (a stop
                                that lands in the middle of the evaluation, every time)
  stop_in_checkpoint            worker: SIGSTOP itself in the middle of writing a checkpoint, once
                                per batch (a worker frozen there: a hung disk, a debugger)

``TRAINERD_FAULT_RANK=<k>`` next to it limits the fault to the worker whose torchrun ``RANK``
is k (one rank of a distributed attempt fails, the others are healthy).
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV", "InjectedFault", "RANK_ENV", "active", "at_step", "die_at", "freeze_at", "number", "spin",
           "term_at"]

ENV = "TRAINERD_FAULT"
RANK_ENV = "TRAINERD_FAULT_RANK"


def _spec() -> tuple[str, str | None]:
    only = os.environ.get(RANK_ENV)
    if only is not None and only != os.environ.get("RANK", "0"):
        return "", None
    point, sep, arg = os.environ.get(ENV, "").partition(":")
    return point, (arg if sep else None)


def active(point: str) -> bool:
    """Is fault ``point`` switched on in this process?"""
    return _spec()[0] == point


def number(point: str) -> int | None:
    """The N of ``point:N`` when that fault is on, else None."""
    name, arg = _spec()
    if name != point or arg is None:
        return None
    try:
        return int(arg)
    except ValueError:
        return None


def die_at(point: str) -> None:
    """SIGKILL this process now if fault ``point`` is on: no handler, no cleanup, no flush."""
    if active(point):
        os.kill(os.getpid(), signal.SIGKILL)


def term_at(point: str) -> None:
    """SIGTERM this process now if fault ``point`` is on: a graceful stop, delivered at that point."""
    if active(point):
        os.kill(os.getpid(), signal.SIGTERM)


def spin(seconds: float) -> None:
    """Keep this thread busy in pure Python for ``seconds``: it gives the GIL away only when the
    interpreter's switch interval forces it (the worst a busy loop can do to another thread)."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(1000):
            x += i * i


class InjectedFault(RuntimeError):
    """The exception ``raise_at_step:N`` raises."""


def at_step(step: int) -> None:
    """The step faults, right after optimizer step ``step``: crash_, raise_, term_ or freeze_at_step:N."""
    if number("crash_at_step") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if number("raise_at_step") == step:
        raise InjectedFault(f"fault injected after step {step} (TRAINERD_FAULT=raise_at_step:{step})")
    if number("term_at_step") == step:
        os.kill(os.getpid(), signal.SIGTERM)
    if number("freeze_at_step") == step:
        os.kill(os.getpid(), signal.SIGSTOP)


def freeze_at(point: str, once: "os.PathLike[str] | None" = None) -> None:
    """SIGSTOP this process now if fault ``point`` is on: it stays frozen until someone SIGCONTs it.
    With ``once`` (a marker file), only the first time: a retried attempt goes through."""
    if not active(point):
        return
    if once is not None:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os.kill(os.getpid(), signal.SIGSTOP)
