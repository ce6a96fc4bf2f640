"""Retention and `trainerd gc`: what may go (and what never goes), applied by the running daemon after a
worker ends and on request, or under the root's lock with no daemon; and the disk use by kind that
`trainerd status` shows from the daemon's cached measurement."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from test_cancel import FAKE_ENV, plan_line, trainerd
from test_supervisor import FAKE, FAKE_WORKER_CONFIG, drive, make_settings
from trainerd.core.settings import RetentionSettings
from trainerd.supervisor.ledger import Ledger
from trainerd.supervisor.views.status import collect_status, render_status
from trainerd.supervisor.daemon import Supervisor
from trainerd.supervisor import hooks, retention
from trainerd.supervisor.requests import submit


def _drop(sup, name, plan):
    tmp = sup.layout.inbox / f".{name}.part"
    tmp.write_text(plan_line(plan, name) + "\n")
    os.rename(tmp, sup.layout.inbox / name)


@pytest.fixture
def history(tmp_path):
    """A root with versions 1-4 (a, b, d, f), a rejected c, a failed e and a queued g (paused), its
    supervisor closed. Batch ids: a1 b2 c3 d4 e5 f6 g7."""
    sup = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        for name, plan, end in (("a", ["done"], "done"), ("b", ["done"], "done"), ("c", ["done:nan"], "rejected"),
                                ("d", ["done"], "done"), ("e", ["bad_data"], "failed"), ("f", ["done"], "done")):
            _drop(sup, f"{name}.jsonl", plan)
            drive(sup, lambda n=f"{name}.jsonl", e=end: any(b.name == n and b.state == e for b in sup.ledger.batches()))
        sup.layout.stop.touch()
        _drop(sup, "g.jsonl", ["done"])
        drive(sup, lambda: any(b.name == "g.jsonl" and b.state == "queued" for b in sup.ledger.batches()))
        drive(sup, lambda: sup.hooks.run is None and not hooks.pending(sup.layout) and sup.retention.child is None)
    finally:
        sup.retention.close()
        sup.close()
    return sup.layout


def _plan(layout, **rs):
    led = Ledger(layout.db)
    try:
        return [(i.kind, os.path.basename(i.path)) for i in
                retention.plan(layout, led, RetentionSettings(**rs), time.time())]
    finally:
        led.close()


def test_plan_keeps_current_what_is_in_progress_and_what_requests_need(history):
    """keep_adapters 1 / keep_batch_dirs 1: current (4), the parent of a batch in progress, a pending
    rollback's version and a pending hook's stay; a pending promote keeps its candidate and folder; a
    rejected candidate otherwise goes with its folder; queued batches' folders always stay."""
    layout = history
    led = Ledger(layout.db)
    try:
        led.set_parent(7, 2, time.time())  # g continues version 2 (fixed at its first start)
    finally:
        led.close()
    submit(layout, "rollback", 1)
    submit(layout, "promote", 3)
    assert _plan(layout, keep_adapters=1, keep_batch_dirs=1) == [
        ("adapter", "3"), ("batch", "000001"), ("batch", "000002"), ("batch", "000004"), ("batch", "000005")]
    for req in layout.requests.iterdir():
        req.unlink()
    hooks.record_version(layout, 3, 4, "d.jsonl", "blessed")
    got = _plan(layout, keep_adapters=1, keep_batch_dirs=1)
    assert ("adapter", "1") in got and ("adapter", "3") not in got and ("adapter", "2") not in got
    assert ("batch", "000003") in got and ("rejected", "000003") in got and ("batch", "000007") not in got
    assert _plan(layout) == []  # all off by default


def test_originals_age_from_when_they_were_filed(history):
    """done_days/failed_days count from the rename into done/ or failed/ (ctime), not the data's mtime."""
    layout = history
    old = time.time() - 10 * 86400
    for p in layout.done.iterdir():
        os.utime(p, (old, old))  # an old file by its mtime; it was filed seconds ago
    assert _plan(layout, done_days=1, failed_days=1) == []
    time.sleep(0.2)
    got = _plan(layout, done_days=1e-6, failed_days=1e-6)
    assert ("original", "a.jsonl") in got and ("original", "c.jsonl.rejected.json") in got
    assert ("original", "e.jsonl") in got and ("original", "e.jsonl.error.json") in got


def test_gc_with_no_daemon_applies_under_the_lock(history, tmp_path):
    """`trainerd gc --dry-run` lists the items with their sizes; `trainerd gc` removes them, marks the
    versions removed in the ledger (fsck agrees, history keeps them) and measures the disk use."""
    layout = history
    cfg = tmp_path / "gc.yaml"
    cfg.write_text(json.dumps({"root": str(layout.root), "retention": {"keep_adapters": 2, "keep_batch_dirs": 3}}))
    r = trainerd(layout.root, "gc", "--dry-run", "--config", str(cfg))
    assert r.returncode == 0 and "adapter" in r.stdout and "would free" in r.stdout, r.stdout + r.stderr
    assert (layout.adapters / "1").is_dir()
    r = trainerd(layout.root, "gc", "--config", str(cfg))
    assert r.returncode == 0 and "removed 6 item(s)" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in layout.adapters.iterdir()) == ["3", "4", "current", "rejected"]
    assert sorted(p.name for p in layout.batches.iterdir()) == ["000004", "000005", "000006", "000007"]
    led = Ledger(layout.db)
    try:
        assert [v.n for v in led.adapter_versions() if v.removed_at] == [1, 2]
    finally:
        led.close()
    assert trainerd(layout.root, "fsck").returncode == 0
    assert [h["version"] for h in json.loads(trainerd(layout.root, "history", "--json").stdout)
            if h["version"]] == [1, 2, 3, 4]
    st = collect_status(layout.root)
    assert st["disk"]["kinds"]["adapters"] > 0 and "disk      free" in render_status(st)
    assert trainerd(layout.root, "promote", "3").returncode == 1  # its candidate went with its folder


