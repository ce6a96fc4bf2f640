"""`trainerd check`: from a real root in each condition (a real ledger, the real lock, real files), its
Nagios exit code and its one line; the window and --state-file; and the same conditions as the
metrics' trainerd_health gauges."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from trainerd.cli import main
from trainerd.core.contract import RootLayout
from trainerd.supervisor.views.health import Facts, Severity, Thresholds, assess, line
from trainerd.supervisor.ledger import AttemptRecord, Ledger
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.rootlock import take_root_lock

HOUR = 3600.0


class Root:
    """A root as a daemon leaves it, built through the real Ledger; ``running()`` holds the root's
    lock as a live daemon does (status and check read that lock, not a pid)."""

    def __init__(self, path: Path):
        self.layout = RootLayout(path)
        self.layout.make()
        self.led = Ledger(self.layout.db)
        self.fd: int | None = None

    def running(self) -> "Root":
        self.fd = take_root_lock(self.layout)
        return self

    def batch(self, name: str, at: float) -> int:
        bid = self.led.begin_claim(name, 1, at).id
        self.led.finish_claim(bid, name.ljust(64, "0"), 1, at)
        return bid

    def quarantine(self, name: str, at: float) -> int:
        bid = self.batch(name, at)
        n = self.led.start_attempt(bid, at, None).attempts
        self.led.finish(self.led.decide_failed(bid, BatchState.RUNNING, "bad data: 90% of lines bad", at,
                                               attempt=AttemptRecord(n, "bad_data", "bad data", exit_code=65)), at)
        return bid

    def oom_kill(self, name: str, at: float) -> int:
        bid = self.batch(name, at)
        n = self.led.start_attempt(bid, at, None).attempts
        self.led.requeue(bid, at, reason="kernel_oom_kill",
                         attempt=AttemptRecord(n, "stopped", "kernel_oom_kill", signal=9))
        self.led.bump("kernel_oom_kills")
        return bid

    def crashed(self, name: str, at: float, retry_at: float) -> int:
        bid = self.batch(name, at)
        n = self.led.start_attempt(bid, at, None).attempts
        self.led.requeue(bid, at, reason="exit 1: ValueError: boom", next_attempt_at=retry_at, crashes=1,
                         attempt=AttemptRecord(n, "crashed", "exit 1: ValueError: boom", exit_code=1))
        return bid

    def paused_since(self, at: float) -> None:
        self.layout.stop.write_text("paused\n")
        os.utime(self.layout.stop, (at, at))

    def close(self) -> None:
        self.led.close()
        if self.fd is not None:
            os.close(self.fd)


@pytest.fixture
def root(tmp_path):
    r = Root(tmp_path / "root")
    yield r
    r.close()


def check(root: Root, capsys, *args: str) -> tuple[int, str]:
    rc = main(["check", "--root", str(root.layout.root), *args])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 or "--json" in args, out  # one line
    return rc, out.strip()


def test_ok_when_the_daemon_runs_and_nothing_is_wrong(root, capsys):
    """A running daemon with a queue and nothing wrong: exit 0, TRAINERD OK, perfdata after '|'."""
    root.running()
    root.batch("waiting.jsonl", time.time())
    rc, out = check(root, capsys)
    assert rc == 0 and out.startswith("TRAINERD OK - daemon running, 1 queued | queued=1 quarantined=0"), out


def test_daemon_down_is_critical_with_its_last_sign_of_life(root, capsys):
    """No daemon holds the lock: exit 2, "TRAINERD CRITICAL - daemon down since <its last daemon.json write>"."""
    seen = time.time() - 2 * HOUR
    root.layout.daemon.write_text(json.dumps({"state": "idle", "updated_at": seen}))
    os.utime(root.layout.daemon, (seen, seen))
    rc, out = check(root, capsys)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen))
    assert rc == 2 and out.startswith(f"TRAINERD CRITICAL - daemon down since {when} (2h00m ago)"), out


def test_paused_longer_than_the_threshold_is_a_warning(root, capsys):
    """Paused 2 h: WARNING against the default 1 h; OK with --paused-warning 3h; the config's
    check.paused_warning_s is used when no flag says otherwise."""
    root.running().paused_since(time.time() - 2 * HOUR)
    rc, out = check(root, capsys)
    assert rc == 1 and out.startswith("TRAINERD WARNING - paused for 2h00m (since "), out
    assert "paused=7200s;3600" in out or "paused=7199s;3600" in out, out
    rc, out = check(root, capsys, "--paused-warning", "3h")
    assert rc == 0 and "daemon running, paused" in out, out
    cfg = root.layout.root.parent / "c.yaml"
    cfg.write_text(f"root: {root.layout.root}\ncheck: {{paused_warning_s: 10800}}\ndisk: {{min_free_bytes: 0}}\n")
    assert check(root, capsys, "--config", str(cfg))[0] == 0


def test_a_quarantined_batch_is_a_warning_within_the_window(root, capsys):
    """A batch filed to failed/ 10 min ago: WARNING naming it; with --window 5m it is out of the window: OK."""
    root.running()
    bid = root.quarantine("bad.jsonl", time.time() - 600)
    rc, out = check(root, capsys)
    assert rc == 1 and f"1 batch(es) quarantined to failed/ since " in out and f"#{bid} bad.jsonl" in out, out
    assert check(root, capsys, "--window", "5m")[0] == 0


def test_a_kernel_oom_kill_is_critical_within_the_window(root, capsys):
    """A worker the kernel OOM-killed 10 min ago: CRITICAL; an hour-old kill with a 30 min window: OK
    (the lifetime total stays in the perfdata)."""
    root.running()
    root.oom_kill("big.jsonl", time.time() - 600)
    rc, out = check(root, capsys)
    assert rc == 2 and out.startswith("TRAINERD CRITICAL - 1 kernel OOM kill(s) of a worker since "), out
    rc, out = check(root, capsys, "--window", "5m")
    assert rc == 0 and "kernel_oom_kills=0 kernel_oom_kills_total=1c" in out, out


def test_disk_below_the_floor_is_critical(root, capsys):
    """Free space under the config's disk.min_free_bytes (1 PiB here): CRITICAL naming both figures."""
    root.running()
    cfg = root.layout.root.parent / "c.yaml"
    cfg.write_text(f"root: {root.layout.root}\ndisk: {{min_free_bytes: 1024TiB}}\n")
    rc, out = check(root, capsys, "--config", str(cfg))
    assert rc == 2 and "disk free " in out and "below the floor 1024.0 TiB: no batch starts" in out, out


