"""The SQLite ledger: guarded transitions, durability settings, read-only readers."""

import sqlite3
import time

import pytest

from trainerd.ledger import Ledger, LedgerConflict
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
    bid = led.begin_claim("a.jsonl", 10, now)
    assert led.batch(bid)["state"] == "claiming"
    led.finish_claim(bid, "ab" * 32, 10, now)
    n = led.start_attempt(bid, now, None)
    led.set_attempt_pid(bid, n, 1234, 1.0)
    led.end_attempt(bid, n, now, outcome="done", reason="done", exit_code=0, result={"step": 3})
    v = led.finish_done(bid, lambda n: tmp_path / str(n), now)
    b = led.batch(bid)
    assert (n, v, b["state"], b["adapter_version"], b["attempts"]) == (1, 1, "done", 1, 1)
    assert led.attempts(bid)[0]["pid"] == 1234 and led.open_attempts() == []


def test_update_from_wrong_state_fails_loudly(led):
    """A transition whose source state does not match the row raises LedgerConflict, changing nothing."""
    now = time.time()
    bid = led.begin_claim("a.jsonl", 1, now)
    led.finish_claim(bid, "x", 1, now)
    with pytest.raises(LedgerConflict, match="expected state claiming.*found queued"):
        led.finish_claim(bid, "x", 1, now)
    with pytest.raises(InvalidTransition):
        led.fail(bid, BatchState.DONE, "nope", now)
    assert led.batch(bid)["state"] == "queued"


def test_fifo_and_duplicates(led):
    """next_queued is the oldest queued batch; find_by_sha finds the same content in given states."""
    now = time.time()
    a = led.begin_claim("a.jsonl", 1, now)
    b = led.begin_claim("b.jsonl", 1, now)
    led.finish_claim(b, "h2", 1, now)
    led.finish_claim(a, "h1", 1, now)
    assert led.next_queued()["id"] == a
    c = led.begin_claim("c.jsonl", 1, now)
    assert led.find_by_sha("h1", (BatchState.QUEUED,), c)["id"] == a
    assert led.find_by_sha("h1", (BatchState.DONE,), c) is None


def test_readonly_reader_cannot_write(led, tmp_path):
    """open_readonly sees committed rows and refuses writes."""
    led.begin_claim("a.jsonl", 1, time.time())
    ro = Ledger.open_readonly(tmp_path / "state.db")
    try:
        assert ro.batches()[0]["name"] == "a.jsonl"
        with pytest.raises(sqlite3.OperationalError):
            ro.db.execute("DELETE FROM batches")
    finally:
        ro.close()


def test_counters(led):
    """Counters start at zero and add up."""
    assert led.counter("kernel_oom_kills") == 0
    led.bump("kernel_oom_kills")
    assert led.bump("kernel_oom_kills") == 2
