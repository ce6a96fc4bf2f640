"""The ledger's running totals: kept by SQLite itself, so reading them never scans the rows.

``trainerd status``, the metrics and the daemon's start-up need totals over the whole chain (how many
batches are done, how many tokens were trained, how many attempts were restarted and why). Counted
with ``GROUP BY`` those cost a scan of every row at every publish, which grows with the chain. Here
each total is one row of the ``aggregates`` table, changed by triggers in the same transaction as the
row it counts: a reader gets them with one indexed read whatever the ledger's size, and they cannot
drift from the rows (a write that changes a row changes its total, or neither happens).

    batches:<state>          batches in each state (insert, delete, state change)
    versions:<kind>          adapter versions by kind (blessed, forced, rollback)
    versions:removed         versions whose folder retention removed
    decisions:<decision>     batches by the gate's decision (blessed, ungated, refused, ...): an
                             ungated publish is a version of kind blessed, told apart here
    trained_tokens           per batch the furthest any attempt got (results' ``tokens`` are
    training_steps           cumulative over a batch's attempts), summed: a resumed batch counts once
    restarts:<outcome>       attempts that ended before their batch was through: ``crashed``,
    restarts:stopped:<why>   ``lost``, or stopped with the stop reason (metrics bounds the labels)
    faults:crashes           every batch's crashes and the crashes of attempts that had made
    faults:survived          progress (issue 24), summed
    goodput:<figure>_ms      every batch's goodput account (trainerd/supervisor/ledger/goodput.py: useful_s, wall_s,
                             faults, recomputed_s, restart_s, backoff_s, checkpoint_s), summed, in
                             thousandths (the table holds integers)

Token, step and restart totals count what happened: retention deleting old attempt rows does not
lower them (a Prometheus counter never steps back). Batch and version counts follow the rows.

Stdlib only. :func:`install` creates the table, its triggers and two indexes (``finished_at``: status
pages the newest finished batches by it; the open attempts: a start looks them up without reading
every attempt), then fills the totals from the rows once: a new ledger and the schema step that
brings an older one here both call it.
"""

from __future__ import annotations

import sqlite3

__all__ = ["GOODPUT_FIGURES", "install", "read", "recount_rows", "row_counts"]

# One statement per trigger body line; "INSERT .. ON CONFLICT" so a total appears at its first use.
_ADD = ("INSERT INTO aggregates(name, value) VALUES ({name}, {by})"
        " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;")

# The furthest any other attempt of the batch got, by a result field (the primary key's index).
_BEST_OTHER = ("coalesce((SELECT max(coalesce(json_extract(a.result_json, '$.{f}'), 0)) FROM attempts a"
               " WHERE a.batch_id = new.batch_id AND a.n <> new.n AND json_valid(a.result_json)), 0)")
_GAIN = "max(0, coalesce(json_extract(new.result_json, '$.{f}'), 0) - " + _BEST_OTHER + ")"
_RESTART_KEY = ("'restarts:' || new.outcome || CASE WHEN new.outcome = 'stopped'"
                " THEN ':' || coalesce(substr(new.reason, 1, 64), '') ELSE '' END")
_RESULT_GAINS = (_ADD.format(name="'trained_tokens'", by=_GAIN.format(f="tokens")) + "\n"
                 + _ADD.format(name="'training_steps'", by=_GAIN.format(f="step")))

# A batch's goodput account is rewritten whole at each attempt's end: the totals move by new - old.
GOODPUT_FIGURES = ("useful_s", "wall_s", "faults", "recomputed_s", "restart_s", "backoff_s", "checkpoint_s")
_GOODPUT_DELTAS = "\n".join(
    _ADD.format(name=f"'goodput:{k}_ms'", by=f"CAST(round(1000 * (coalesce(json_extract(new.goodput_json, '$.{k}'), 0)"
                f" - coalesce(json_extract(old.goodput_json, '$.{k}'), 0))) AS INTEGER)")
    for k in GOODPUT_FIGURES)

