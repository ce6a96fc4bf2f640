"""Is all well? The conditions ``trainerd check`` and the metrics' ``trainerd_health`` report, decided once.

Decide, then act: :func:`assess` is a pure function from :class:`Facts` (gathered from the root by
:func:`gather`, or from the running daemon by :class:`HealthWatch`) and :class:`Thresholds` to
one :class:`Condition` per name in :data:`CONDITIONS`. Severities are Nagios plugin states:

==================  ==========  ====================================================================
condition           when bad    why that severity
==================  ==========  ====================================================================
daemon_down         CRITICAL    no daemon holds the root's lock: nothing trains, nothing is claimed
disk_low            CRITICAL    free space under disk.min_free_bytes: no batch starts
kernel_oom_kills    CRITICAL    the kernel killed a worker within the window (the guard's promise is 0)
paused              WARNING     root/.stop older than check.paused_warning_s (a pause forgotten)
quarantined         WARNING     a batch went to failed/ within the window (its data kept there)
crash_backoff       WARNING     the head of the queue waits out a back-off after crashes
==================  ==========  ====================================================================

Events (a quarantined batch, a kernel OOM kill) count for ``check.window_s`` after they happen:
stateless, so any number of checkers agree, a Nagios retry sees what the first try saw, and
the alert clears by itself. ``trainerd check --state-file FILE`` counts them since the previous
check instead (FILE remembers when that was; it lies outside the root).

Stdlib only; the ledger is read through the caller's connection (read-only for the CLI).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from trainerd.core.contract import RootLayout, StopReason
from trainerd.core.fsutil import fmt_bytes, free_bytes, read_json_or_none
from trainerd.supervisor.ledger.states import BatchState

__all__ = ["CONDITIONS", "Condition", "Facts", "HealthWatch", "Severity", "Thresholds", "assess", "gather",
           "in_window", "ledger_events", "line", "worst"]


class Severity(IntEnum):
    """Nagios plugin states; also ``trainerd check``'s exit code and the gauges' values."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


CONDITIONS = ("daemon_down", "disk_low", "kernel_oom_kills", "paused", "quarantined", "crash_backoff")


@dataclass(frozen=True)
class Thresholds:
    paused_warning_s: float = 3600.0
    window_s: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Any) -> "Thresholds":
        return cls(settings.check.paused_warning_s, settings.check.window_s)


@dataclass(frozen=True)
class Backoff:
    """The head of the queue, waiting to retry after crashes."""

    batch: int
    file: str
    retry_at: float
    crashes: int
    reason: str | None


@dataclass(frozen=True)
class Facts:
    """What the conditions are decided from (plain values: tests build them by hand)."""

    now: float
    since: float                                 # events count from here
    daemon_running: bool
    daemon_seen_at: float | None = None          # its last sign of life, when it is down
    paused_since: float | None = None
    quarantined: tuple[tuple[int, str, float], ...] = ()  # (batch, file, finished_at) since ``since``
    kernel_oom_kills: int = 0                    # since ``since``
    kernel_oom_kills_total: int = 0
    free_bytes: int | None = None
    min_free_bytes: int | None = None
    backoff: Backoff | None = None
    queued: int = 0


@dataclass(frozen=True)
class Condition:
    name: str
    severity: Severity
    text: str = ""