def test_the_daemon_applies_retention_after_a_worker_and_serves_gc(daemon_factory, tmp_path):
    """keep_adapters 2, keep_batch_dirs 2: as batches end the daemon removes the older versions and
    folders between workers; later `trainerd gc` (a request) removes the aged originals; status shows
    the disk use by kind; fsck agrees."""
    d = daemon_factory(model_dir=tmp_path / "no-model", env=FAKE_ENV, **FAKE_WORKER_CONFIG,
                       retention={"keep_adapters": 2, "keep_batch_dirs": 2, "done_days": 3 / 86400})
    d.start()
    for n in "abcd":
        d.drop(f"{n}.jsonl", [plan_line(["done"], n)])
        d.wait_for(lambda n=n: d.state_of(f"{n}.jsonl") == "done")
    d.wait_for(lambda: not (d.root / "adapters" / "2").exists() and not (d.root / "batches" / "000002").exists())
    assert sorted(p.name for p in (d.root / "adapters").iterdir() if p.name.isdigit()) == ["3", "4"]
    assert sorted(p.name for p in (d.root / "batches").iterdir()) == ["000003", "000004"]
    d.wait_for(lambda: sum(e["removed"] for e in d.events("retention_applied")) == 4)  # logged once the child is reaped
    assert not any(e["requested"] for e in d.events("retention_applied"))
    time.sleep(3.2)  # the originals in done/ are now older than done_days
    r = trainerd(d.root, "gc", "--dry-run")
    assert r.returncode == 0 and "original" in r.stdout and "a.jsonl" in r.stdout, r.stdout + r.stderr
    r = trainerd(d.root, "gc")
    assert r.returncode == 0 and "removed 4 item(s)" in r.stdout, r.stdout + r.stderr
    assert list((d.root / "done").iterdir()) == []
    d.wait_for(lambda: collect_status(d.root)["disk"]["kinds"])
    st = trainerd(d.root, "status")
    assert "disk      free" in st.stdout and "adapters" in st.stdout and "originals" in st.stdout
    assert trainerd(d.root, "fsck").returncode == 0
    assert d.terminate() == 0


def test_a_rollback_version_retention_removed_stays_removed_after_a_restart(history, tmp_path):
    """rollback 1 makes version 5 (a copy of 1); a later batch makes 6; gc keeps 1 version. The next
    daemon opens (no copy of a removed source attempted) and does not bring version 5 back."""
    layout = history
    sup = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        assert sup.chain.rollback(1, time.time())["version"] == 5
        layout.stop.unlink()  # g (queued, paused) trains: version 6
        drive(sup, lambda: any(b.name == "g.jsonl" and b.state == "done" for b in sup.ledger.batches()))
        drive(sup, lambda: sup.hooks.run is None and not hooks.pending(sup.layout) and sup.retention.child is None)
    finally:
        sup.retention.close()
        sup.close()
    cfg = tmp_path / "gc.yaml"
    cfg.write_text(json.dumps({"root": str(layout.root), "retention": {"keep_adapters": 1}}))
    r = trainerd(layout.root, "gc", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in layout.adapters.iterdir() if p.name.isdigit()) == ["6"]
    sup = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        assert sorted(p.name for p in layout.adapters.iterdir() if p.name.isdigit()) == ["6"]
        assert os.readlink(layout.adapters / "current") == "6"
        assert not [e for e in hooks.pending(layout) if json.loads(e.read_text()).get("version") == 5]
    finally:
        sup.close()
    assert trainerd(layout.root, "fsck").returncode == 0


def test_a_promote_asked_while_retention_deletes_waits_for_it(history, tmp_path):
    """`trainerd gc` starts the deleting child; a promote of the rejected batch whose folder it removes,
    asked meanwhile, waits (never published from a folder being deleted), then is refused: its
    candidate is gone."""
    from trainerd.supervisor.chain import Refused, Waiting

    sup = Supervisor(make_settings(tmp_path, retention={"keep_batch_dirs": 1}), worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        with pytest.raises(Waiting, match="removing"):
            sup.desk.apply("gc", 0, time.time(), running=None)
        with pytest.raises(Waiting, match="retention is deleting"):
            sup.desk.apply("promote", 3, time.time(), running=None)
        drive(sup, lambda: sup.retention.child is None)
        assert not history.batch_dir(3).exists()
        with pytest.raises(Refused):
            sup.desk.apply("promote", 3, time.time(), running=None)
        assert os.readlink(history.adapters / "current") == "4"
    finally:
        sup.retention.close()
        sup.close()
