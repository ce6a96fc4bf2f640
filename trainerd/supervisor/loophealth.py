"""How healthy the supervisor's loop is: how long its turns take and how regularly the memory
guard samples, over the last minute, for ``trainerd status`` and the metrics.

A turn of the loop is timed phase by phase (signals, the worker, the inbox, requests, ...), so a
turn over :data:`SLOW_TURN_S` is logged (``loop_turn_slow``) with what it was doing. The guard runs
on its own thread (guardthread.py); its measured sampling interval is kept here too, because the
whole point of that thread is that a long turn no longer shows up in it.

Monotonic clock throughout: these are durations, and an NTP step must not read as a 10-minute turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["LoopHealth", "RecentIntervals", "SLOW_TURN_S", "WINDOW_S"]

WINDOW_S = 60.0      # "the last minute" of the figures
SLOW_TURN_S = 1.0    # a turn this long is logged with what it was doing


class RecentIntervals:
    """Durations over the last :data:`WINDOW_S`: their median and maximum. Thread-safe (the guard's
    thread adds, the loop reads). At most one entry per guard poll: <= 600 a minute at 100 ms."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, at: float, seconds: float) -> None:
        with self._lock:
            self._items.append((at, seconds))
            self._trim(at)

    def figures(self, now: float) -> dict[str, Any]:
        """``{"p50": s, "max": s, "count": n}`` over the window (None figures when empty)."""
        with self._lock:
            self._trim(now)
            values = sorted(v for _, v in self._items)
        if not values:
            return {"p50": None, "max": None, "count": 0}
        return {"p50": round(values[len(values) // 2], 4), "max": round(values[-1], 4), "count": len(values)}

    def _trim(self, now: float) -> None:
        while self._items and now - self._items[0][0] > self.window_s:
            self._items.popleft()


class LoopHealth:
    """Times the loop's turns. ``with health.turn(): ... with health.phase("inbox"): ...``."""

    def __init__(self, log: Any, *, slow_s: float = SLOW_TURN_S):
        self.log, self.slow_s = log, slow_s
        # One (second, longest turn in it, what it did) per second with a turn: the longest of the
        # last minute is the max over <= 60 of them, whatever the turn rate.
        self._seconds: deque[tuple[int, float, dict[str, Any]]] = deque()
        self._phases: dict[str, float] = {}
        self._notes: dict[str, Any] = {}
        self.turns = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        self._phases, self._notes = {}, {}
        t0 = time.monotonic()
        try:
            yield
        finally:
            t1 = time.monotonic()
            self._record(t1, t1 - t0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.monotonic() - t0

    def note(self, **fields: Any) -> None:
        """Say what this turn is doing (files claimed, entries scanned): logged if it is slow."""
        self._notes.update(fields)

    def _record(self, at: float, seconds: float) -> None:
        self.turns += 1
        doing = {k: round(v, 3) for k, v in sorted(self._phases.items(), key=lambda kv: -kv[1]) if v >= 0.001}
        doing.update(self._notes)
        sec = int(at)
        if self._seconds and self._seconds[-1][0] == sec:
            if seconds > self._seconds[-1][1]:
                self._seconds[-1] = (sec, seconds, doing)
        else:
            self._seconds.append((sec, seconds, doing))
        while self._seconds and at - self._seconds[0][0] > WINDOW_S:
            self._seconds.popleft()
        if seconds >= self.slow_s:
            self.log.warning("loop_turn_slow", seconds=round(seconds, 3), doing=doing,
                             hint="signals, .stop, requests and systemd's watchdog waited this long")

    def longest(self, now: float) -> tuple[float | None, dict[str, Any]]:
        """The longest turn of the last minute (seconds) and what it was doing."""
        best: tuple[float | None, dict[str, Any]] = (None, {})
        for sec, seconds, doing in self._seconds:
            if now - sec <= WINDOW_S and (best[0] is None or seconds > best[0]):
                best = (seconds, doing)
        return best