def _ago(s: float) -> str:
    s = max(0, int(s))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def assess(f: Facts, t: Thresholds) -> list[Condition]:
    """One condition per name in :data:`CONDITIONS`, in that order (OK ones with no text)."""
    ok = Severity.OK
    out = []
    if f.daemon_running:
        out.append(Condition("daemon_down", ok))
    elif f.daemon_seen_at is None:
        out.append(Condition("daemon_down", Severity.CRITICAL, "daemon down (no sign that one ever ran here)"))
    else:
        out.append(Condition("daemon_down", Severity.CRITICAL,
                             f"daemon down since {_when(f.daemon_seen_at)} ({_ago(f.now - f.daemon_seen_at)} ago)"))
    low = f.free_bytes is not None and bool(f.min_free_bytes) and f.free_bytes < f.min_free_bytes
    out.append(Condition("disk_low", Severity.CRITICAL if low else ok,
                         f"disk free {fmt_bytes(f.free_bytes)} below the floor {fmt_bytes(f.min_free_bytes)}: "
                         "no batch starts" if low else ""))
    out.append(Condition("kernel_oom_kills", Severity.CRITICAL if f.kernel_oom_kills else ok,
                         f"{f.kernel_oom_kills} kernel OOM kill(s) of a worker since {_when(f.since)}"
                         if f.kernel_oom_kills else ""))
    paused_s = None if f.paused_since is None else f.now - f.paused_since
    long = paused_s is not None and paused_s > t.paused_warning_s
    out.append(Condition("paused", Severity.WARNING if long else ok,
                         f"paused for {_ago(paused_s)} (since {_when(f.paused_since)})" if long else ""))
    if f.quarantined:
        names = ", ".join(f"#{b} {name}" for b, name, _ in f.quarantined[:3])
        more = f" and {len(f.quarantined) - 3} more" if len(f.quarantined) > 3 else ""
        out.append(Condition("quarantined", Severity.WARNING,
                             f"{len(f.quarantined)} batch(es) quarantined to failed/ since {_when(f.since)}: "
                             f"{names}{more}"))
    else:
        out.append(Condition("quarantined", ok))
    b = f.backoff
    if b is not None and b.retry_at > f.now:
        why = f" (last: {b.reason})" if b.reason else ""
        out.append(Condition("crash_backoff", Severity.WARNING,
                             f"the head of the queue, batch #{b.batch} {b.file}, waits {_ago(b.retry_at - f.now)} "
                             f"to retry after {b.crashes} crash(es){why}"))
    else:
        out.append(Condition("crash_backoff", ok))
    return out


def worst(conditions: list[Condition]) -> Severity:
    return max((c.severity for c in conditions), default=Severity.OK)


def line(conditions: list[Condition], f: Facts, t: Thresholds) -> str:
    """The one line a Nagios plugin prints: ``TRAINERD CRITICAL - daemon down since ...; ...``,
    worst first, then performance data after ``|``."""
    sev = worst(conditions)
    bad = sorted((c for c in conditions if c.severity), key=lambda c: -c.severity)
    if bad:
        text = "; ".join(c.text for c in bad)
    else:
        text = "daemon running" + (", paused" if f.paused_since is not None else "") + f", {f.queued} queued"
    perf = (f"queued={f.queued} quarantined={len(f.quarantined)} kernel_oom_kills={f.kernel_oom_kills} "
            f"kernel_oom_kills_total={f.kernel_oom_kills_total}c")
    if f.free_bytes is not None:
        perf += f" free={f.free_bytes}B;;{f.min_free_bytes or ''};0"
    if f.paused_since is not None:
        perf += f" paused={int(f.now - f.paused_since)}s;{int(t.paused_warning_s)}"
    return f"TRAINERD {sev.name} - {text} | {perf}"


# --- gathering ---------------------------------------------------------------------------