def test_the_head_of_the_queue_in_a_crash_back_off_is_a_warning(root, capsys):
    """The head of the queue crashed and waits 5 min to retry: WARNING with the wait and the last reason."""
    root.running()
    now = time.time()
    bid = root.crashed("crashy.jsonl", now - 10, now + 300)
    root.batch("behind.jsonl", now)
    rc, out = check(root, capsys)
    assert rc == 1 and f"the head of the queue, batch #{bid} crashy.jsonl, waits 4m5" in out, out
    assert "to retry after 1 crash(es) (last: exit 1: ValueError: boom)" in out


def test_several_conditions_worst_first_and_json(root, capsys):
    """Down, paused and a quarantine at once: exit 2, the critical condition first; --json lists all six."""
    now = time.time()
    root.paused_since(now - 3 * HOUR)
    root.quarantine("bad.jsonl", now - 60)
    rc, out = check(root, capsys)
    assert rc == 2 and out.startswith("TRAINERD CRITICAL - daemon down (no sign that one ever ran here); paused for 3h")
    assert "; 1 batch(es) quarantined" in out
    rc, out = check(root, capsys, "--json")
    got = json.loads(out)
    assert rc == 2 and got["state"] == "CRITICAL"
    assert {c["name"]: c["state"] for c in got["conditions"]} == {
        "daemon_down": "CRITICAL", "disk_low": "OK", "kernel_oom_kills": "OK", "paused": "WARNING",
        "quarantined": "WARNING", "crash_backoff": "OK"}


