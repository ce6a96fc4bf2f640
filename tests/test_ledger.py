"""The SQLite ledger: guarded transitions, durability settings, read-only readers."""

import sqlite3
import time
from dataclasses import replace

import pytest

from trainerd import schema
from trainerd.ledger import AttemptRecord, Ledger, LedgerConflict, LedgerTooNew
from trainerd.states import BatchState, InvalidTransition


@pytest.fixture
def led(tmp_path):
    l = Ledger(tmp_path / "state.db")
    yield l
    l.close()


def test_wal_and_full_sync(led):
    """The ledger runs in WAL mode with synchronous=FULL (every commit fsynced)."""
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_claim_to_done_records_attempts_and_versions(led, tmp_path):
    """A batch goes claiming -> queued -> running -> done and gets adapter version 1."""
    now = time.time()
    bid = led.begin_claim("a.jsonl", 10, now).id
    assert led.batch(bid).state == "claiming"
    assert led.finish_claim(bid, "ab" * 32, 10, now).state == "queued"
    n = led.start_attempt(bid, now, None).attempts
    led.set_attempt_pid(bid, n, 1234, 1.0)
    record = AttemptRecord(n, "done", "done", exit_code=0, result={"step": 3})
    decided = led.decide_done(bid, lambda v: tmp_path / str(v), now, attempt=record)
    # Decided, not finished: the version is reserved and the attempt closed, the state still running.
    assert (decided.state, decided.adapter_version, led.decided()) == ("running", 1, [decided])
    b = led.finish(decided, now)
    assert (n, b.state, b.adapter_version, b.attempts, b.last_step) == (1, "done", 1, 1, 3)
    assert led.batch(bid) == b and led.decided() == []
    assert led.attempts(bid)[0].pid == 1234 and led.attempts(bid)[0].result == {"step": 3}
    assert led.open_attempts() == []


def test_update_from_wrong_state_fails_loudly(led):
    """A transition whose source state does not match the row raises LedgerConflict, changing nothing."""
    now = time.time()
    bid = led.begin_claim("a.jsonl", 1, now).id
    led.finish_claim(bid, "x", 1, now)
    with pytest.raises(LedgerConflict, match="expected state claiming.*found queued"):
        led.finish_claim(bid, "x", 1, now)
    with pytest.raises(LedgerConflict, match="expected an undecided done batch, found queued"):
        led.decide_failed(bid, BatchState.DONE, "nope", now)
    with pytest.raises(LedgerConflict, match="before an end was decided"):
        led.finish(led.batch(bid), now)
    with pytest.raises(InvalidTransition, match="done -> failed not allowed"):
        led.finish(replace(led.batch(bid), state=BatchState.DONE, finished_at=now), now)
    assert led.batch(bid).state == "queued" and led.batch(bid).finished_at is None


def test_fifo_and_duplicates(led):
    """next_queued is the oldest queued batch; find_by_sha finds the same content in given states."""
    now = time.time()
    a = led.begin_claim("a.jsonl", 1, now).id
    b = led.begin_claim("b.jsonl", 1, now).id
    led.finish_claim(b, "h2", 1, now)
    led.finish_claim(a, "h1", 1, now)
    assert led.next_queued().id == a
    c = led.begin_claim("c.jsonl", 1, now).id
    assert led.find_by_sha("h1", (BatchState.QUEUED,), c).id == a
    assert led.find_by_sha("h1", (BatchState.DONE,), c) is None


def test_readonly_reader_cannot_write(led, tmp_path):
    """open_readonly sees committed rows and refuses writes."""
    led.begin_claim("a.jsonl", 1, time.time())
    ro = Ledger.open_readonly(tmp_path / "state.db")
    try:
        assert ro.batches()[0].name == "a.jsonl"
        with pytest.raises(sqlite3.OperationalError):
            ro.db.execute("DELETE FROM batches")
    finally:
        ro.close()


def test_counters(led):
    """Counters start at zero and add up."""
    assert led.counter("kernel_oom_kills") == 0
    led.bump("kernel_oom_kills")
    assert led.bump("kernel_oom_kills") == 2


def test_decided_failure_finishes_from_any_live_state(led):
    """A decided failure keeps its state (and drops out of the queue) until it is finished."""
    now = time.time()
    bid = led.begin_claim("a.jsonl", 1, now).id
    led.finish_claim(bid, "h", 1, now)
    d = led.decide_failed(bid, BatchState.QUEUED, "data missing", now, crashes=2)
    assert (d.state, d.last_reason, d.crashes) == ("queued", "data missing", 2)
    assert led.next_queued() is None  # a decided batch never starts
    assert led.finish(d, now).state == "failed"


def _v1_ledger(path):
    """A ledger exactly as release 1 wrote it: version-1 tables, user_version 1, one done batch."""
    led = Ledger(path)
    now = time.time()
    bid = led.begin_claim("old.jsonl", 3, now).id
    led.finish_claim(bid, "abc", 3, now)
    led.close()


def test_older_schema_is_migrated_with_a_backup(tmp_path, monkeypatch):
    """Opening a ledger of an older schema runs every migration step in order, keeps a copy of the
    old file, and keeps its rows; a second open migrates nothing."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    ran = []

    def to_2(conn):
        ran.append(2)
        conn.execute("ALTER TABLE batches ADD COLUMN note TEXT DEFAULT 'migrated'")

    monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(schema.MIGRATIONS, 2, to_2)
    led = Ledger(db)
    try:
        assert ran == [2] and led.schema_version() == 2
        assert tuple(led.db.execute("SELECT name, note FROM batches").fetchone()) == ("old.jsonl", "migrated")
    finally:
        led.close()
    bak = sqlite3.connect(tmp_path / "state.db.v1.bak")
    assert bak.execute("PRAGMA user_version").fetchone()[0] == 1
    assert bak.execute("SELECT name FROM batches").fetchone()[0] == "old.jsonl"
    bak.close()
    Ledger(db).close()
    assert ran == [2]


def test_newer_schema_is_refused(tmp_path):
    """A ledger written by a newer trainerd is refused with a message, never written."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerTooNew, match="newer trainerd"):
        Ledger(db)
