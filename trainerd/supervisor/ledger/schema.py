"""The ledger's tables, their version, and the way from every older version to this one.

``PRAGMA user_version`` holds the version a root was written with. Opening an older one
applies :data:`MIGRATIONS` in order, in the opening transaction, after a consistent copy of the
old file is kept beside it (``state.db.v<N>.bak``, SQLite's online backup); a newer one is
refused with :class:`LedgerTooNew` (an older trainerd must not write a schema it does not know).

A release that changes :data:`_SCHEMA` bumps :data:`SCHEMA_VERSION` and adds the step that
brings an old root there; tests/test_ledger.py opens a root written by every older version.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable

from trainerd.supervisor.ledger import aggregates

__all__ = ["LedgerTooNew", "MIGRATIONS", "SCHEMA_VERSION", "upgrade", "version"]

SCHEMA_VERSION = 4

# The schema as this release writes it (a new root gets this, then user_version = SCHEMA_VERSION).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    name                   TEXT NOT NULL,          -- original file name in the inbox
    sha256                 TEXT,                   -- NULL until the claim hashed it
    size_bytes             INTEGER,
    state                  TEXT NOT NULL,
    attempts               INTEGER NOT NULL DEFAULT 0,  -- every worker start
    crashes                INTEGER NOT NULL DEFAULT 0,  -- attempts that crashed, all of them
    faults_survived        INTEGER NOT NULL DEFAULT 0,  -- crashes of attempts that had made progress
    crash_streak           INTEGER NOT NULL DEFAULT 0,  -- crashes in a row without getting further (retry budget)
    reached_step           INTEGER,                -- the furthest optimizer step any attempt completed
    goodput_json           TEXT,                   -- useful step time, wall time, seconds lost to faults
    memory_stops           INTEGER NOT NULL DEFAULT 0,
    micro_batch_size       INTEGER,                -- NULL = not planned yet
    grad_accum_steps       INTEGER,
    gradient_checkpointing INTEGER,
    base_weights           TEXT,                   -- the plan's base-weight layout (trainerd/core/ladder.py), NULL = before layouts
    next_attempt_at        REAL NOT NULL DEFAULT 0,
    last_reason            TEXT,
    last_step              INTEGER,
    total_steps            INTEGER,
    adapter_version        INTEGER,                -- the version this batch published
    duplicate_of           INTEGER,
    parent_version         INTEGER,                -- the champion / init adapter, fixed at the first start
    decision               TEXT,                   -- blessed | ungated | rejected | forced | cancelled
    gate_json              TEXT,                   -- the gate's figures and rule
    priority               INTEGER NOT NULL DEFAULT 0,  -- its lane: 1 high, 0 normal, -1 low (contract.LANES)
    heals                  INTEGER NOT NULL DEFAULT 0,  -- healing tries (refused for forgetting, trained again)
    created_at             REAL NOT NULL,
    updated_at             REAL NOT NULL,
    finished_at            REAL
);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state, id);
CREATE INDEX IF NOT EXISTS batches_sha ON batches(sha256);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    n               INTEGER NOT NULL,
    pid             INTEGER,
    pid_started_at  REAL,            -- psutil create_time: tells our worker from a reused pid
    started_at      REAL NOT NULL,
    ended_at        REAL,
    init_adapter    TEXT,
    exit_code       INTEGER,
    signal          INTEGER,
    signal_sent_by  TEXT,            -- who sent a fatal signal: supervisor, guard, NULL = nobody we know
    outcome         TEXT,            -- done | stopped | bad_data | bad_config | crashed | lost
    reason          TEXT,
    result_json     TEXT,
    account_json    TEXT,            -- where it resumed, how far it got, its restart, steps and checkpoint time
    PRIMARY KEY (batch_id, n)
);
CREATE INDEX IF NOT EXISTS attempts_ended ON attempts(ended_at);
CREATE TABLE IF NOT EXISTS adapter_versions (
    n           INTEGER PRIMARY KEY,
    batch_id    INTEGER NOT NULL REFERENCES batches(id),
    path        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    parent      INTEGER,                -- the version its weights were trained from (NULL: the base model)
    kind        TEXT NOT NULL DEFAULT 'blessed',  -- blessed | forced | rollback
    source      INTEGER,                -- rollback: the version it is a copy of
    removed_at  REAL                    -- its folder was deleted by retention (retention.keep_adapters)
);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
"""

