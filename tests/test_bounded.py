"""Weeks on one disk (issue 18): what a finished batch leaves behind is bounded, the daemon's start
checks the live part of the ledger and `trainerd fsck` the whole of it. Real supervisors with fake
workers (tests/bin/fake_worker.py), real SQLite and real folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from conftest import subprocess_env
from support.log import ListLog
from test_supervisor import FAKE, drive, drop, make_settings
from trainerd.supervisor.daemon import Supervisor


def _checkpoints(s: Supervisor, bid: int) -> list[str]:
    ck = s.layout.batch(bid).checkpoints
    return sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []


def test_a_finished_batch_drops_its_checkpoints_a_resumed_one_keeps_them_until_done(tmp_path):
    """Batch 1 is done: its adapter is adapters/1, its checkpoints are gone. Batch 2 is paused mid-way:
    while it waits its checkpoint stays (the resume needs it); once done it goes too. With
    train.keep_finished_checkpoints batch 3 keeps its own."""
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=ListLog())
    s.open()
    try:
        drop(s, "a.jsonl", ["done"])
        drive(s, lambda: s.ledger.counts().get("done") == 1)
        assert (s.layout.adapter_dir(1) / "adapter_config.json").is_file()
        assert s.layout.batch_dir(1).is_dir() and _checkpoints(s, 1) == []
        drop(s, "b.jsonl", ["wait", "done"])
        drive(s, lambda: s.running is not None and s.running.batch.id == 2)
        s.layout.stop.touch()  # pause: the worker checkpoints and exits 75
        drive(s, lambda: s.running is None and s.ledger.batch(2).state == "queued")
        assert s.ledger.batch(2).last_reason == "paused" and _checkpoints(s, 2) == ["step-00000001"]
        s.tick(time.time())
        assert s.running is None and _checkpoints(s, 2) == ["step-00000001"]  # still waiting, still kept
        s.layout.stop.unlink()
        drive(s, lambda: s.ledger.counts().get("done") == 2)
        assert _checkpoints(s, 2) == [] and s.layout.adapter_dir(2).is_dir()
        s.settings.train.keep_finished_checkpoints = True  # as a reload would
        drop(s, "c.jsonl", ["done"])
        drive(s, lambda: s.ledger.counts().get("done") == 3)
        assert _checkpoints(s, 3) == ["step-00000001"]
    finally:
        s.close()


def _fsck(root, *args):
    return subprocess.run([sys.executable, "-m", "trainerd", "fsck", "--root", str(root), *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


def test_a_start_checks_the_live_part_and_fsck_finds_a_damaged_old_batch(shm_tmp, monkeypatch):
    """Eight batches done; then batch 2's manifest is garbage and version 3's folder is gone. With
    a live window of the newest 4 batches and 2 versions, the next start neither reads nor rewrites
    batch 2, reports nothing and trains a ninth batch; `trainerd fsck` finds both (exit 1),
    `--repair` writes the manifest again, the missing version stays reported."""
    from trainerd.supervisor import reconcile, recovery

    s = Supervisor(make_settings(shm_tmp), worker_cmd=[sys.executable, str(FAKE)], log=ListLog())
    s.open()
    try:
        for i in range(1, 9):
            drop(s, f"b{i}.jsonl", ["done"])
            drive(s, lambda i=i: s.ledger.counts().get("done") == i)
    finally:
        s.close()
    manifest = s.layout.batch_dir(2) / "manifest.json"
    manifest.write_bytes(b"\x00garbage")
    shutil.rmtree(s.layout.adapter_dir(3))
    monkeypatch.setattr(recovery, "LIVE_BATCHES", 4)
    monkeypatch.setattr(recovery, "LIVE_VERSIONS", 2)
    monkeypatch.setattr(reconcile, "LIVE_FINAL", 4)
    log = ListLog()
    s2 = Supervisor(make_settings(shm_tmp), worker_cmd=[sys.executable, str(FAKE)], log=log)
    s2.open()
    try:
        assert not log.find("ledger_reconciled_with_folders") and not log.find("adapter_missing")
        assert manifest.read_bytes() == b"\x00garbage"  # never read, never rewritten at the start
        drop(s2, "b9.jsonl", ["done"])
        drive(s2, lambda: s2.ledger.counts().get("done") == 9)
        assert os.readlink(s2.layout.current) == "9"
    finally:
        s2.close()
    r = _fsck(s.layout.root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "batch 2: no manifest in its folder" in r.stdout and "version 3: version in the ledger without its folder" \
        in r.stdout, r.stdout
    r = _fsck(s.layout.root, "--repair")
    assert json.loads(manifest.read_text())["state"] == "done", r.stdout + r.stderr
    assert "version 3" in _fsck(s.layout.root).stdout


def _usage(s: Supervisor) -> dict:
    return _usage_of(s.layout)


def _usage_of(layout) -> dict:
    return json.loads(layout.disk_usage.read_text())


def test_the_disk_book_follows_publishes_and_retention_without_walking(shm_tmp):
    """A new root is walked once (the child), then the book is kept by entries: after each publish
    disk-usage.json is rewritten at once and agrees with a full walk of the root; retention
    (keep_batch_dirs 2, keep_curves 1, keep_attempt_rows 1) removes folders, runs and attempt rows
    a bounded step at a time, the book follows, the token total stays; the file keeps a fixed shape."""
    from trainerd.supervisor.diskuse import measure
    from trainerd.supervisor.retention import plan

    s = Supervisor(make_settings(shm_tmp, retention={"keep_batch_dirs": 2, "keep_curves": 1, "keep_attempt_rows": 1}),
                   worker_cmd=[sys.executable, str(FAKE)], log=ListLog())
    s.open()
    try:
        drive(s, lambda: s.book.known and s.retention.child is None)  # the first walk
        assert s.book.full_at > 0
        shapes = set()
        for i in range(1, 6):
            published_at = time.time()
            drop(s, f"b{i}.jsonl", ["stop:memory", "done"])
            # Done, and retention has nothing left to do (it starts on the tick after the worker ends,
            # so "no child" alone can hold before it began). Each worker is let exit before the next
            # tick: a worker that starts and ends between two ticks is the case that once waited an
            # hour for its retention (the daemon now tells retention as it reaps).
            try:
                drive(s, lambda i=i: s.ledger.counts().get("done") == i and s.retention.child is None
                      and not plan(s.layout, s.ledger, s.settings.retention, time.time()), settle=True)
            except AssertionError:
                r = s.retention
                raise AssertionError(
                    f"batch {i}: counts {s.ledger.counts()}, child {r.child}, next apply in "
                    f"{r._next_apply - time.time():.1f} s, running {s.running}, "
                    f"plan {[(x.kind, x.path) for x in plan(s.layout, s.ledger, s.settings.retention, time.time())]}")
            usage, walk = _usage(s), measure(s.layout)
            assert usage["measured_at"] >= published_at
            for kind, n in walk.items():
                assert abs(usage["kinds"][kind] - n) <= 64 << 10, (i, kind, usage["kinds"][kind], n)
            shapes.add(tuple(sorted(usage)))
        assert len(shapes) == 1 and "cache" not in shapes.pop()
        assert sorted(p.name for p in s.layout.batches.iterdir()) == ["000004", "000005"]
        assert sorted(p.name for p in s.layout.tensorboard.iterdir()) == ["000005"]
        assert [r[0] for r in s.ledger.db.execute("SELECT DISTINCT batch_id FROM attempts")] == [5]
        assert s.ledger.totals("restarts:") == {"stopped:memory": 5} and s.ledger.totals("training_steps") == {"": 15}
        assert s.ledger.counter("retention:batch_dirs_through") == 3
    finally:
        s.retention.close()
        s.close()


def _big_root(root, n: int) -> None:
    """A ledger of ``n`` done batches with ``n`` versions (every 7th ungated), every 10th batch rejected instead, and 30
    queued in three lanes (rows straight in: the figures, not the training, are under test)."""
    from trainerd.core.contract import RootLayout
    from trainerd.supervisor.ledger import Ledger

    layout = RootLayout(root)
    layout.make()
    led = Ledger(layout.db)
    now = time.time() - n
    gate = json.dumps({"sets": [{"name": "new", "kind": "new", "champion": 2.0, "candidate": 1.9, "change": -0.1,
                                 "allowed": 0.02}]})
    with led.transaction() as db:
        for i in range(1, n + 1):
            rejected = i % 10 == 0
            db.execute("INSERT INTO batches(id, name, sha256, state, attempts, adapter_version, decision, gate_json,"
                       " created_at, updated_at, finished_at) VALUES (?,?,?,?,1,?,?,?,?,?,?)",
                       (i, f"f{i:05d}.jsonl", f"{i:064x}", "rejected" if rejected else "done",
                        None if rejected else i - i // 10,
                        "rejected" if rejected else "ungated" if i % 7 == 0 else "blessed", gate,
                        now + i, now + i, now + i))
            if not rejected:
                db.execute("INSERT INTO adapter_versions(n, batch_id, path, created_at) VALUES (?,?,?,?)",
                           (i - i // 10, i, str(layout.adapter_dir(i - i // 10)), now + i))
        for j in range(30):
            db.execute("INSERT INTO batches(name, sha256, state, priority, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                       (f"q{j}.jsonl", f"q{j}", "queued", j % 3 - 1, now + n, now + n))
    led.close()


def test_status_and_history_page_by_default_and_stream_everything_on_request(tmp_path, capsys):
    """On a ledger of 3,000 batches: `status --json` lists the newest 10 batches, the first 10 queued
    in start order and totals from the running totals; `--limit 3` three; `--all` every batch and
    every queued one, as one valid JSON document. `history` shows the newest 10 entries (versions
    and rejected candidates, oldest first) with the chain's totals; `--all --json` all 3,000."""
    from trainerd.cli import main

    def _cli(root, *args):
        assert main([*args, "--root", str(root)]) == 0
        return subprocess.CompletedProcess(args, 0, capsys.readouterr().out, "")

    _big_root(tmp_path, 3000)
    st = json.loads(_cli(tmp_path, "status", "--json").stdout)
    assert [b["id"] for b in st["batches"]] == list(range(3021, 3031))
    assert [q["lane"] for q in st["queue"]] == ["high"] * 10 and len(st["queue"]) == 10
    assert st["counts"] == {"done": 2700, "rejected": 300, "queued": 30}
    assert [r["id"] for r in st["recent"]] == [3000, 2999, 2998, 2997, 2996]
    assert st["last_decision"]["id"] == 3000 and st["last_decision"]["decision"] == "rejected"
    assert len(json.loads(_cli(tmp_path, "status", "--json", "--limit", "3").stdout)["batches"]) == 3
    every = json.loads(_cli(tmp_path, "status", "--json", "--all").stdout)
    assert [b["id"] for b in every["batches"]] == list(range(1, 3031))
    assert len(every["queue"]) == 30 and len(every["recent"]) == 3000
    table = _cli(tmp_path, "status").stdout
    assert "queue     30 file(s)" in table and "... 20 more" in table and "totals    done 2700, rejected 300" in table
    hist = _cli(tmp_path, "history").stdout
    # An ungated publish is a version of kind blessed: the totals tell it apart (386 = multiples of 7, not of 10).
    assert "totals  2700 version(s) (2314 blessed, 386 ungated), 300 rejected; the newest 10 shown" in hist
    rows = json.loads(_cli(tmp_path, "history", "--json").stdout)
    assert [(r["version"], r["batch"]) for r in rows][-3:] == [(2699, 2998), (2700, 2999), (None, 3000)]
    assert len(rows) == 10
    rows = json.loads(_cli(tmp_path, "history", "--json", "--all").stdout)
    assert len(rows) == 3000 and [r["batch"] for r in rows] == list(range(1, 3001))


