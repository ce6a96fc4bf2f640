"""The SQLite ledger: guarded transitions, durability settings, read-only readers."""

import sqlite3
import time
from dataclasses import replace

import pytest

from trainerd.supervisor.ledger import schema
from trainerd.supervisor.ledger import AttemptRecord, Ledger, LedgerConflict, LedgerTooNew
from trainerd.supervisor.ledger.states import BatchState, InvalidTransition


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


# The tables exactly as release 1 (schema 1) wrote them: a root written then must open now.
V1_SCHEMA = """
CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, sha256 TEXT, size_bytes INTEGER,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
  memory_stops INTEGER NOT NULL DEFAULT 0, micro_batch_size INTEGER, grad_accum_steps INTEGER,
  gradient_checkpointing INTEGER, next_attempt_at REAL NOT NULL DEFAULT 0, last_reason TEXT, last_step INTEGER,
  total_steps INTEGER, adapter_version INTEGER, duplicate_of INTEGER, created_at REAL NOT NULL,
  updated_at REAL NOT NULL, finished_at REAL);
CREATE INDEX batches_state ON batches(state, id);
CREATE INDEX batches_sha ON batches(sha256);
CREATE TABLE attempts (batch_id INTEGER NOT NULL REFERENCES batches(id), n INTEGER NOT NULL, pid INTEGER,
  pid_started_at REAL, started_at REAL NOT NULL, ended_at REAL, init_adapter TEXT, exit_code INTEGER,
  signal INTEGER, signal_sent_by TEXT, outcome TEXT, reason TEXT, result_json TEXT, PRIMARY KEY (batch_id, n));
CREATE TABLE adapter_versions (n INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id),
  path TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO batches(name, sha256, state, attempts, adapter_version, created_at, updated_at, finished_at)
  VALUES ('a.jsonl', 'aa', 'done', 1, 1, 1, 1, 1), ('b.jsonl', 'bb', 'done', 1, 2, 2, 2, 2),
         ('c.jsonl', 'cc', 'queued', 0, NULL, 3, 3, NULL);
INSERT INTO adapter_versions VALUES (1, 1, '/r/adapters/1', 1), (2, 2, '/r/adapters/2', 2);
PRAGMA user_version=1;
"""


def _v1_ledger(path):
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()


def test_a_release_1_root_opens_migrated_with_a_backup(tmp_path):
    """A ledger written by release 1 opens under this one: migrated to the current schema, its
    rows kept (versions chained, done batches blessed), and a copy of the old file kept beside it."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    led = Ledger(db)
    try:
        assert led.schema_version() == schema.SCHEMA_VERSION
        assert [(b.name, b.state, b.decision) for b in led.batches()] == [
            ("a.jsonl", "done", "blessed"), ("b.jsonl", "done", "blessed"), ("c.jsonl", "queued", None)]
        assert [(v.n, v.parent, v.kind) for v in led.adapter_versions()] == [(1, None, "blessed"), (2, 1, "blessed")]
        assert led.next_queued().name == "c.jsonl"
    finally:
        led.close()
    bak = sqlite3.connect(tmp_path / "state.db.v1.bak")
    assert bak.execute("PRAGMA user_version").fetchone()[0] == 1
    assert bak.execute("SELECT count(*) FROM batches").fetchone()[0] == 3
    bak.close()


def test_migration_steps_run_in_order_once(tmp_path, monkeypatch):
    """Every step from the file's version to this release's runs once, in order; a second open runs none."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    ran = []
    real = dict(schema.MIGRATIONS)

    def step(v):
        def run(conn):
            ran.append(v)
            (real[v] if v in real else lambda c: c.execute("ALTER TABLE batches ADD COLUMN note TEXT"))(conn)
        return run

    top = schema.SCHEMA_VERSION + 1
    monkeypatch.setattr(schema, "SCHEMA_VERSION", top)
    for v in range(2, top + 1):
        monkeypatch.setitem(schema.MIGRATIONS, v, step(v))
    Ledger(db).close()
    assert ran == list(range(2, top + 1))
    Ledger(db).close()
    assert ran == list(range(2, top + 1))


def test_newer_schema_is_refused(tmp_path):
    """A ledger written by a newer trainerd is refused with a message, never written."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerTooNew, match="newer trainerd"):
        Ledger(db)


def test_schema_4_keeps_an_unfinished_batchs_retry_budget(tmp_path):
    """Migrating to schema 4 (crashes counted by progress): a batch still under way keeps the crashes
    it had as its streak (earlier releases counted every crash), a finished one starts clean; the new
    counts are zero and the goodput figures empty."""
    db = tmp_path / "state.db"
    _v1_ledger(db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE batches SET crashes = 3, last_step = 17 WHERE name = 'c.jsonl'")
    conn.execute("UPDATE batches SET crashes = 1 WHERE name = 'a.jsonl'")
    conn.commit()
    conn.close()
    led = Ledger(db)
    try:
        got = {b.name: (b.crashes, b.crash_streak, b.faults_survived, b.reached_step, b.goodput) for b in led.batches()}
        assert got["c.jsonl"] == (3, 3, 0, 17, {})
        assert got["a.jsonl"] == (1, 0, 0, None, {})
        assert led.goodput_totals()["wall_s"] == 0.0
    finally:
        led.close()
