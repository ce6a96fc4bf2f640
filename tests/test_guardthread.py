"""The memory guard's own thread and the loop's health figures, in-process with real processes:
decisions carried out on the guard's schedule while the calling thread is busy, nothing signalled
once the worker is reaped, and a slow turn logged with what it was doing."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from support.log import ListLog
from trainerd.supervisor.child import Child
from trainerd.core.contract import BatchFiles
from trainerd.core.faults import spin
from trainerd.memguard import Decision
from trainerd.supervisor.guardthread import GuardThread
from trainerd.supervisor.loophealth import LoopHealth, RecentIntervals
from trainerd.supervisor.stopping import Escalation


class _Scripted:
    """The MemoryGuard interface the thread uses: ``action`` at the ``after``-th poll (and at every
    later one with ``repeat``, as the real rules repeat "kill" while the worker is there)."""

    interval_s = 0.05

    def __init__(self, action: str, after: int, repeat: bool = False):
        self.action, self.after, self.repeat, self.polls = action, after, repeat, 0

    def attach(self, pid, batch_dir, started_at):
        pass

    def detach(self):
        pass

    def poll(self, now):
        self.polls += 1
        due = self.polls >= self.after if self.repeat else self.polls == self.after
        return Decision(action=self.action if due else "none", reason="scripted")


class _Running:
    def __init__(self, child: Child, files: BatchFiles, log):
        self.child, self.files, self.stop = child, files, Escalation(child, files, log)


def _worker(tmp_path: Path, log) -> _Running:
    files = BatchFiles(tmp_path / "batch")
    files.dir.mkdir()
    child = Child([sys.executable, "-c", "import time; time.sleep(60)"], stderr_path=files.stderr, log=log)
    return _Running(child, files, log)


def test_guard_acts_while_the_caller_spins(tmp_path):
    """The thread polls every interval and sends the guard's SIGTERM while the calling thread is
    held busy in pure Python; the sender is recorded as the guard."""
    log = ListLog()
    gt = GuardThread(log)
    gt.start()
    r = _worker(tmp_path, log)
    try:
        gt.attach(_Scripted("term", after=5), r, time.monotonic())
        t0 = time.monotonic()
        spin(1.0)  # the loop, busy: 20 polls are due meanwhile
        assert r.child.wait(10) is not None
        assert r.child.returncode == -signal.SIGTERM
        assert r.stop.sent_by(signal.SIGTERM).value == "guard"
        figures = gt.intervals.figures(time.monotonic())
        assert figures["count"] >= 10 and figures["max"] < 0.5, figures
        assert gt.take_actions() == ["term"] and time.monotonic() - t0 < 5
    finally:
        gt.detach()
        gt.stop()
        r.child.kill_group()
        r.child.wait(5)


def test_nothing_is_signalled_once_the_worker_is_reaped(tmp_path):
    """A guard that keeps deciding "kill" after the worker was reaped (the loop has not detached it
    yet) sends nothing more: SIGKILLs until the reap, then silence."""
    log = ListLog()
    gt = GuardThread(log)
    gt.start()
    r = _worker(tmp_path, log)
    try:
        gt.attach(_Scripted("kill", after=1, repeat=True), r, time.monotonic())
        assert r.child.wait(10) is not None  # reaped here, under the child's lock
        with r.stop.lock:  # no poll half-way through a rung
            sent = list(r.stop._sent)
        time.sleep(0.5)  # ten more polls decide "kill"
        assert sent and {s for s, _ in sent} == {signal.SIGKILL}  # to the worker or its zombie
        assert r.stop._sent == sent and r.child.send(signal.SIGKILL) is False
    finally:
        gt.detach()
        gt.stop()


def test_slow_turn_is_logged_with_its_phases():
    """A turn over the threshold is logged once with the seconds of each phase and its notes; the
    longest turn of the last minute is remembered with them."""
    log = ListLog()
    health = LoopHealth(log, slow_s=0.05)
    with health.turn():
        with health.phase("inbox"):
            time.sleep(0.08)
        with health.phase("requests"):
            pass
        health.note(claimed=32)
    with health.turn():
        pass
    slow = log.find("loop_turn_slow")
    assert len(slow) == 1 and slow[0]["doing"]["inbox"] >= 0.08 and slow[0]["doing"]["claimed"] == 32
    longest, doing = health.longest(time.monotonic())
    assert longest >= 0.08 and "inbox" in doing and "requests" not in doing  # under a millisecond: left out


def test_recent_intervals_keep_one_minute():
    """Intervals older than the window are dropped; p50 and max are of the rest."""
    iv = RecentIntervals(window_s=60)
    iv.add(0.0, 5.0)
    for i in range(1, 11):
        iv.add(100.0 + i, 0.1 * i)
    assert iv.figures(110.0) == {"p50": 0.6, "max": 1.0, "count": 10}
    assert iv.figures(1000.0) == {"p50": None, "max": None, "count": 0}