def test_the_disk_book_measures_a_burst_of_queued_batches_a_slice_per_write(tmp_path, monkeypatch):
    """A queue of 200 batches is measured at most LIVE_SLICE batch folders per write (a loop turn
    stays short in a burst), the book stays due until every one has a figure, and then its live
    part equals a full measure of the unfinished batches; a finished batch leaves the live part."""
    from trainerd.core.contract import RootLayout
    from trainerd.supervisor.diskuse import measure_live
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor import diskbook

    layout = RootLayout(tmp_path / "root")
    layout.make()
    layout.disk_usage.write_text(json.dumps({"settled": {}, "full_measure_at": time.time()}))
    led = Ledger(layout.db)
    now = time.time()
    with led.transaction() as db:
        for i in range(1, 201):
            db.execute("INSERT INTO batches(id, name, sha256, state, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                       (i, f"q{i}.jsonl", f"{i:064x}", "queued", now, now))
    for i in range(1, 201):
        layout.batch_dir(i).mkdir(parents=True)
        (layout.batch_dir(i) / "data.jsonl").write_bytes(b"x" * (4096 * (1 + i % 3)))
    measured = []
    real = diskbook.batch_live
    monkeypatch.setattr(diskbook, "batch_live", lambda lay, bid: measured.append(bid) or real(lay, bid))
    book = diskbook.DiskBook(layout, led, ListLog())
    writes = 0
    while True:
        measured.clear()
        book.tick(now, running=False, min_free_bytes=0)
        if not measured:
            break
        writes += 1
        assert len(measured) <= diskbook.LIVE_SLICE
    assert writes == -(-200 // diskbook.LIVE_SLICE) and book.unmeasured == 0
    assert book.wake_times(now, running=False) == []
    full = measure_live(layout, list(range(1, 201)))
    assert _usage_of(layout)["kinds"]["batches"] == full["batches"] > 200 * 4096
    with led.transaction() as db:
        db.execute("UPDATE batches SET state = 'done' WHERE id = 1")
    book.dirty = True
    book.tick(now, running=False, min_free_bytes=0)
    assert 1 not in book.live
    assert _usage_of(layout)["kinds"]["batches"] == measure_live(layout, list(range(2, 201)))["batches"]
    led.close()
