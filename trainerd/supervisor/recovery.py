"""A ledger you can lose: copies of it in the folders and beside it, a check at every start, and a
rebuild when it is damaged, stale or gone.

- Every batch folder carries ``manifest.json``: its ledger row, rewritten after every committed
  change of it (``Ledger.on_change``). Every published version carries ``lineage.json``.
- ``state.db.backup`` is a consistent copy (SQLite's online backup API) taken after every
  terminal transition and at least every ``supervisor.ledger_backup_s``.
- At start-up the ledger must open and pass ``PRAGMA quick_check``. One that does not (garbage,
  truncated), or is gone while the folders say batches existed, is moved aside (never deleted:
  ``state.db.damaged-<time>``) and rebuilt from the newest good backup, then from the folders.
- Then, always, the ledger is reconciled against the folders before anything is served: a
  manifest newer than its row (a commit lost with a ``-wal``) wins, a batch folder the ledger
  does not know is added, a published adapter folder the ledger does not know is added (so a
  version number is never reused and a publish never skipped because its folder exists).
- ``trainerd fsck`` reports the disagreements; ``--repair`` fixes them (no daemon running).

A ledger that cannot be rebuilt (the folders cannot be read) ends the start with exit 78 and a
message that says what to do: never a traceback, never a start on a ledger it cannot trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from trainerd.contract import RootLayout
from trainerd.fsutil import atomic_write_json, read_json_or_none
from trainerd.ledger import Ledger, LedgerTooNew
from trainerd.rows import AdapterVersion, Batch
from trainerd.states import FINAL_STATES

__all__ = ["Backups", "LedgerUnrecoverable", "backup", "compare", "open_ledger", "repair", "write_manifest"]

MANIFEST = "manifest.json"


class LedgerUnrecoverable(RuntimeError):
    """Neither the ledger, nor a backup, nor the folders can say what happened."""


def write_manifest(layout: RootLayout, batch: Batch) -> None:
    """The batch's row in its folder (after the commit: a manifest is never ahead of a commit
    that could still roll back)."""
    d = layout.batch_dir(batch.id)
    if d.is_dir():
        row = {**dataclasses.asdict(batch), "state": batch.state.value}
        atomic_write_json(d / MANIFEST, {"manifest": 1, **row})


def backup(ledger: Ledger, layout: RootLayout) -> None:
    """A consistent copy of the ledger as ``state.db.backup`` (tmp + rename: never half a copy)."""
    dest = layout.db.with_name(layout.db.name + ".backup")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    conn = sqlite3.connect(tmp)
    try:
        ledger.db.backup(conn)
    finally:
        conn.close()
    os.replace(tmp, dest)


class Backups:
    """The daemon's side: each batch's manifest after every change of it, a backup after its end
    and at least every ``supervisor.ledger_backup_s``."""

    def __init__(self, ledger: Ledger, layout: RootLayout, log: Any):
        self.ledger, self.layout, self.log = ledger, layout, log
        self.at = 0.0

    def changed(self, batch: Batch) -> None:
        write_manifest(self.layout, batch)
        if batch.state in FINAL_STATES:
            self.take(time.time())

    def take(self, now: float) -> None:
        try:
            backup(self.ledger, self.layout)
        except (OSError, sqlite3.Error) as e:
            self.log.error("ledger_backup_failed", error=str(e))
        self.at = now

    def due(self, now: float, every_s: float) -> None:
        if every_s and now - self.at >= every_s:
            self.take(now)


def _check(path: Path) -> str:
    """'ok', or what is wrong with the SQLite file at ``path``."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
            conn.execute("SELECT count(*) FROM batches").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    msg = "; ".join(str(r[0]) for r in rows)
    return "ok" if msg == "ok" else msg


def _folders_say_batches(layout: RootLayout) -> bool:
    return any(layout.batches.glob("*/" + MANIFEST)) or any(p.name.isdigit() for p in layout.adapters.glob("*"))


def open_ledger(layout: RootLayout, log: Any) -> Ledger:
    """The ledger, checked; moved aside and rebuilt where it cannot be trusted; then reconciled
    with the folders. Raises LedgerTooNew, LedgerUnrecoverable."""
    db = layout.db
    problem = None
    if db.exists():
        problem = _check(db)
        problem = None if problem == "ok" else problem
    elif _folders_say_batches(layout):
        problem = "the ledger is missing but the root's folders hold batches"
    rebuilt: dict[str, Any] = {}
    if problem is not None:
        rebuilt = _set_aside_and_restore(layout, problem, log)
    try:
        ledger = Ledger(db, on_change=lambda b: write_manifest(layout, b))
    except LedgerTooNew:
        raise
    except sqlite3.Error as e:
        raise LedgerUnrecoverable(f"{db}: {e}: cannot open even a new ledger there") from e
    try:
        changes = repair(layout, ledger, compare(layout, ledger))
    except OSError as e:
        ledger.close()
        raise LedgerUnrecoverable(f"the root's folders cannot be read to check the ledger: {e}") from e
    if rebuilt:
        log.error("ledger_rebuilt", **rebuilt, changes=len(changes), first_changes=changes[:20],
                  hint="the damaged file was kept; `trainerd status` and `trainerd history` show what was rebuilt")
    elif changes:
        log.warning("ledger_reconciled_with_folders", changes=len(changes), first_changes=changes[:20],
                    hint="the ledger was behind its folders (a lost -wal?); the folders' word was taken")
    return ledger


