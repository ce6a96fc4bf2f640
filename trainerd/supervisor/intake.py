"""Intake: when to look at the inbox, and what to do with what is there.

inotify events (through :class:`~.wakeup.Wakeup`) are only hints; the periodic rescan finds
every file regardless. A finished file is claimed (:meth:`.attempts.Attempts.claim`); a
non-regular entry is moved, unread, to failed/ (:meth:`.filing.Filing.reject_entry`); a claim
that hit an error (disk full, EIO) is finished at the next scan.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from trainerd.contract import LANES, RootLayout
from trainerd.inbox import Inbox
from trainerd.states import BatchState

__all__ = ["Intake", "guarded"]

# inotify hints arrive per write while a big file is copied in: at most one hinted scan per
# this many seconds, the periodic rescan regardless.
HINT_SCAN_MIN_S = 0.1


def guarded(log: Any, event: str, fn: Callable[[], Any], **fields: Any) -> Any:
    """Run a file-system step; an OSError (ENOSPC, EIO, EACCES) is logged, not fatal: the
    ledger says where the step stopped and the next scan or start retries it."""
    try:
        return fn()
    except OSError as e:
        log.error(event, error=str(e), errno=errno.errorcode.get(e.errno or 0, e.errno), **fields)
        return None


class Intake:
    def __init__(self, inbox: Inbox, wakeup: Any, log: Any, *, rescan_s: float):
        self.inbox, self.wakeup, self.log = inbox, wakeup, log
        self.rescan_s = rescan_s
        self._scan_due = 0.0          # next periodic rescan
        self._last_scan = -1e18
        self._recheck: float | None = None  # a settling file is due for another look
        layout = RootLayout(inbox.dir.parent)
        # The priority lanes (inbox/high/, inbox/low/): the same rules, claimed high first. The
        # normal lane is ``inbox`` itself (the daemon updates its settle_s on reload).
        self.lanes: dict[int, Inbox] = {
            p: inbox if p == LANES["normal"] else Inbox(layout.lane(p), settle_s=inbox.settle_s, log=log,
                                                          writer_check=inbox.writer_check)
            for p in sorted(LANES.values(), reverse=True)}

    def look_soon(self, now: float) -> None:
        """Scan at the next tick (after a pause ends, say)."""
        self._scan_due = now

    def due(self, now: float) -> bool:
        hinted = self.wakeup.hinted and now >= self._last_scan + HINT_SCAN_MIN_S
        return hinted or now >= self._scan_due or (self._recheck is not None and now >= self._recheck)

    def next_wake(self) -> list[float]:
        times = [self._scan_due]
        if self.wakeup.hinted:
            times.append(self._last_scan + HINT_SCAN_MIN_S)
        if self._recheck is not None:
            times.append(self._recheck)
        return times

    def scan(self, now: float, ledger: Any, attempts: Any, filing: Any) -> None:
        self.wakeup.hinted = False
        self._last_scan = now
        self._scan_due = now + self.rescan_s
        for b in ledger.batches(BatchState.CLAIMING):
            guarded(self.log, "claim_failed", lambda b=b: attempts.complete_claim(b, now), file=b.name)
        self._recheck = None
        for priority, lane in self.lanes.items():
            lane.settle_s = self.inbox.settle_s
            ready, rejected, recheck = lane.scan(now)
            if recheck is not None:
                self._recheck = recheck if self._recheck is None else min(self._recheck, recheck)
            for rej in rejected:
                guarded(self.log, "inbox_entry_unmovable", lambda rej=rej: filing.reject_entry(rej, now),
                        file=rej.name)
            for name in ready:
                lane.forget(name)
                guarded(self.log, "claim_failed", lambda name=name, p=priority: attempts.claim(name, now, priority=p),
                        file=name)

    def start_watching(self, stop_file: Any, requests: Any) -> None:
        """inotify hints for the inbox, ``root/.stop`` (created or removed by the operator) and
        the request folder."""
        try:
            self.inbox.start_watching(self.wakeup.hint)
            self.inbox.watch_also(stop_file.parent, {stop_file.name}, self.wakeup.hint)
            self.inbox.watch_also(requests, None, self.wakeup.hint)
            for lane in self.lanes.values():
                if lane is not self.inbox and lane.dir.is_dir():
                    self.inbox.watch_also(lane.dir, None, self.wakeup.hint)
        except OSError as e:
            # inotify unavailable (NFS, fs.inotify.max_user_watches exhausted): the periodic
            # rescan alone still finds every file, only later.
            self.log.warning("inotify_unavailable", error=str(e), rescan_s=self.rescan_s)
            self.inbox.stop_watching()