def test_state_file_counts_events_since_the_previous_check(root, capsys, tmp_path):
    """With --state-file a quarantine is reported by the first check only; the file lies outside the
    root and the root is not written."""
    root.running()
    root.quarantine("bad.jsonl", time.time() - 60)
    state = tmp_path / "state" / "check.json"
    before = sorted(p.name for p in root.layout.root.iterdir())
    assert check(root, capsys, "--state-file", str(state))[0] == 1
    assert json.loads(state.read_text())["root"] == str(root.layout.root)
    assert check(root, capsys, "--state-file", str(state))[0] == 0
    assert check(root, capsys)[0] == 1  # the stateless window still sees it
    assert sorted(p.name for p in root.layout.root.iterdir()) == before


def test_not_a_root_and_a_bad_config_are_unknown(tmp_path, capsys):
    """A folder that is not a root, or an unreadable config: exit 3, TRAINERD UNKNOWN with the reason."""
    rc = main(["check", "--root", str(tmp_path / "nope")])
    assert rc == 3 and capsys.readouterr().out.startswith(f"TRAINERD UNKNOWN - {tmp_path / 'nope'} is not a trainerd root")
    RootLayout(tmp_path / "r").make()
    rc = main(["check", "--root", str(tmp_path / "r"), "--config", str(tmp_path / "missing.yaml")])
    assert rc == 3 and "TRAINERD UNKNOWN - the config cannot be used" in capsys.readouterr().out


def test_assess_is_pure_and_every_condition_is_always_reported():
    """The decision from hand-made facts: six conditions in a fixed order, severity per the table."""
    now = 1_000_000.0
    f = Facts(now=now, since=now - HOUR, daemon_running=True, free_bytes=10, min_free_bytes=100,
              kernel_oom_kills=0, paused_since=now - 10)
    conds = assess(f, Thresholds())
    assert [c.name for c in conds] == ["daemon_down", "disk_low", "kernel_oom_kills", "paused", "quarantined",
                                       "crash_backoff"]
    assert {c.name: c.severity for c in conds if c.severity} == {"disk_low": Severity.CRITICAL}
    assert line(conds, f, Thresholds()).startswith("TRAINERD CRITICAL - disk free 10 B below the floor 100 B")


def test_the_metrics_carry_the_same_conditions(tmp_path):
    """The daemon's textfile has trainerd_health (the worst) and trainerd_health_condition per condition,
    from the same ledger facts: a quarantine within check.window_s is 1, a kernel OOM kill 2."""
    from test_metrics import _FakeDaemon, _read, _value  # the metrics tests' stand-in for a Supervisor

    from support.log import ListLog
    from trainerd.supervisor.metrics import Metrics, textfile_path

    d = _FakeDaemon(tmp_path)
    d.settings.disk.min_free_bytes = 0
    m = Metrics(ListLog())
    now = time.time()
    m.tick(now, d)
    got = _read(textfile_path(d.settings))
    assert _value(got, "trainerd_health") == 0 and _value(got, "trainerd_health_condition", condition="paused") == 0
    bid = d.ledger.begin_claim("bad.jsonl", 1, now).id
    d.ledger.finish_claim(bid, "b" * 64, 1, now)
    n = d.ledger.start_attempt(bid, now, None).attempts
    d.ledger.finish(d.ledger.decide_failed(bid, BatchState.RUNNING, "bad", now,
                                           attempt=AttemptRecord(n, "bad_data", "bad", exit_code=65)), now)
    m.tick(now + 1, d)
    got = _read(textfile_path(d.settings))
    assert _value(got, "trainerd_health") == 1
    assert _value(got, "trainerd_health_condition", condition="quarantined") == 1
    assert _value(got, "trainerd_health_condition", condition="daemon_down") == 0
    # An hour later (check.window_s) the quarantine has left the window, with no ledger change.
    m.tick(now + HOUR + 10, d)
    assert _value(_read(textfile_path(d.settings)), "trainerd_health") == 0