def ledger_events(db: Any, since: float, now: float) -> dict[str, Any]:
    """From the ledger (a sqlite3 connection): batches quarantined and kernel OOM kills since
    ``since`` (with their times), the lifetime OOM count, the queue's length and its head's crash
    back-off. Five small queries; :func:`in_window` turns the answer into Facts' fields."""
    quarantined = tuple((int(r[0]), str(r[1]), float(r[2])) for r in db.execute(
        "SELECT id, name, finished_at FROM batches WHERE state=? AND finished_at >= ? ORDER BY finished_at",
        (BatchState.FAILED.value, since)))
    kills = tuple(float(r[0]) for r in db.execute("SELECT ended_at FROM attempts WHERE reason=? AND ended_at >= ?",
                                                  (StopReason.KERNEL_OOM_KILL.value, since)))
    total = db.execute("SELECT value FROM counters WHERE name='kernel_oom_kills'").fetchone()
    queued = db.execute("SELECT count(*) FROM batches WHERE state=?", (BatchState.QUEUED.value,)).fetchone()[0]
    # The head as the daemon picks it (ledger.next_queued): started first, then lane, then arrival.
    head = db.execute("SELECT id, name, next_attempt_at, crashes, last_reason FROM batches WHERE state=? AND "
                      "finished_at IS NULL ORDER BY attempts > 0 DESC, priority DESC, id LIMIT 1",
                      (BatchState.QUEUED.value,)).fetchone()
    backoff = None
    if head is not None and head[3]:
        backoff = Backoff(int(head[0]), str(head[1]), float(head[2]), int(head[3]), head[4])
    return {"quarantined": quarantined, "kill_times": kills, "queued": int(queued),
            "kernel_oom_kills_total": int(total[0]) if total else 0, "backoff": backoff}


def in_window(events: dict[str, Any], since: float, now: float) -> dict[str, Any]:
    """Facts' event fields from :func:`ledger_events`' answer, as of ``now`` (an answer may be
    reused until the ledger changes: only the clock moved)."""
    b = events.get("backoff")
    return {"quarantined": tuple(q for q in events.get("quarantined", ()) if q[2] >= since),
            "kernel_oom_kills": sum(1 for t in events.get("kill_times", ()) if t >= since),
            "kernel_oom_kills_total": events.get("kernel_oom_kills_total", 0), "queued": events.get("queued", 0),
            "backoff": b if b is not None and b.retry_at > now else None}


def _mtime(path: Any) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def gather(layout: RootLayout, now: float, since: float, *, min_free_bytes: int | None) -> Facts:
    """The facts from a root, read-only (``trainerd check``). ``min_free_bytes``: the floor from the
    config; None: the one the daemon last recorded (disk-usage.json). sqlite3.Error propagates."""
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor.views.status import daemon_pid

    running = daemon_pid(layout.lock) is not None
    seen = None
    if not running:
        # Its last sign of life: the state it last wrote, or the last line of its log.
        state = read_json_or_none(layout.daemon) or {}
        times = [t for t in (state.get("updated_at"), _mtime(layout.daemon), _mtime(layout.log_file))
                 if isinstance(t, (int, float))]
        seen = max(times) if times else None
    if min_free_bytes is None:
        min_free_bytes = (read_json_or_none(layout.disk_usage) or {}).get("min_free_bytes")
    events: dict[str, Any] = {}
    if layout.db.exists():
        led = Ledger.open_readonly(layout.db)
        try:
            events = ledger_events(led.db, since, now)
        finally:
            led.close()
    return Facts(now=now, since=since, daemon_running=running, daemon_seen_at=seen,
                 paused_since=_mtime(layout.stop), free_bytes=free_bytes(layout.root),
                 min_free_bytes=min_free_bytes, **in_window(events, since, now))


class HealthWatch:
    """The daemon's side (metrics): the same conditions from what the daemon has, the ledger's
    answer reused until the ledger changes (a few small queries per change, not per write)."""

    def __init__(self) -> None:
        self._key: Any = None
        self._events: dict[str, Any] = {}

    def conditions(self, daemon: Any, now: float) -> list[Condition]:
        led, layout, settings = daemon.ledger, daemon.layout, daemon.settings
        t = Thresholds.from_settings(settings)
        since = now - t.window_s
        if led.db.total_changes != self._key:
            self._key, self._events = led.db.total_changes, ledger_events(led.db, since, now)
        facts = Facts(now=now, since=since, daemon_running=True, paused_since=_mtime(layout.stop),
                      free_bytes=free_bytes(layout.root), min_free_bytes=settings.disk.min_free_bytes,
                      **in_window(self._events, since, now))
        return assess(facts, t)
