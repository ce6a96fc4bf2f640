"""`trainerd cancel`: a queued batch is withdrawn, a running one stops with a checkpoint and is withdrawn,
its original goes to done/ with <name>.cancelled.json; through the real daemon (fake workers), under the
root's lock with no daemon, and in the exit policy's table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from test_supervisor import FAKE, FAKE_WORKER_CONFIG, drive, make_settings
from trainerd.supervisor.child import ExitStatus
from trainerd.core.contract import StopReason
from trainerd.supervisor.ledger import Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.daemon import Supervisor
from trainerd.supervisor import policy
from trainerd.supervisor.stopping import Sender

FAKE_ENV = {"TRAINERD_WORKER_CMD": f"{sys.executable} {FAKE}"}


def trainerd(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def plan_line(plan: list[str], salt: str) -> str:
    return json.dumps({"plan": plan, "salt": salt})


@pytest.fixture
def fake_daemon(daemon_factory, tmp_path):
    return daemon_factory(model_dir=tmp_path / "no-model", env=FAKE_ENV, **FAKE_WORKER_CONFIG,
                          supervisor={"stop_grace_s": 5})


def test_cancel_a_running_batch_checkpoints_and_withdraws_it(fake_daemon):
    """A running batch asked to cancel writes its stop, exits 75, ends `cancelled` with its original in
    done/ and a .cancelled.json note; the next batch then trains and is published as version 1."""
    d = fake_daemon.start()
    d.drop("a.jsonl", [plan_line(["wait"], "a")])
    d.wait_for(lambda: d.state_of("a.jsonl") == "running" and d.worker_pid())
    d.drop("b.jsonl", [plan_line(["done"], "b")])
    r = trainerd(d.root, "cancel", "1")
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
    assert d.state_of("a.jsonl") == "cancelled"
    note = json.loads((d.root / "done" / "a.jsonl.cancelled.json").read_text())
    assert note["batch"] == 1 and note["step"] == 3 and "cancelled" in note["reason"]
    assert (d.root / "done" / "a.jsonl").is_file() and (d.root / "batches" / "000001").is_dir()
    result = json.loads((d.root / "batches" / "000001" / "result.json").read_text())
    assert (result["status"], result["reason"], result["exit_code"]) == ("stopped", "cancelled", 75)
    d.wait_for(lambda: d.state_of("b.jsonl") == "done")
    assert d.batch("b.jsonl")["adapter_version"] == 1
    assert d.events("cancel_requested") and d.events("batch_cancelled")
    st = trainerd(d.root, "status")
    assert "cancelled 1" in st.stdout
    assert d.terminate() == 0


def test_cancel_a_queued_batch_and_refuse_a_finished_one(fake_daemon):
    """While paused, a queued batch is withdrawn at once; a done batch cannot be cancelled (exit 1)."""
    d = fake_daemon.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: d.state_of("a.jsonl") == "done")
    (d.root / ".stop").touch()
    d.drop("b.jsonl", [plan_line(["done"], "b")])
    d.wait_for(lambda: d.state_of("b.jsonl") == "queued")
    r = trainerd(d.root, "cancel", "2")
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
    assert d.state_of("b.jsonl") == "cancelled" and (d.root / "done" / "b.jsonl.cancelled.json").exists()
    r = trainerd(d.root, "cancel", "1")
    assert r.returncode == 1 and "is done" in r.stdout
    assert trainerd(d.root, "cancel", "99").returncode == 1
    # The same content again is no duplicate of a cancelled batch: it is trained.
    (d.root / ".stop").unlink()
    d.drop("b2.jsonl", (d.root / "done" / "b.jsonl").read_text())
    d.wait_for(lambda: d.state_of("b2.jsonl") == "done")
    assert d.terminate() == 0


def test_cancel_with_no_daemon_applies_under_the_lock(tmp_path):
    """With no daemon, cancel takes the root's lock and withdraws a queued batch itself."""
    sup = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        sup.layout.stop.touch()
        (sup.layout.inbox / "a.jsonl.gz").write_bytes(b"not really gzip; never read by the supervisor")
        drive(sup, lambda: sup.ledger.batches() and sup.ledger.batch(1).state == "queued")
    finally:
        sup.retention.close()
        sup.close()
    r = trainerd(sup.layout.root, "cancel", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (sup.layout.done / "a.jsonl.gz").read_bytes().startswith(b"not really gzip")
    assert json.loads((sup.layout.done / "a.jsonl.gz.cancelled.json").read_text())["attempts"] == 0
    assert trainerd(sup.layout.root, "status", "--json").stdout.count('"cancelled"') >= 1


def test_a_worker_that_ignores_the_stop_is_killed_and_still_cancelled(tmp_path):
    """A worker ignoring SIGTERM is SIGKILLed after the stop grace; the batch still ends cancelled."""
    sup = Supervisor(make_settings(tmp_path, supervisor={"stop_grace_s": 1}),
                     worker_cmd=[sys.executable, str(FAKE)])
    sup.open()
    try:
        tmp = sup.layout.inbox / ".a.part"
        tmp.write_text(plan_line(["ignore_term"], "a") + "\n")
        tmp.rename(sup.layout.inbox / "a.jsonl")
        drive(sup, lambda: sup.running is not None and (sup.layout.batch_dir(1) / "term_ignored").exists())
        with pytest.raises(Exception) as waiting:
            sup.desk.apply("cancel", 1, time.time(), running=sup.running)
        assert "stopping with a checkpoint" in str(waiting.value)
        drive(sup, lambda: sup.ledger.batch(1).state == "cancelled", timeout=20)
        a = sup.ledger.attempts(1)[0]
        assert (a.signal, a.signal_sent_by, a.reason) == (signal.SIGKILL, "supervisor", "cancelled")
        assert sup.desk.apply("cancel", 1, time.time())["batch"] == 1  # asked again: it is cancelled
    finally:
        sup.retention.close()
        sup.close()


def _batch() -> Batch:
    return Batch(id=1, name="a.jsonl", state=BatchState.RUNNING, created_at=0.0, updated_at=0.0, attempts=1)


@pytest.mark.parametrize("status,result,sender", [
    (ExitStatus(75, None), {"reason": "cancelled"}, None),
    (ExitStatus(75, None), {"reason": "shutdown"}, None),
    (ExitStatus(0, None), {"reason": "done"}, None),
    (ExitStatus(None, signal.SIGKILL), None, Sender.SUPERVISOR),
    (ExitStatus(1, None), None, None),
])
def test_policy_files_a_cancel_as_cancelled_whatever_the_exit(status, result, sender):
    """Cause cancelled: exit 75, exit 0, our SIGKILL or a crash all end in the CANCEL verdict."""
    from trainerd.core.settings import Settings

    end = policy.AttemptEnd(status, result, cause=StopReason.CANCELLED, sender=sender, adapter_staged=True)
    v = policy.decide(end, _batch(), Settings(), 0.0)
    assert (v.action, v.stop, v.reason) == (policy.Action.CANCEL, StopReason.CANCELLED, "cancelled")


def test_policy_honours_a_cancelled_result_after_a_restart():
    """A result.json saying cancelled with no cause known (the supervisor restarted) is a cancel too."""
    from trainerd.core.settings import Settings

    v = policy.decide(policy.AttemptEnd(ExitStatus(75, None), {"reason": "cancelled"}), _batch(), Settings(), 0.0)
    assert v.action is policy.Action.CANCEL
