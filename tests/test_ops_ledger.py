"""The ledger's side of issue 14: priority lanes in the queue, the cancelled end, versions removed by
retention, and a root written by release 2 (schema 2) opening migrated."""

from __future__ import annotations

import sqlite3
import time

import pytest

from trainerd.supervisor.ledger import schema
from trainerd.core.contract import LANES, RootLayout
from trainerd.supervisor.ledger import AttemptRecord, Ledger
from trainerd.supervisor.ledger.states import BatchState, InvalidTransition, check_transition
from trainerd.supervisor import recovery


@pytest.fixture
def led(tmp_path):
    l = Ledger(tmp_path / "state.db")
    yield l
    l.close()


def _queued(led, name, priority=0, now=None):
    now = time.time() if now is None else now
    b = led.begin_claim(name, 1, now, priority=priority)
    return led.finish_claim(b.id, name, 1, now)


def test_higher_lane_first_arrival_order_within_a_lane(led):
    """A queued high file starts before normal ones before low ones; same lane keeps arrival order."""
    low = _queued(led, "low.jsonl", LANES["low"])
    n1 = _queued(led, "n1.jsonl")
    h1 = _queued(led, "h1.jsonl", LANES["high"])
    n2 = _queued(led, "n2.jsonl")
    h2 = _queued(led, "h2.jsonl", LANES["high"])
    order = []
    while (head := led.next_queued()) is not None:
        order.append(head.name)
        led.decide_failed(head.id, BatchState.QUEUED, "taken", time.time())
    assert order == ["h1.jsonl", "h2.jsonl", "n1.jsonl", "n2.jsonl", "low.jsonl"]
    assert (low.priority, n1.priority, h1.priority, n2.id < h2.id) == (-1, 0, 1, True)


def test_a_started_batch_is_never_overtaken(led):
    """A low batch that has run an attempt (paused, requeued) stays the head when a high one arrives."""
    now = time.time()
    low = _queued(led, "low.jsonl", LANES["low"])
    b = led.start_attempt(low.id, now, None)
    led.requeue(b.id, now, reason="paused", attempt=AttemptRecord(1, "stopped", "paused"))
    _queued(led, "high.jsonl", LANES["high"])
    assert led.next_queued().name == "low.jsonl"


def test_cancelled_is_final_and_reached_from_queued_and_running(led):
    """cancelled: decided then finished from queued or running; nothing leaves it."""
    now = time.time()
    a = _queued(led, "a.jsonl")
    d = led.decide_cancelled(a.id, BatchState.QUEUED, "cancelled by an operator", now)
    assert (d.state, d.decision) == ("queued", "cancelled") and led.next_queued() is None
    assert led.finish(d, now).state == "cancelled"
    b = _queued(led, "b.jsonl")
    led.start_attempt(b.id, now, None)
    d = led.decide_cancelled(b.id, BatchState.RUNNING, "cancelled", now,
                             attempt=AttemptRecord(1, "stopped", "cancelled", exit_code=75))
    assert led.finish(d, now).state == "cancelled" and led.attempts(b.id)[0].outcome == "stopped"
    check_transition("queued", "cancelled")
    with pytest.raises(InvalidTransition):
        check_transition("cancelled", "queued")
    with pytest.raises(InvalidTransition):
        check_transition("done", "cancelled")


def test_removed_versions_are_no_fsck_finding(tmp_path):
    """A version whose folder retention removed (removed_at set) is not reported by fsck's compare."""
    layout = RootLayout(tmp_path)
    layout.make()
    led = Ledger(layout.db)
    try:
        now = time.time()
        a = _queued(led, "a.jsonl")
        led.start_attempt(a.id, now, None)
        led.finish(led.decide_done(a.id, layout.adapter_dir, now), now)
        assert [f["finding"] for f in recovery.compare(layout, led) if "version" in f] == [
            "version in the ledger without its folder"]
        led.mark_removed([1], now)
        assert [f for f in recovery.compare(layout, led) if "version" in f] == []
        assert led.adapter_versions()[0].removed_at == now
    finally:
        led.close()


# The tables as release 2 (schema 2, the evaluation gate) wrote them.
V2_SCHEMA = """
CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, sha256 TEXT, size_bytes INTEGER,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
  memory_stops INTEGER NOT NULL DEFAULT 0, micro_batch_size INTEGER, grad_accum_steps INTEGER,
  gradient_checkpointing INTEGER, next_attempt_at REAL NOT NULL DEFAULT 0, last_reason TEXT, last_step INTEGER,
  total_steps INTEGER, adapter_version INTEGER, duplicate_of INTEGER, parent_version INTEGER, decision TEXT,
  gate_json TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL);
CREATE INDEX batches_state ON batches(state, id);
CREATE INDEX batches_sha ON batches(sha256);
CREATE TABLE attempts (batch_id INTEGER NOT NULL REFERENCES batches(id), n INTEGER NOT NULL, pid INTEGER,
  pid_started_at REAL, started_at REAL NOT NULL, ended_at REAL, init_adapter TEXT, exit_code INTEGER,
  signal INTEGER, signal_sent_by TEXT, outcome TEXT, reason TEXT, result_json TEXT, PRIMARY KEY (batch_id, n));
CREATE TABLE adapter_versions (n INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id),
  path TEXT NOT NULL, created_at REAL NOT NULL, parent INTEGER, kind TEXT NOT NULL DEFAULT 'blessed', source INTEGER);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO batches(name, sha256, state, attempts, adapter_version, decision, created_at, updated_at, finished_at)
  VALUES ('a.jsonl', 'aa', 'done', 1, 1, 'blessed', 1, 1, 1), ('b.jsonl', 'bb', 'rejected', 1, NULL, 'rejected', 2, 2, 2),
         ('c.jsonl', 'cc', 'queued', 0, NULL, NULL, 3, 3, NULL);
INSERT INTO adapter_versions VALUES (1, 1, '/r/adapters/1', 1, NULL, 'blessed', NULL);
PRAGMA user_version=2;
"""


def test_a_release_2_root_opens_migrated_with_a_backup(tmp_path):
    """A ledger written by release 2 opens migrated: every batch in the normal lane, no version
    removed, the queue as it was; a copy of the old file is kept as state.db.v2.bak."""
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript(V2_SCHEMA)
    conn.close()
    led = Ledger(db)
    try:
        assert led.schema_version() == schema.SCHEMA_VERSION
        assert [(b.name, b.state.value, b.priority, b.heals) for b in led.batches()] == [
            ("a.jsonl", "done", 0, 0), ("b.jsonl", "rejected", 0, 0), ("c.jsonl", "queued", 0, 0)]
        assert [(v.n, v.removed_at) for v in led.adapter_versions()] == [(1, None)]
        assert led.next_queued().name == "c.jsonl"
        led.begin_claim("d.jsonl", 1, 4.0, priority=LANES["high"])  # the new column is writable
    finally:
        led.close()
    bak = sqlite3.connect(tmp_path / "state.db.v2.bak")
    assert bak.execute("PRAGMA user_version").fetchone()[0] == 2
    bak.close()