# MIGRATIONS[k] turns a version k-1 ledger into version k, inside the opening transaction.
def _to_2(db: sqlite3.Connection) -> None:
    """The evaluation gate: a batch's parent, decision and figures; a version's parent and kind."""
    for stmt in ("ALTER TABLE batches ADD COLUMN parent_version INTEGER",
                 "ALTER TABLE batches ADD COLUMN decision TEXT",
                 "ALTER TABLE batches ADD COLUMN gate_json TEXT",
                 "ALTER TABLE adapter_versions ADD COLUMN parent INTEGER",
                 "ALTER TABLE adapter_versions ADD COLUMN kind TEXT NOT NULL DEFAULT 'blessed'",
                 "ALTER TABLE adapter_versions ADD COLUMN source INTEGER"):
        db.execute(stmt)
    # Before the gate every version was published blind and continued the one before it.
    db.execute("UPDATE adapter_versions SET parent = CASE WHEN n > 1 THEN n - 1 END")
    db.execute("UPDATE batches SET decision = 'blessed' WHERE state = 'done'")


def _to_3(db: sqlite3.Connection) -> None:
    """Operations (issue 14): a batch's priority lane; a version whose folder retention removed."""
    db.execute("ALTER TABLE batches ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE adapter_versions ADD COLUMN removed_at REAL")


def _to_4(db: sqlite3.Connection) -> None:
    """This release's ledger (issues 17, 18, 19 and 24). The gate over thousands of batches: a batch's
    healing tries (the root's files, the evaluation memory built from evalsets/batches/, follow at
    the daemon's start). Faults are weather: crashes counted by progress, the high-water step,
    goodput. The memory ladder: the base-weight layout a batch's plan chose (NULL on older rows:
    their worker held the layout of their precision). Weeks on one disk: running totals kept by triggers (trainerd/supervisor/ledger/aggregates.py), filled
    from the rows once here, and the index status pages the newest finished batches by."""
    for stmt in ("ALTER TABLE batches ADD COLUMN heals INTEGER NOT NULL DEFAULT 0",
                 "ALTER TABLE batches ADD COLUMN faults_survived INTEGER NOT NULL DEFAULT 0",
                 "ALTER TABLE batches ADD COLUMN crash_streak INTEGER NOT NULL DEFAULT 0",
                 "ALTER TABLE batches ADD COLUMN reached_step INTEGER",
                 "ALTER TABLE batches ADD COLUMN goodput_json TEXT",
                 "ALTER TABLE batches ADD COLUMN base_weights TEXT",
                 "ALTER TABLE attempts ADD COLUMN account_json TEXT",
                 "CREATE INDEX IF NOT EXISTS attempts_ended ON attempts(ended_at)"):
        db.execute(stmt)
    # Earlier releases counted every crash against the budget: a batch still under way keeps the
    # budget it had (its crashes are taken to be in a row), and nothing it did counts as survived.
    db.execute("UPDATE batches SET crash_streak = crashes, reached_step = last_step WHERE finished_at IS NULL")
    aggregates.install(db)  # after the columns: its triggers and totals read them


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _to_2, 3: _to_3, 4: _to_4}



class LedgerTooNew(RuntimeError):
    """The ledger was written by a newer trainerd, whose schema this one does not know."""


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def upgrade(db: sqlite3.Connection, path: Path, transaction: Callable[[], Any]) -> None:
    """Create the tables of a new ledger, or migrate an older one to :data:`SCHEMA_VERSION`.

    The copy of an older file is taken first, outside any transaction (a backup from inside the
    connection's own write transaction waits for a lock it holds itself); the tables and every
    migration step then change in one write transaction, so a failed step leaves the old version
    whole.
    """
    found = version(db)
    if found > SCHEMA_VERSION:
        raise LedgerTooNew(
            f"{path} was written by a newer trainerd (ledger schema {found}; this one knows up to "
            f"{SCHEMA_VERSION}): run the newer trainerd, or restore a backup")
    fresh = db.execute("SELECT count(*) FROM sqlite_master WHERE name='batches'").fetchone()[0] == 0
    if not fresh and found == SCHEMA_VERSION:
        return
    if not fresh:
        bak = sqlite3.connect(f"{path}.v{found}.bak")
        try:
            db.backup(bak)
        finally:
            bak.close()
    with transaction() as tx:
        if fresh:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    tx.execute(stmt)
            aggregates.install(tx)  # its own DDL (triggers), whatever number its schema step gets
        else:
            # Ledgers from before versioning said 0 or 1 with the version-1 tables.
            for v in range(max(found, 1) + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](tx)
        tx.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
