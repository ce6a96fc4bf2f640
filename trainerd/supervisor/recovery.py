"""A ledger you can lose: copies of it in the folders and beside it, a check at every start, and a
rebuild when it is damaged, stale or gone.

- Every batch folder carries ``manifest.json``: its ledger row, rewritten after every committed
  change of it (``Ledger.on_change``). Every published version carries ``lineage.json``.
- ``state.db.backup`` is a consistent copy (SQLite's online backup API) taken every
  ``supervisor.ledger_backup_s`` while anything changed, and at a clean stop: a copy costs the
  ledger's size, so it is periodic, not per batch. Between two copies the log is the ledger's own
  WAL (every commit fsynced) and the manifests in the batch folders, which a rebuild replays.
- At start-up the ledger must open and pass a check: ``PRAGMA quick_check`` (every page) after an
  unclean stop (a ``-wal`` left behind), else its header, schema and newest rows (a clean stop
  leaves the file whole; fsck checks every page). One that fails (garbage, truncated), or is gone
  while the folders say batches existed, is moved aside (never deleted:
  ``state.db.damaged-<time>``) and rebuilt from the newest good backup, then from the folders
  (all of them: a backup can be minutes old).
- Then, always, the live part of the ledger is reconciled against the folders before anything is
  served: the unfinished batches, the newest ones, batch and adapter folders newer than anything
  the ledger knows, and the newest versions (:data:`LIVE_BATCHES`, :data:`LIVE_VERSIONS`). A
  manifest newer than its row (a commit lost with a ``-wal``) wins, a batch folder the ledger
  does not know is added, a published adapter folder the ledger does not know is added (so a
  version number is never reused and a publish never skipped because its folder exists). What a
  lost ``-wal`` can leave stale is only ever the newest commits, so this costs the same at any
  chain length; an old finished batch is never re-read at a start.
- ``trainerd fsck`` compares every batch and version (and the running totals); ``--repair`` fixes
  what it can (no daemon running).

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

from trainerd.supervisor.ledger import aggregates
from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json, read_json_or_none
from trainerd.supervisor.ledger import Ledger, LedgerTooNew
from trainerd.supervisor.ledger.rows import AdapterVersion, Batch
from trainerd.supervisor.ledger.states import FINAL_STATES

__all__ = ["Backups", "LedgerUnrecoverable", "backup", "compare", "open_ledger", "repair", "write_manifest"]

MANIFEST = "manifest.json"
# A start compares these newest batches and versions besides the unfinished ones (fsck: all).
LIVE_BATCHES = 32
LIVE_VERSIONS = 8
PROBE_GAP = 16  # missing numbers in a row that end a start's look for folders beyond the ledger


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
    """The daemon's side: each batch's manifest after every change of it, a backup every
    ``supervisor.ledger_backup_s`` while the ledger changed (0: after every batch's end too), and
    one at a clean stop."""

    def __init__(self, ledger: Ledger, layout: RootLayout, log: Any, *, every_batch: bool = False):
        self.ledger, self.layout, self.log = ledger, layout, log
        self.every_batch = every_batch
        try:  # the next copy is due a period after the last one, not at every start
            self.at = os.stat(layout.db.with_name(layout.db.name + ".backup")).st_mtime
        except OSError:
            self.at = 0.0
        self._taken_at_change: int | None = None  # the ledger's change count the last copy has

    def changed(self, batch: Batch) -> None:
        write_manifest(self.layout, batch)
        if self.every_batch and batch.state in FINAL_STATES:
            self.take(time.time())

    def take(self, now: float) -> None:
        try:
            backup(self.ledger, self.layout)
            self._taken_at_change = self.ledger.db.total_changes
        except (OSError, sqlite3.Error) as e:
            self.log.error("ledger_backup_failed", error=str(e))
        self.at = now

    def due(self, now: float, every_s: float) -> None:
        self.every_batch = not every_s
        if every_s and now - self.at >= every_s:
            if self.ledger.db.total_changes == self._taken_at_change:
                self.at = now  # nothing new since the last copy
                return
            self.take(now)

    def final(self) -> None:
        """At a clean stop: a copy, unless nothing changed since the last."""
        if self.ledger.db.total_changes != self._taken_at_change:
            self.take(time.time())


def _header_problem(path: Path) -> str | None:
    """What the file's 100-byte SQLite header says is wrong: not SQLite, or shorter than the pages
    it declares (a truncation). None when it looks whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        return str(e)
    if not head:
        return None  # an empty file: SQLite makes a new database of it
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return "file is not a database"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the in-header size is trusted only then (SQLite's rule)
    if valid and pages and size < pages * page:
        return f"database disk image is malformed (truncated: {size} of {pages * page} bytes)"
    return None


def _check(path: Path, *, full: bool = True) -> str:
    """'ok', or what is wrong with the SQLite file at ``path``. ``full``: ``PRAGMA quick_check``, which
    reads every page (O(ledger size): fsck, and a start after an unclean stop); otherwise the header,
    the schema and each table's newest rows."""
    problem = _header_problem(path)
    if problem is not None:
        return problem
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall() if full else [("ok",)]
            for table, key in (("batches", "id"), ("attempts", "batch_id"), ("adapter_versions", "n")):
                conn.execute(f"SELECT * FROM {table} ORDER BY {key} DESC LIMIT 8").fetchall()
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
        # A -wal left behind means the last life did not close the ledger (a crash, a power cut):
        # then every page is checked. After a clean stop the cheap check (header, schema, the newest
        # rows) keeps a start the same at any ledger size; `trainerd fsck` always checks every page.
        problem = _check(db, full=Path(str(db) + "-wal").exists())
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
        # A rebuilt ledger may be a backup minutes old: compare everything. A ledger that opened
        # fine can only have lost its newest commits: compare the live part.
        changes = repair(layout, ledger, compare(layout, ledger, full=bool(rebuilt)))
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


def _numbered(folder: Path) -> list[int]:
    """The numbered entries of a folder, by name only (no stat, no read; fsck)."""
    try:
        with os.scandir(folder) as it:
            return sorted(int(e.name) for e in it if e.name.isdigit())
    except FileNotFoundError:
        return []


def _beyond(path_of: Any, top: int, gap: int = PROBE_GAP) -> list[int]:
    """The numbers above ``top`` whose folder exists, probed upwards until ``gap`` in a row are
    missing (what a lost -wal leaves is the newest few, next to each other): a start never lists
    a folder of the chain's length."""
    found, n, misses = [], top, 0
    while misses < gap:
        n += 1
        if path_of(n).is_dir():
            found.append(n)
            misses = 0
        else:
            misses += 1
    return found


def compare(layout: RootLayout, ledger: Ledger, *, full: bool = True) -> list[dict[str, Any]]:
    """Where the ledger and the folders disagree, one dict per finding (``fix`` says what repair does).

    ``full`` (fsck, a rebuilt ledger): every batch, every version and the running totals. Otherwise
    (every start) the live part: unfinished batches, the :data:`LIVE_BATCHES` newest, and batch and
    adapter folders newer than the ledger's newest row (what a lost ``-wal`` leaves); the
    :data:`LIVE_VERSIONS` newest versions, and any a newer adapter folder names."""
    if full:
        rows = {b.id: b for b in ledger.batches()}
        versions = ledger.versions()
        folders = _numbered(layout.batches)
    else:
        rows = {b.id: b for b in (*ledger.unfinished(), *ledger.batches(limit=LIVE_BATCHES, newest_first=True))}
        versions = ledger.versions(limit=LIVE_VERSIONS, newest_first=True)[::-1]
        top = max((b.id for b in ledger.batches(limit=1, newest_first=True)), default=0)
        folders = sorted({*(i for i in rows if layout.batch_dir(i).is_dir()), *_beyond(layout.batch_dir, top)})
    latest = ledger.latest_version()
    if full:
        known_versions = {v.n for v in versions}
        newer_versions = [n for n in _numbered(layout.adapters) if n not in known_versions]
    else:
        newer_versions = _beyond(layout.adapter_dir, latest.n if latest else 0)
    if not full:
        # A version the ledger lost names its batch, whose row may be just as stale (a promote).
        for n in newer_versions:
            bid = (read_json_or_none(layout.adapter_dir(n) / "lineage.json") or {}).get("batch")
            if isinstance(bid, int) and bid not in rows and (b := _row(ledger, bid)) is not None:
                rows[bid] = b
                if layout.batch_dir(bid).is_dir():  # (retention may have removed it)
                    folders = sorted({*folders, bid})
    out = _compare_batches(layout, rows, folders)
    for n in newer_versions:
        if layout.adapter_dir(n).is_dir():
            out.append({"version": n, "finding": "adapter folder unknown to the ledger", "fix": "adopt_version"})
    for v in versions:
        if not layout.adapter_dir(v.n).is_dir() and v.removed_at is None:  # retention's removals are no finding
            out.append({"version": v.n, "finding": "version in the ledger without its folder", "fix": None})
    if full:
        counted, scanned = ledger.totals(), aggregates.row_counts(ledger.db)
        wrong = {k: (counted.get(k, 0), n) for k, n in scanned.items() if counted.get(k, 0) != n}
        wrong.update({k: (n, 0) for k, n in counted.items()
                      if k.startswith(("batches:", "versions:", "decisions:")) and k not in scanned})
        if wrong:
            out.append({"totals": wrong, "finding": "running totals differ from the rows: "
                        + ", ".join(f"{k} {a} (rows say {b})" for k, (a, b) in sorted(wrong.items())),
                        "fix": "recount"})
    return out


def _row(ledger: Ledger, bid: int) -> Batch | None:
    try:
        return ledger.batch(bid)
    except KeyError:
        return None


def _compare_batches(layout: RootLayout, rows: dict[int, Batch], folders: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    on_disk = set(folders)
    for bid in folders:
        m = read_json_or_none(layout.batch_dir(bid) / MANIFEST)
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
        if bid not in on_disk and row.state not in FINAL_STATES:
            out.append({"batch": bid, "finding": f"ledger says {row.state.value} but the folder is gone",
                        "fix": None})
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
        elif fix == "recount":
            with ledger.transaction() as db:
                aggregates.recount_rows(db)
            done.append(f"running totals: {f['finding']} -> recounted")
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
    return "\n".join(f"  {_subject(f)}: {f['finding']}"
                     + (f" (repair: {f['fix']})" if f.get("fix") else " (repair cannot fix this)") for f in findings)


def _subject(f: dict[str, Any]) -> str:
    return f"batch {f['batch']}" if "batch" in f else f"version {f['version']}" if "version" in f else "ledger"


def dumps(findings: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in f.items() if k != "manifest"} for f in findings], indent=2)