_DDL = f"""
CREATE TABLE IF NOT EXISTS aggregates (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_finished ON batches(finished_at);
CREATE INDEX IF NOT EXISTS attempts_open ON attempts(batch_id, n) WHERE ended_at IS NULL;
CREATE TRIGGER IF NOT EXISTS agg_batch_insert AFTER INSERT ON batches BEGIN
    {_ADD.format(name="'batches:' || new.state", by=1)}
END;
CREATE TRIGGER IF NOT EXISTS agg_batch_delete AFTER DELETE ON batches BEGIN
    {_ADD.format(name="'batches:' || old.state", by=-1)}
END;
CREATE TRIGGER IF NOT EXISTS agg_batch_state AFTER UPDATE OF state ON batches
WHEN old.state IS NOT new.state BEGIN
    {_ADD.format(name="'batches:' || old.state", by=-1)}
    {_ADD.format(name="'batches:' || new.state", by=1)}
END;
CREATE TRIGGER IF NOT EXISTS agg_decision_insert AFTER INSERT ON batches WHEN new.decision IS NOT NULL BEGIN
    {_ADD.format(name="'decisions:' || new.decision", by=1)}
END;
CREATE TRIGGER IF NOT EXISTS agg_decision_delete AFTER DELETE ON batches WHEN old.decision IS NOT NULL BEGIN
    {_ADD.format(name="'decisions:' || old.decision", by=-1)}
END;
CREATE TRIGGER IF NOT EXISTS agg_decision_update AFTER UPDATE OF decision ON batches
WHEN old.decision IS NOT new.decision BEGIN
    INSERT INTO aggregates(name, value) SELECT 'decisions:' || old.decision, -1 WHERE old.decision IS NOT NULL
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;
    INSERT INTO aggregates(name, value) SELECT 'decisions:' || new.decision, 1 WHERE new.decision IS NOT NULL
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;
END;
CREATE TRIGGER IF NOT EXISTS agg_version_insert AFTER INSERT ON adapter_versions BEGIN
    {_ADD.format(name="'versions:' || new.kind", by=1)}
    {_ADD.format(name="'versions:removed'", by="new.removed_at IS NOT NULL")}
END;
CREATE TRIGGER IF NOT EXISTS agg_version_delete AFTER DELETE ON adapter_versions BEGIN
    {_ADD.format(name="'versions:' || old.kind", by=-1)}
    {_ADD.format(name="'versions:removed'", by="-(old.removed_at IS NOT NULL)")}
END;
CREATE TRIGGER IF NOT EXISTS agg_version_update AFTER UPDATE OF kind, removed_at ON adapter_versions BEGIN
    {_ADD.format(name="'versions:' || old.kind", by=-1)}
    {_ADD.format(name="'versions:' || new.kind", by=1)}
    {_ADD.format(name="'versions:removed'", by="(new.removed_at IS NOT NULL) - (old.removed_at IS NOT NULL)")}
END;
CREATE TRIGGER IF NOT EXISTS agg_attempt_result AFTER UPDATE OF result_json ON attempts
WHEN old.result_json IS NULL AND json_valid(new.result_json) BEGIN
    {_RESULT_GAINS}
END;
CREATE TRIGGER IF NOT EXISTS agg_attempt_result_insert AFTER INSERT ON attempts
WHEN json_valid(new.result_json) BEGIN
    {_RESULT_GAINS}
END;
CREATE TRIGGER IF NOT EXISTS agg_batch_faults AFTER UPDATE OF crashes, faults_survived ON batches BEGIN
    {_ADD.format(name="'faults:crashes'", by="new.crashes - old.crashes")}
    {_ADD.format(name="'faults:survived'", by="new.faults_survived - old.faults_survived")}
END;
CREATE TRIGGER IF NOT EXISTS agg_batch_goodput AFTER UPDATE OF goodput_json ON batches
WHEN json_valid(coalesce(new.goodput_json, '{{}}')) AND json_valid(coalesce(old.goodput_json, '{{}}')) BEGIN
    {_GOODPUT_DELTAS}
END;
CREATE TRIGGER IF NOT EXISTS agg_attempt_restart AFTER UPDATE OF outcome ON attempts
WHEN old.outcome IS NULL AND new.outcome IN ('stopped', 'crashed', 'lost') BEGIN
    {_ADD.format(name=_RESTART_KEY, by=1)}
END;
"""

