"""Reconcile after the supervisor died at any instant: half-done claims, running batches,
leftover workers, unfinished publishes; and hostile inbox entries. Fake workers, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import subprocess_env
from test_supervisor import FAKE, FAKE_WORKER_CONFIG, drive, drop, make_settings, state
from trainerd.supervisor.daemon import Supervisor


def new_sup(tmp_path, **over) -> Supervisor:
    s = Supervisor(make_settings(tmp_path, **over), worker_cmd=[sys.executable, str(FAKE)])
    return s


def crash(s: Supervisor, *, lifeline: bool = True) -> None:
    """Make ``s`` vanish as if SIGKILLed: lock and ledger closed, nothing cleaned up, worker left
    (``lifeline=False``: the worker does not notice, as if it were already finishing)."""
    if s.running is not None and lifeline:
        s.running.child.close_lifeline()
    s.ledger.close()
    s.ledger = None
    os.close(s._lock_fd)
    s._lock_fd = None


def test_claim_interrupted_before_rename(tmp_path):
    """A claiming row whose file is still in the inbox is claimed exactly once on restart."""
    s = new_sup(tmp_path)
    s.open()
    drop(s, "a.jsonl", ["done"])
    bid = s.ledger.begin_claim("a.jsonl", 10, time.time()).id  # died right after the ledger row
    crash(s)
    s2 = new_sup(tmp_path)
    s2.open()
    try:
        assert s2.ledger.batch(bid).state == "queued"
        drive(s2, lambda: state(s2, bid).state == "done")
        assert len(s2.ledger.batches()) == 1
    finally:
        s2.close()


def test_claim_interrupted_after_rename(tmp_path):
    """A claiming row whose file was already renamed into its batch folder is queued, not lost."""
    s = new_sup(tmp_path)
    s.open()
    drop(s, "a.jsonl", ["done"])
    bid = s.ledger.begin_claim("a.jsonl", 10, time.time()).id
    s.layout.batch_dir(bid).mkdir()
    os.rename(s.layout.inbox / "a.jsonl", s.layout.batch_dir(bid) / "data.jsonl")  # died here
    crash(s)
    s2 = new_sup(tmp_path)
    s2.open()
    try:
        b = s2.ledger.batch(bid)
        assert b.state == "queued" and b.sha256
        assert len(s2.ledger.batches()) == 1
    finally:
        s2.close()


def test_claim_of_vanished_file_forgotten(tmp_path):
    """A claiming row whose file disappeared before the rename is dropped, with a log line."""
    s = new_sup(tmp_path)
    s.open()
    s.ledger.begin_claim("gone.jsonl", 10, time.time())
    crash(s)
    s2 = new_sup(tmp_path)
    s2.open()
    try:
        assert s2.ledger.batches() == []
    finally:
        s2.close()


def test_leftover_worker_found_and_stopped(tmp_path):
    """A worker from the previous life that ignores its lifeline is SIGKILLed after the grace;
    its batch is requeued (not charged a crash) and then trains."""
    s = new_sup(tmp_path, supervisor={"stop_grace_s": 0.5})
    s.open()
    drop(s, "a.jsonl", ["ignore_term", "done"])
    drive(s, lambda: s.running is not None and (s.layout.batch_dir(1) / "term_ignored").exists())
    old = psutil.Process(s.running.child.pid)
    old_child = s.running.child
    crash(s)
    s2 = new_sup(tmp_path, supervisor={"stop_grace_s": 0.5})
    s2.open()
    try:
        old_child.wait(5)  # we are its parent in this test; reap it
        assert not old.is_running()
        b = state(s2)
        assert b.state == "queued" and b.crashes == 0 and b.last_reason == "supervisor_restart"
        assert s2.ledger.attempts(1)[0].outcome == "lost"
        drive(s2, lambda: state(s2).state == "done")
    finally:
        s2.close()


def test_result_written_while_supervisor_dead_is_honoured(tmp_path):
    """A worker that finished (exit 0, adapter staged) while nobody watched is published on restart."""
    s = new_sup(tmp_path)
    s.open()
    drop(s, "a.jsonl", ["wait:0.3"])
    drive(s, lambda: s.running is not None)
    child = s.running.child
    crash(s, lifeline=False)
    child.wait(10)
    s2 = new_sup(tmp_path)
    s2.open()
    try:
        b = state(s2)
        assert b.state == "done" and b.adapter_version == 1
        assert os.readlink(s2.layout.current) == "1"
        assert (s2.layout.done / "a.jsonl").is_file()
    finally:
        s2.close()


class _Died(Exception):
    pass


def test_publish_rolled_forward(tmp_path):
    """A batch whose publish was decided (version reserved) but whose adapter was still staged when
    the supervisor died is not yet done in the ledger; the restart files it, then finishes it."""
    s = new_sup(tmp_path)
    s.open()
    drop(s, "a.jsonl", ["done"])

    def die(_batch):
        raise _Died  # between the ledger's decision and the rename

    s.filing.finish_done = die
    with pytest.raises(_Died):
        drive(s, lambda: False)
    b = state(s)
    assert b.state == "running" and b.adapter_version == 1 and b.finished_at is not None
    assert not (s.layout.adapters / "1").exists() and s.ledger.open_attempts() == []
    crash(s)
    s2 = new_sup(tmp_path)
    s2.open()
    try:
        assert state(s2).state == "done" and state(s2).adapter_version == 1
        assert (s2.layout.adapters / "1" / "adapter_config.json").is_file()
        assert os.readlink(s2.layout.current) == "1"
        assert (s2.layout.done / "a.jsonl").is_file()
    finally:
        s2.close()


def test_hostile_entries_quarantined_unread(tmp_path):
    """Symlink (to a FIFO outside root), FIFO and directory named *.jsonl go to failed/ unread,
    with an error.json; a good file next to them still trains."""
    s = new_sup(tmp_path)
    s.open()
    try:
        outside = tmp_path / "outside.fifo"
        os.mkfifo(outside)  # reading through the link would hang the test
        os.symlink(outside, s.layout.inbox / "link.jsonl")
        os.mkfifo(s.layout.inbox / "pipe.jsonl")
        (s.layout.inbox / "dir.jsonl").mkdir()
        drop(s, "good.jsonl", ["done"])
        drive(s, lambda: s.ledger.batches() and state(s).state == "done")
        for name, kind in (("link.jsonl", "symlink"), ("pipe.jsonl", "FIFO"), ("dir.jsonl", "directory")):
            assert os.path.lexists(s.layout.failed / name)
            err = json.loads((s.layout.failed / f"{name}.error.json").read_text())
            assert err["kind"] == kind and "never read" in err["reason"]
        assert os.path.islink(s.layout.failed / "link.jsonl")
        assert [p for p in s.layout.inbox.iterdir() if not p.is_dir()] == []
    finally:
        s.close()


@pytest.mark.slow
def test_sigkill_supervisor_process_then_restart(daemon_factory, tmp_path):
    """SIGKILL the real daemon process mid-attempt: the worker sees its lifeline close and
    checkpoints; a restarted daemon resumes the batch to done and no process is left over."""
    env = {"TRAINERD_WORKER_CMD": f"{sys.executable} {FAKE}"}
    d = daemon_factory(model_dir=tmp_path / "m", **FAKE_WORKER_CONFIG, env=env,
                       supervisor={"settle_s": 0, "rescan_s": 0.2, "stop_grace_s": 5})
    root = d.root
    d.start(wait=False)  # the deadline below covers the start too
    deadline = time.monotonic() + 15
    while not (root / "inbox").is_dir():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (root / "inbox" / "a.jsonl").write_text(json.dumps({"plan": ["wait", "done"]}) + "\n")
    calls = root / "batches" / "000001" / "fake_calls.jsonl"
    # Until its first line is whole: the file exists (empty) a moment before the worker writes it.
    while not (calls.exists() and calls.read_text().endswith("\n")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker_pid = json.loads(calls.read_text().splitlines()[0])["pid"]
    d.kill()
    # The orphan re-parents to this (subreaper) process; it must stop by itself (parent_gone).
    while psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.waitpid(worker_pid, 0)
    assert json.loads((root / "batches" / "000001" / "result.json").read_text())["reason"] == "parent_gone"
    d.start(wait=False)
    try:
        out = None
        while True:
            assert time.monotonic() < deadline + 15
            out = subprocess.run([sys.executable, "-m", "trainerd", "status", "--json", "--root", str(root)],
                                 env=subprocess_env(**env), capture_output=True, text=True, check=True).stdout
            if json.loads(out)["batches"][0]["state"] == "done":
                break
            time.sleep(0.2)
        b = json.loads(out)["batches"][0]
        assert b["attempts"] == 2 and b["adapter_version"] == 1
    finally:
        assert d.terminate(20) == 0
