"""Faults are weather (issue 24), against the real daemon and worker on the tiny model: a batch
killed more often than retry.max_attempts, each time after it made progress, finishes once and
bit-identical to an undisturbed run (at once after each fault, counted as faults survived in the
ledger, status, lineage and metrics); a worker that crashes at the same step every time is still
quarantined within max_attempts attempts, with that step and its traceback in the reason."""

from __future__ import annotations

import json
import os
import signal

import pytest

from trainerd.supervisor.prometheus import parse
from trainerd.supervisor.ledger import Ledger
from workerutil import sample_lines

pytestmark = pytest.mark.slow

LINES = sample_lines(400)  # ~90 optimizer steps at seq 32, micro 2 x accum 2
WEIGHTS = "adapter_model.safetensors"


def _reached(d) -> int:
    """The batch's furthest step as the supervisor counts it: what its ended attempts reached."""
    return max([a.get("reached_step") or 0 for a in d.events("attempt_accounted")] + [0])


def _tally(d) -> dict:
    try:
        return json.loads((d.root / "batches" / "000001" / "tally.json").read_bytes())
    except (OSError, ValueError):
        return {}


def test_killed_after_progress_more_often_than_max_attempts_finishes_bit_identical(daemon_factory, tmp_path):
    """max_attempts 2, three SIGKILLs of the worker, each once it has a checkpoint past the batch's
    furthest step: every kill is a fault survived (restarted at once, no retry budget spent), the
    batch is done exactly once, and its adapter equals an undisturbed run's byte for byte."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "chaos").mkdir()
    ref = daemon_factory(tmp=tmp_path / "ref").start()
    ref.drop("a.jsonl", LINES)
    ref.wait_for(lambda: ref.state_of("a.jsonl") == "done", 600)
    assert ref.terminate() == 0

    d = daemon_factory(tmp=tmp_path / "chaos", retry={"max_attempts": 2, "backoff_s": 5, "backoff_max_s": 60}).start()
    d.drop("a.jsonl", LINES)
    for kill in range(3):
        # Progress, as the supervisor will judge it: a checkpoint newer than the attempt resumed
        # from, and a step past anything an earlier attempt reached; and a step past that
        # checkpoint, so the next attempt redoes some (a kill right at the checkpoint redoes none:
        # on CI's quiet machine all three once landed there).
        def progressed():
            t, high = _tally(d), _reached(d)
            pid = d.worker_pid()
            ckpt = t.get("ckpt_step") or 0
            ok = pid and t.get("pid") == pid and ckpt > max(high, t.get("from_step") or 0)
            return pid if ok and t["step"] > max(high, ckpt) else None

        pid = d.wait_for(progressed, 300)
        os.kill(pid, signal.SIGKILL)
        d.wait_for(lambda: (d.batch("a.jsonl") or {}).get("attempts", 0) >= kill + 2 or d.state_of("a.jsonl") == "done",
                   120)
    d.wait_for(lambda: d.state_of("a.jsonl") in ("done", "failed"), 600)
    b = d.batch("a.jsonl")
    assert (b["state"], b["attempts"], b["faults_survived"], b["crashes_without_progress"]) == ("done", 4, 3, 0)
    assert (d.root / "adapters" / "1" / WEIGHTS).read_bytes() == (ref.root / "adapters" / "1" / WEIGHTS).read_bytes()

    survived = d.events("fault_survived")
    assert len(survived) == 3 and all(e["retry_in_s"] == 0 and e["progressed"] for e in survived)
    assert [e["crash_streak"] for e in survived] == [1, 1, 1]
    accounts = d.events("attempt_accounted")
    assert [a["after_fault"] for a in accounts] == [False, True, True, True]
    assert all(a["restart_s"] > 0 and a["phases"].get("imports") for a in accounts[1:])
    assert sum(a["redone_steps"] for a in accounts) > 0 and sum(a["new_steps"] for a in accounts) == b_total(d)
    st = d.status()
    assert st["faults"]["survived"] == 3 and st["faults"]["faults"] == 3
    assert 0 < st["faults"]["goodput"] < 1 and st["faults"]["lost_per_fault_s"]["restart"] > 0
    lineage = json.loads((d.root / "adapters" / "1" / "lineage.json").read_text())
    assert lineage["faults"]["survived"] == 3 and lineage["faults"]["goodput"] == st["faults"]["goodput"]
    assert d.terminate() == 0
    prom = parse((d.root / "metrics" / "trainerd.prom").read_text())
    assert prom["trainerd_faults_survived_total"][()] == 3
    assert prom["trainerd_crashes_without_progress_total"][()] == 0
    assert prom["trainerd_goodput_ratio"][()] == pytest.approx(st["faults"]["goodput"], abs=1e-3)


def b_total(d) -> int:
    led = Ledger.open_readonly(d.root / "state.db")
    try:
        return led.batches()[0].total_steps
    finally:
        led.close()


def test_a_crash_at_the_same_step_every_time_is_quarantined_within_max_attempts(daemon_factory):
    """A worker that raises after step 5 on every attempt: the first crash made progress (a fault
    survived, retried at once), the next ones only redo it; failed at attempt max_attempts (3) with
    the step and the traceback in the reason, in failed/<name>.error.json too."""
    d = daemon_factory(retry={"max_attempts": 3, "backoff_s": 0.5, "backoff_max_s": 2})
    d.start(env={"TRAINERD_FAULT": "raise_at_step:5"})
    d.drop("a.jsonl", LINES)
    d.wait_for(lambda: d.state_of("a.jsonl") == "failed", 600)
    b = d.batch("a.jsonl")
    assert (b["attempts"], b["faults_survived"], b["crashes_without_progress"]) == (3, 1, 2)
    assert "crashed 3 times in a row without getting past step 5" in b["reason"]
    assert "after step 5" in b["reason"] and "InjectedFault: fault injected after step 5" in b["reason"]
    assert "Traceback (most recent call last)" in b["reason"]
    err = json.loads((d.root / "failed" / "a.jsonl.error.json").read_text())
    assert "without getting past step 5" in err["reason"] and "Traceback" in err["reason"]
    verdicts = [e["event"] for e in d.logs()
                if e["event"] in ("fault_survived", "worker_crashed") and e.get("source") != "worker"]
    assert verdicts == ["fault_survived", "worker_crashed"]  # the third crash is the quarantine
    assert d.terminate() == 0