_ROW_COUNTS = ("SELECT 'batches:' || state, count(*) FROM batches GROUP BY state"
               " UNION ALL SELECT 'decisions:' || decision, count(*) FROM batches WHERE decision IS NOT NULL"
               " GROUP BY decision"
               " UNION ALL SELECT 'versions:' || kind, count(*) FROM adapter_versions GROUP BY kind"
               " UNION ALL SELECT 'versions:removed', count(*) FROM adapter_versions WHERE removed_at IS NOT NULL")


def install(db: sqlite3.Connection) -> None:
    """Create the totals and their triggers (idempotent) and fill them from the rows, once: a scan
    of the ledger at the schema step, never again."""
    for stmt in _split(_DDL):
        db.execute(stmt)
    db.execute("DELETE FROM aggregates")
    db.execute(f"INSERT INTO aggregates(name, value) {_ROW_COUNTS}")
    for name, field in (("trained_tokens", "tokens"), ("training_steps", "step")):
        db.execute(
            "INSERT INTO aggregates(name, value) SELECT ?, coalesce(sum(best), 0) FROM ("
            f" SELECT max(coalesce(json_extract(result_json, '$.{field}'), 0)) AS best FROM attempts"
            " WHERE json_valid(result_json) GROUP BY batch_id)", (name,))
    db.execute(
        "INSERT INTO aggregates(name, value) SELECT 'restarts:' || outcome || CASE WHEN outcome = 'stopped'"
        " THEN ':' || coalesce(substr(reason, 1, 64), '') ELSE '' END AS k, count(*) FROM attempts"
        " WHERE outcome IN ('stopped', 'crashed', 'lost') GROUP BY k")
    db.execute("INSERT INTO aggregates(name, value) SELECT 'faults:crashes', coalesce(sum(crashes), 0) FROM batches"
               " UNION ALL SELECT 'faults:survived', coalesce(sum(faults_survived), 0) FROM batches")
    for k in GOODPUT_FIGURES:
        db.execute("INSERT INTO aggregates(name, value) SELECT ?, CAST(round(1000 * coalesce(sum("
                   f"json_extract(goodput_json, '$.{k}')), 0)) AS INTEGER) FROM batches"
                   " WHERE json_valid(goodput_json)", (f"goodput:{k}_ms",))


def _split(ddl: str) -> list[str]:
    """The DDL's statements (a trigger's body holds ';' of its own: SQLite says where one ends)."""
    out, cur = [], ""
    for line in ddl.strip().splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur)
            cur = ""
    return out


def read(db: sqlite3.Connection, prefix: str = "") -> dict[str, int]:
    """The totals whose name starts with ``prefix`` (the prefix cut off), zeros left out."""
    rows = db.execute("SELECT name, value FROM aggregates WHERE name >= ? AND name < ?",
                      (prefix, prefix + "\U0010ffff"))
    return {name[len(prefix):]: int(value) for name, value in rows if value}


def row_counts(db: sqlite3.Connection) -> dict[str, int]:
    """The batch and version counts recounted from the rows (a full scan: ``trainerd fsck`` only)."""
    return {name: int(n) for name, n in db.execute(_ROW_COUNTS) if n}


def recount_rows(db: sqlite3.Connection) -> None:
    """Set the batch and version counts from the rows again (``trainerd fsck --repair``); the
    token, step and restart totals are history and stay as they are."""
    db.execute("DELETE FROM aggregates WHERE name LIKE 'batches:%' OR name LIKE 'versions:%'"
               " OR name LIKE 'decisions:%'")
    db.execute(f"INSERT INTO aggregates(name, value) {_ROW_COUNTS}")
