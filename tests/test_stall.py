"""The stall watchdog: a worker whose loops stop moving (SIGSTOP mid-step, mid-checkpoint) is stopped
and retried from its last checkpoint, ending bit-identical; a slow worker that still beats is left
alone. Real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from support.log import ListLog
from test_supervisor import FAKE, drive, drop, make_settings
from trainerd.supervisor.daemon import Supervisor
from trainerd.supervisor.stall import timeout_s
from workerutil import adapter_bytes, run_worker, sample_lines


def test_timeout_scales_with_the_step_and_the_phase():
    """Derived: max(300 s, 10 x the median step), doubled while loading; a configured one wins."""
    assert timeout_s(0, "train", None) == 300 and timeout_s(0, "train", 45.0) == 450
    assert timeout_s(0, "load", 45.0) == 900 and timeout_s(0, None, None) == 600
    assert timeout_s(20, "train", 45.0) == 20


def sup(tmp_path, log):
    s = Supervisor(make_settings(tmp_path, supervisor={"stall_timeout_s": 1.5}), log=log,
                   worker_cmd=[sys.executable, str(FAKE)])
    s.open()
    return s


def test_a_silent_worker_is_stopped_and_counted_as_a_crash(tmp_path):
    """A worker that never beats: worker_stalled, SIGTERM (it exits 75), the attempt is a crash with
    the stall in its reason, and the retry finishes the batch."""
    log = ListLog()
    s = sup(tmp_path, log)
    try:
        drop(s, "a.jsonl", ["wait", "done"])
        drive(s, lambda: s.ledger.batches() and s.ledger.batch(1).state == "done", timeout=40)
        stalled = log.find("worker_stalled")
        assert len(stalled) == 1 and stalled[0]["no_progress_s"] >= 3.0 and stalled[0]["phase"] is None
        first = s.ledger.attempts(1)[0]
        assert first.outcome == "crashed" and first.reason.startswith("stalled: no progress for")
        assert s.ledger.batch(1).crashes == 1
    finally:
        s.close()


def test_a_slow_worker_that_beats_is_left_alone(tmp_path):
    """A worker whose loop beats every 0.5 s for 6 s, well past the 1.5 s timeout: never stopped."""
    log = ListLog()
    s = sup(tmp_path, log)
    try:
        drop(s, "a.jsonl", ["beat:6"])
        drive(s, lambda: s.ledger.batches() and s.ledger.batch(1).state == "done", timeout=40)
        assert not log.find("worker_stalled") and s.ledger.batch(1).crashes == 0
    finally:
        s.close()


LONG = sample_lines(400)
REAL = {"supervisor": {"stall_timeout_s": 15}, "retry": {"backoff_s": 0.5, "backoff_max_s": 1},
        "model": {"dtype": "float32"}}


def undisturbed(data, settings, tmp_path) -> bytes:
    """The same batch (its original bytes and its settings) trained by the worker in one go."""
    ref = tmp_path / "undisturbed"
    ref.mkdir()
    (ref / "data.jsonl").write_bytes(data.read_bytes())
    # Its own empty root: the daemon's root holds, since its publish, the batch's own lines in the
    # replay store and its held-out set in the evaluation memory, which a first batch never saw.
    conf = json.loads(settings.read_text())
    conf["root"] = str(tmp_path / "undisturbed-root")
    (tmp_path / "undisturbed-root").mkdir()
    (ref / "settings.json").write_text(json.dumps(conf))
    rc, result, _ = run_worker(ref)
    assert rc == 0, result
    return adapter_bytes(ref / "final_adapter")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-step", "mid-checkpoint"])
def test_sigstop_is_noticed_and_the_batch_resumes_bit_identical(daemon_factory, tmp_path, where):
    """The real worker frozen (SIGSTOP) mid-step, or by itself mid-checkpoint: status shows no
    progress, worker_stalled comes within the timeout, the worker is continued and stopped, and
    the retry resumes from the last checkpoint to the undisturbed run's adapter, bit for bit."""
    env = {"TRAINERD_FAULT": "stop_in_checkpoint"} if where == "mid-checkpoint" else {}
    d = daemon_factory(env=env, **REAL).start()
    d.drop("a.jsonl", LONG)
    if where == "mid-step":
        d.wait_for(lambda: d.progress_step(1) >= 3, 300)
        os.kill(d.worker_pid(), signal.SIGSTOP)
    d.wait_for(lambda: (d.status()["running"] or {}).get("no_progress_s"), 120)
    d.wait_for(lambda: d.events("worker_stalled"), 120)
    stalled = d.events("worker_stalled")[0]
    assert stalled["phase"] == "train" and stalled["no_progress_s"] >= 15
    d.wait_for(lambda: d.state_of("a.jsonl") == "done", 300)
    attempts = [e for e in d.events("worker_exited") if e.get("batch") == 1]
    assert len(attempts) == 2
    resumed = [e for e in d.logs() if e["event"] == "training_started" and e.get("batch") == 1][-1]
    assert resumed["resumed_from"] is not None
    assert d.terminate() == 0
    assert adapter_bytes(d.root / "adapters" / "1") == undisturbed(
        d.root / "done" / "a.jsonl", d.root / "batches" / "000001" / "settings.json", tmp_path)
