"""Intake: when to look at the inbox, and what to do with what is there — a slice per turn.

inotify events (through :class:`~.wakeup.Wakeup`) are only hints; the periodic rescan finds
every file regardless. A scan is a pass over every lane (:class:`~trainerd.supervisor.inbox.ScanPass`, in
slices), then one walk of ``/proc`` for the files whose writer is in doubt (shared by all lanes;
:class:`~trainerd.supervisor.writers.WriterWalk`, in slices too), then the finished files go to the claim
pool (:mod:`.claimpool`: claimed in groups, the disk's work on its threads); a non-regular entry
is moved, unread, to failed/ (:meth:`.filing.Filing.reject_entry`); a claim that hit an error
(disk full, EIO) is finished at the next scan. :meth:`Intake.work` does what fits before a
deadline and says whether more is waiting, so the loop serves signals, ``.stop``, requests and
systemd's watchdog between two slices of any burst.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from trainerd.core.contract import LANES, RootLayout
from trainerd.supervisor.inbox import Inbox, ScanPass
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.writers import CloseLog, WriterWalk

__all__ = ["Intake", "guarded"]

# inotify hints arrive per event while a burst lands: at most one hinted scan per this many
# seconds, the periodic rescan regardless.
HINT_SCAN_MIN_S = 0.1


def guarded(log: Any, event: str, fn: Callable[[], Any], **fields: Any) -> Any:
    """Run a file-system step; an OSError (ENOSPC, EIO, EACCES) is logged, not fatal: the
    ledger says where the step stopped and the next scan or start retries it."""
    try:
        return fn()
    except OSError as e:
        log.error(event, error=str(e), errno=errno.errorcode.get(e.errno or 0, e.errno), **fields)
        return None


@dataclass(eq=False)
class _Scan:
    """One scan of every lane, in progress."""

    now: float
    passes: dict[int, ScanPass]
    walk: WriterWalk | None = None
    stated: set[int] = field(default_factory=set)  # lanes whose entries are all lstat'ed


class Intake:
    def __init__(self, inbox: Inbox, wakeup: Any, log: Any, *, rescan_s: float):
        self.inbox, self.wakeup, self.log = inbox, wakeup, log
        self.rescan_s = rescan_s
        self.pool: Any = None         # the ClaimPool (the daemon sets it once the ledger is open)
        self.scans = 0                # completed scans (figures)
        self.last_walk: WriterWalk | None = None
        self._scan_due = 0.0          # next periodic rescan
        self._last_scan = -1e18
        self._recheck: float | None = None  # a settling file is due for another look
        self._scan: _Scan | None = None
        layout = RootLayout(inbox.dir.parent)
        # The priority lanes (inbox/high/, inbox/low/): the same rules, claimed high first. The
        # normal lane is ``inbox`` itself (the daemon updates its settle_s on reload). They share
        # one record of inotify's close-after-write events.
        closes: CloseLog = inbox.closes
        self.lanes: dict[int, Inbox] = {
            p: inbox if p == LANES["normal"] else Inbox(layout.lane(p), settle_s=inbox.settle_s, log=log,
                                                          closes=closes, walk=inbox.walk)
            for p in sorted(LANES.values(), reverse=True)}

    def look_soon(self, now: float) -> None:
        """Scan at the next tick (after a pause ends, say)."""
        self._scan_due = now

    def due(self, now: float) -> bool:
        hinted = self.wakeup.hinted and now >= self._last_scan + HINT_SCAN_MIN_S
        return hinted or now >= self._scan_due or (self._recheck is not None and now >= self._recheck)

    def busy(self) -> bool:
        """Work the loop can do right now (a scan in progress, claims to start or apply)."""
        return self._scan is not None or (self.pool is not None and self.pool.can_work())

    def next_wake(self, now: float) -> list[float]:
        if self.busy():
            return [now]
        times = [self._scan_due]
        if self.wakeup.hinted:
            times.append(self._last_scan + HINT_SCAN_MIN_S)
        if self._recheck is not None:
            times.append(self._recheck)
        if self.pool is not None and not self.pool.idle:
            times.append(now + 1.0)  # the threads poke the loop when they finish; only a backstop
        return times

    def work(self, now: float, deadline: float, ledger: Any, filing: Any) -> None:
        """Scan and claim until ``deadline`` (monotonic)."""
        if self._scan is None and self.due(now):
            self._begin(now, ledger)
        if self._scan is not None:
            self._continue(deadline, filing)
        if self.pool is not None:
            self.pool.step(now, deadline)

    def scan(self, now: float, ledger: Any, filing: Any) -> None:
        """A whole scan, its claims started (not waited for): for start-up and tests."""
        self._begin(now, ledger)
        self._continue(float("inf"), filing)

    # --- a scan ----------------------------------------------------------------------------

    def _begin(self, now: float, ledger: Any) -> None:
        self.wakeup.hinted = False
        self._last_scan = now
        self._scan_due = now + self.rescan_s
        if self.pool is not None:
            self.pool.resume(ledger.batches(BatchState.CLAIMING))
        for lane in self.lanes.values():
            lane.settle_s = self.inbox.settle_s
        pool = self.pool
        self._scan = _Scan(now, {p: lane.start_scan(now, None if pool is None else (lambda n, p=p: pool.knows(p, n)))
                                 for p, lane in self.lanes.items()})

    def _continue(self, deadline: float, filing: Any) -> None:
        s = self._scan
        assert s is not None
        for p, sp in s.passes.items():
            if p not in s.stated:
                if not sp.step(deadline):
                    return
                s.stated.add(p)
        if s.walk is None:
            doubt = set().union(*(sp.in_doubt for sp in s.passes.values()))
            s.walk = WriterWalk(set()) if not doubt else self.inbox.walk(doubt)
        if not s.walk.step(deadline):
            return
        self._finish(s, filing)

    def _finish(self, s: _Scan, filing: Any) -> None:
        self._scan = None
        self.scans += 1
        self.last_walk = s.walk
        self._recheck = None
        for priority, sp in s.passes.items():
            lane = self.lanes[priority]
            ready, rejected, recheck = sp.finish(s.walk.found if s.walk is not None else {})
            if recheck is not None:
                self._recheck = recheck if self._recheck is None else min(self._recheck, recheck)
            for rej in rejected:
                guarded(self.log, "inbox_entry_unmovable", lambda rej=rej: filing.reject_entry(rej, s.now),
                        file=rej.name)
            if self.pool is not None:
                for name in self.pool.offer(priority, ready):
                    lane.forget(name)
        self.inbox.closes.prune(time.monotonic())

    def start_watching(self, stop_file: Any, requests: Any) -> None:
        """inotify hints for the inbox lanes, ``root/.stop`` (created or removed by the operator)
        and the request folder."""
        try:
            self.inbox.start_watching(self.wakeup.hint)
            self.inbox.watch_also(stop_file.parent, {stop_file.name}, self.wakeup.hint)
            self.inbox.watch_also(requests, None, self.wakeup.hint)
            for lane in self.lanes.values():
                if lane is not self.inbox and lane.dir.is_dir():
                    self.inbox.watch_lane(lane.dir, self.inbox.closes, self.wakeup.hint)
        except OSError as e:
            # inotify unavailable (NFS, fs.inotify.max_user_watches exhausted): the periodic
            # rescan alone still finds every file, only later.
            self.log.warning("inotify_unavailable", error=str(e), rescan_s=self.rescan_s)
            self.inbox.stop_watching()