def _set_aside_and_restore(layout: RootLayout, problem: str, log: Any) -> dict[str, Any]:
    db = layout.db
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = []
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db) + suffix)
        if p.exists():
            dest = p.with_name(f"{db.name}.damaged-{stamp}{suffix}")
            os.rename(p, dest)
            aside.append(str(dest))
    bak = db.with_name(db.name + ".backup")
    from_backup = None
    if bak.exists() and _check(bak) == "ok":
        tmp = db.with_name(f".{db.name}.restore")
        with open(bak, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(fin.read())
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, db)
        from_backup = str(bak)
    log.error("ledger_damaged", problem=problem, moved_aside=aside, restoring_from=from_backup or "the folders alone")
    return {"problem": problem, "moved_aside": aside, "from_backup": from_backup}


# --- the folders against the ledger ------------------------------------------------------------


def compare(layout: RootLayout, ledger: Ledger) -> list[dict[str, Any]]:
    """Where the ledger and the folders disagree, one dict per finding (``fix`` says what repair does)."""
    out: list[dict[str, Any]] = []
    rows = {b.id: b for b in ledger.batches()}
    for d in sorted(layout.batches.glob("[0-9]*")):
        m = read_json_or_none(d / MANIFEST)
        if not d.name.isdigit():
            continue
        bid = int(d.name)
        row = rows.get(bid)
        if m is None:
            if row is not None:
                out.append({"batch": bid, "finding": "no manifest in its folder", "fix": "write_manifest"})
            continue
        if row is None:
            out.append({"batch": bid, "finding": f"folder with a {m['state']} manifest, unknown to the ledger",
                        "fix": "adopt_manifest", "manifest": m})
        elif m["updated_at"] > row.updated_at and (m["state"] != row.state.value or
                                                    m.get("adapter_version") != row.adapter_version):
            out.append({"batch": bid, "finding": f"ledger says {row.state.value}, the newer manifest {m['state']}",
                        "fix": "adopt_manifest", "manifest": m})
    for bid, row in rows.items():
        if not layout.batch_dir(bid).is_dir() and row.state not in FINAL_STATES:
            out.append({"batch": bid, "finding": f"ledger says {row.state.value} but the folder is gone",
                        "fix": None})
    known = {v.n for v in ledger.adapter_versions()}
    for p in sorted(layout.adapters.glob("[0-9]*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        if p.name.isdigit() and int(p.name) not in known and p.is_dir():
            out.append({"version": int(p.name), "finding": "adapter folder unknown to the ledger",
                        "fix": "adopt_version"})
    for v in ledger.adapter_versions():
        if not layout.adapter_dir(v.n).is_dir() and v.removed_at is None:  # retention's removals are no finding
            out.append({"version": v.n, "finding": "version in the ledger without its folder", "fix": None})
    return out


def repair(layout: RootLayout, ledger: Ledger, findings: list[dict[str, Any]]) -> list[str]:
    """Apply the fixes of ``findings``; returns what was done, one line each."""
    done = []
    for f in findings:
        fix = f.get("fix")
        if fix == "adopt_manifest":
            m = {k: v for k, v in f["manifest"].items() if k != "manifest"}
            ledger.restore_batch(m)
            done.append(f"batch {f['batch']}: {f['finding']} -> {m['state']}")
        elif fix == "write_manifest":
            write_manifest(layout, ledger.batch(f["batch"]))
        elif fix == "adopt_version":
            n = f["version"]
            lin = read_json_or_none(layout.adapter_dir(n) / "lineage.json") or {}
            old = read_json_or_none(layout.adapter_dir(n) / "trainerd.json") or {}
            batch = lin.get("batch") or (int(old["batch"]) if str(old.get("batch", "")).isdigit() else 0)
            ledger.restore_version(AdapterVersion(n=n, batch_id=batch, path=str(layout.adapter_dir(n)),
                                                  created_at=lin.get("created_at") or layout.adapter_dir(n).stat().st_mtime,
                                                  parent=lin.get("parent", n - 1 if n > 1 else None),
                                                  kind=lin.get("kind") or "blessed", source=lin.get("rollback_of")))
            done.append(f"version {n}: {f['finding']} -> added")
    return done


def describe(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "the ledger and the folders agree"
    return "\n".join(f"  {'batch ' + str(f['batch']) if 'batch' in f else 'version ' + str(f['version'])}: "
                     f"{f['finding']}" + (f" (repair: {f['fix']})" if f.get("fix") else " (repair cannot fix this)")
                     for f in findings)


def dumps(findings: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in f.items() if k != "manifest"} for f in findings], indent=2)
