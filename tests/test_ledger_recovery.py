"""A ledger you can lose: garbage, truncated, a lost -wal, deleted; the daemon starts, says what it
rebuilt, loses no batch and trains none twice; fsck finds a planted disagreement and repairs it.
Real SQLite files and the real supervisor with fake workers."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import subprocess_env
from support.log import ListLog
from test_supervisor import FAKE, drive, drop, make_settings
from trainerd.supervisor.daemon import Supervisor


def run_two(tmp_path, log=None):
    """Batch a published as version 1; batch b queued behind a pause. Returns the closed supervisor."""
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=log or ListLog())
    s.open()
    drop(s, "a.jsonl", ["done"])
    drive(s, lambda: s.ledger.batches() and s.ledger.batch(1).state == "done")
    (s.layout.stop).write_text("")
    drop(s, "b.jsonl", ["done"])
    # Queued, not only claimed: the claim's renames, hash and manifest are finished off the loop.
    drive(s, lambda: len(s.ledger.batches()) == 2 and s.ledger.batch(2).state == "queued")
    s.close()
    return s


def reopen_and_finish(tmp_path):
    """Start again (un-paused): returns (supervisor, log) once batch b is done."""
    log = ListLog()
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=log)
    s.open()
    os.unlink(s.layout.stop)
    drive(s, lambda: s.ledger.batch(2).state == "done")
    return s, log


def calls(s, bid):
    return len((s.layout.batch_dir(bid) / "fake_calls.jsonl").read_text().splitlines())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_damaged_ledger_is_set_aside_and_rebuilt(tmp_path, damage):
    """The ledger replaced by garbage, cut in half, or deleted: the next start moves what is left
    aside, rebuilds (from the backup and the folders), says so, and goes on: batch a stays done as
    version 1 and is not trained again, batch b trains and becomes version 2."""
    s = run_two(tmp_path)
    db = s.layout.db
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    else:
        db.unlink()
        (db.with_name("state.db.backup")).unlink()  # and no backup either: the folders alone
    s2, log = reopen_and_finish(tmp_path)
    try:
        rebuilt = log.find("ledger_rebuilt")
        assert rebuilt and rebuilt[0]["problem"]
        if damage != "deleted":
            assert any(".damaged-" in p for p in rebuilt[0]["moved_aside"])
            assert list(tmp_path.glob("root/state.db.damaged-*"))
        a, b = s2.ledger.batch(1), s2.ledger.batch(2)
        assert (a.state, a.adapter_version, b.state, b.adapter_version) == ("done", 1, "done", 2)
        assert calls(s2, 1) == 1 and calls(s2, 2) == 1  # nothing trained twice
        assert [v.n for v in s2.ledger.adapter_versions()] == [1, 2]
        assert os.readlink(s2.layout.current) == "2"
    finally:
        s2.close()


def test_a_lost_wal_leaves_a_stale_ledger_that_the_folders_correct(tmp_path):
    """The ledger file as it was before batch a's end (its -wal lost): the manifests and the adapter
    folder are newer; the start takes their word, so version 1 is not reused and a not retrained."""
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=ListLog())
    s.open()
    stale = tmp_path / "stale.db"
    s.layout.stop.write_text("")  # hold batch a queued while the snapshot is taken
    drop(s, "a.jsonl", ["done"])
    drive(s, lambda: s.ledger.batches() and s.ledger.batch(1).state == "queued")
    conn = sqlite3.connect(stale)
    s.ledger.db.backup(conn)  # the ledger at this instant, before batch a ran
    conn.close()
    os.unlink(s.layout.stop)
    drive(s, lambda: s.ledger.batch(1).state == "done")
    s.close()
    shutil.copy(stale, s.layout.db)
    for side in ("state.db-wal", "state.db-shm", "state.db.backup"):
        (s.layout.root / side).unlink(missing_ok=True)
    log = ListLog()
    s2 = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=log)
    s2.open()
    try:
        assert log.find("ledger_reconciled_with_folders")
        assert (s2.ledger.batch(1).state, s2.ledger.batch(1).adapter_version) == ("done", 1)
        drop(s2, "b.jsonl", ["done"])
        drive(s2, lambda: len(s2.ledger.batches()) == 2 and s2.ledger.batch(2).state == "done")
        assert s2.ledger.batch(2).adapter_version == 2 and calls(s2, 1) == 1
    finally:
        s2.close()


def fsck(root, *args):
    return subprocess.run([sys.executable, "-m", "trainerd", "fsck", "--root", str(root), *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


def test_fsck_finds_a_planted_disagreement_and_repairs_it(tmp_path):
    """A version row deleted behind the daemon's back: fsck reports it (exit 1), --repair puts it
    back from the adapter's lineage, and fsck agrees again (exit 0)."""
    s = run_two(tmp_path)
    conn = sqlite3.connect(s.layout.db)
    conn.execute("DELETE FROM adapter_versions WHERE n=1")
    conn.commit()
    conn.close()
    r = fsck(s.layout.root)
    assert r.returncode == 1 and "version 1: adapter folder unknown to the ledger" in r.stdout, r.stdout + r.stderr
    r = fsck(s.layout.root, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    r = fsck(s.layout.root)
    assert r.returncode == 0 and "agree" in r.stdout
    conn = sqlite3.connect(s.layout.db)
    assert conn.execute("SELECT n, batch_id, kind FROM adapter_versions").fetchall() == [(1, 1, "blessed")]
    conn.close()
    manifest = json.loads((s.layout.batch_dir(1) / "manifest.json").read_text())
    assert (manifest["state"], manifest["adapter_version"]) == ("done", 1)
