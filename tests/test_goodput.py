"""Faults are weather (issue 24), the pure parts as tables: the Young/Daly checkpoint interval, the
MTBF estimate, progress and the goodput account, the worker's checkpoint clock; and the two small
files they read (the worker's tally, the last traceback in worker.stderr), written and read for
real. No daemon: the process-level proofs are in tests/test_faults_e2e.py and tests/test_worker.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import subprocess_env
from trainerd.core import cadence
from trainerd.supervisor.ledger import goodput
from trainerd.supervisor.forensics import last_traceback


# (checkpoint cost s, MTBF s, last write s) -> (interval s, rule)
INTERVALS = [
    ((0.1, 3600.0, 0.0), (math.sqrt(720.0), "young_daly")),       # SmolLM2 r8, the prior: ~27 s
    ((0.1, 10800.0, 0.0), (math.sqrt(2160.0), "young_daly")),     # Llama 3's fault every 3 h: ~46 s
    ((0.1, 120.0, 0.0), (10.0, "overhead")),                      # a fault every 2 min: 1 % overhead floor
    ((0.01, 60.0, 0.0), (2.0, "min")),                            # tiny cost, frequent faults: the floor
    ((0.05, 3600.0, 30.0), (60.0, "write")),                      # a slow background write: twice it
    ((1.0, 86400.0 * 3, 0.0), (600.0, "max")),                    # rare faults: never longer than 600 s
    ((10.0, 86400.0, 0.0), (1000.0, "overhead")),                 # a huge stall: 1 % beats the ceiling
]


@pytest.mark.parametrize("args,want", INTERVALS, ids=[f"C={a[0]} M={a[1]} W={a[2]}" for a, _ in INTERVALS])
def test_young_daly_interval_from_cost_and_mtbf(args, want):
    """sqrt(2 C M), clamped: >= 100 C (<= 1 % overhead), >= 2 x the last write, >= 2 s, <= 600 s."""
    cost, mtbf, write = args
    interval, rule = cadence.checkpoint_interval_s(cost, mtbf, write_s=write)
    assert (round(interval, 6), rule) == (round(want[0], 6), want[1])
    assert cost / interval <= cadence.MAX_OVERHEAD + 1e-12


def test_mtbf_prior_and_what_the_ledger_saw():
    """No history: the prior (1 h). A fault every 120 s for an hour pulls it to ~4 min; older
    attempts fall out of the window; stops the daemon asked for are not faults, OOM kills are."""
    now = 1_000_000.0
    assert cadence.estimate_mtbf([], now).mtbf_s == cadence.PRIOR_MTBF_S
    loop = [(now - 3600 + 120 * k, now - 3600 + 120 * (k + 1), "crashed", "Signal 9 (SIGKILL)") for k in range(30)]
    r = cadence.estimate_mtbf(loop, now)
    assert (r.faults, round(r.training_s)) == (30, 3600)
    assert r.mtbf_s == pytest.approx((3600 + 3600) / 31)
    old = [(now - 10 * 86400, now - 9 * 86400, "crashed", "x")]
    assert cadence.estimate_mtbf(old, now).faults == 0
    stops = [(now - 100, now - 50, "stopped", "paused"), (now - 50, now - 10, "stopped", "kernel_oom_kill")]
    r = cadence.estimate_mtbf(stops, now)
    assert (r.faults, r.training_s) == (1, 90.0)


def tally(**kw) -> dict:
    base = {"from_step": 0, "step": 0, "steps": 0, "step_s": 0.0, "ckpt_s": 0.0, "ckpt_n": 0, "ckpt_step": None,
            "ready_at": None, "phases": {}}
    return {**base, **kw}


# (tally, the batch's reached_step before) -> progressed
PROGRESS = [
    ("first attempt, checkpointed, got somewhere", tally(from_step=0, step=40, ckpt_step=30), None, True),
    ("resumed, checkpointed past the old high-water mark", tally(from_step=30, step=70, ckpt_step=60), 45, True),
    ("died before its first checkpoint", tally(from_step=30, step=44, ckpt_step=None), 45, False),
    ("a crash loop: redid the same steps, its timed checkpoint inside the redo", tally(from_step=30, step=45,
                                                                                        ckpt_step=40), 45, False),
    ("never began training (no tally)", None, 45, False),
]


@pytest.mark.parametrize("name,t,before,want", PROGRESS, ids=[p[0] for p in PROGRESS])
def test_progress_needs_a_newer_checkpoint_and_a_step_further_than_ever(name, t, before, want):
    """Progress = a checkpoint newer than the one it resumed from AND a step past the batch's furthest."""
    assert goodput.progress_of(t, before).progressed is want


def test_account_splits_useful_from_recomputed_and_charges_the_fault():
    """An attempt after a fault: its redo is recomputed work, its spawn-to-first-step a restart, the
    wait before it back-off; the batch's goodput is useful step time over attempts plus waits."""
    first = goodput.account(tally(from_step=0, step=50, steps=50, step_s=50.0, ckpt_step=40, ckpt_s=0.5,
                                  ready_at=1005.0), before_step=None, started_at=1000.0, ended_at=1056.0,
                            after_fault_at=None)
    assert (first["new_steps"], first["redone_steps"], first["useful_s"], first["restart_s"]) == (50, 0, 50.0, 5.0)
    totals = goodput.add(None, first, fault=True)  # it ended in a crash after step 50 (checkpoint 40)
    second = goodput.account(tally(from_step=40, step=100, steps=60, step_s=60.0, ckpt_step=100, ckpt_s=0.5,
                                   ready_at=1064.0), before_step=50, started_at=1058.0, ended_at=1125.0,
                             after_fault_at=1056.0)
    assert (second["new_steps"], second["redone_steps"]) == (50, 10)
    assert (second["useful_s"], second["recomputed_s"], second["restart_s"], second["wait_s"]) == (50.0, 10.0, 6.0, 2.0)
    totals = goodput.add(totals, second, fault=False)
    assert totals == {"useful_s": 100.0, "wall_s": 56.0 + 67.0 + 2.0, "faults": 1, "recomputed_s": 10.0,
                      "restart_s": 6.0, "backoff_s": 2.0, "checkpoint_s": 1.0}
    s = goodput.summary(totals)
    assert s["goodput"] == pytest.approx(100 / 125, abs=1e-4)
    assert s["lost_per_fault_s"] == {"recomputed": 10.0, "restart": 6.0, "backoff": 2.0, "total": 18.0}


def test_an_attempt_that_never_trained_is_all_restart():
    """No tally (killed while loading): its whole life is restart, nothing useful."""
    acc = goodput.account(None, before_step=10, started_at=0.0, ended_at=7.5, after_fault_at=None)
    assert (acc["restart_s"], acc["useful_s"], acc["progressed"]) == (7.5, 0.0, False)


def test_tally_survives_a_sigkill_and_has_a_fixed_size(tmp_path):
    """The worker's per-step record (one pwrite, no rename, no fsync) is there and whole after the
    process that wrote it was SIGKILLed right after a write."""
    path = tmp_path / "tally.json"
    code = ("import os, signal, sys; from pathlib import Path; from trainerd.worker.tally import Tally; "
            "t = Tally(Path(sys.argv[1])); t.begin(7, mtbf_s=120.0)\n"
            "for k in range(8, 208): t.stepped(k, 0.01)\n"
            "t.checkpointed(200, 0.05); t.stalled(0.02); t.stepped(208, 0.01); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(path)], env=subprocess_env(), timeout=60)
    assert p.returncode == -signal.SIGKILL
    raw = path.read_bytes()
    assert len(raw) == 1024 and raw.endswith(b"\n")
    t = json.loads(raw)
    assert (t["from_step"], t["step"], t["steps"], t["ckpt_step"], t["ckpt_s"], t["mtbf_s"]) == (7, 208, 201, 200, 0.02, 120.0)
    assert goodput.progress_of(t, 150).progressed


def test_last_traceback_is_the_current_attempts(tmp_path):
    """Only the part of worker.stderr after the last attempt marker is searched; its last traceback
    is returned whole when short, its end when long; none when the attempt left none."""
    err = tmp_path / "worker.stderr"
    err.write_text("--- 2026 python -m trainerd.worker a\nTraceback (most recent call last):\n  old\nValueError: old\n"
                   "--- 2026 python -m trainerd.worker b\nsome warning\nTraceback (most recent call last):\n"
                   "  File \"x.py\", line 1, in f\nRuntimeError: new\n")
    assert last_traceback(err) == 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nRuntimeError: new'
    with open(err, "a") as f:
        f.write("--- 2026 python -m trainerd.worker c\nkilled\n")
    assert last_traceback(err) is None
    with open(err, "a") as f:
        f.write("Traceback (most recent call last):\n" + "  frame\n" * 2000 + "OSError: deep\n")
    tb = last_traceback(err, max_chars=200)
    assert tb.startswith("...\n") and tb.endswith("OSError: deep") and len(tb) <= 204
    assert last_traceback(tmp_path / "missing") is None
    os.unlink(err)


def test_the_worker_clock_follows_measured_cost_and_mtbf():
    """The worker's clock (worker/saver.py; imports torch): auto starts from the prior cost (or the
    resumed checkpoint's), re-aims after each measured checkpoint, counts from the last state taken,
    and a step cadence still adds checkpoints; a number is a fixed interval."""
    from trainerd.core.config import from_dict
    from trainerd.worker.saver import Clock

    class Log:
        def __init__(self):
            self.lines = []

        def info(self, event, **kw):
            self.lines.append((event, kw))

    train = from_dict({"root": "/r"}).train
    log = Log()
    c = Clock(train, 120.0, None, log, now=0.0)
    assert (c.interval_s, c.rule) == (10.0, "overhead")  # prior C = 0.1 s: 1 % floor beats sqrt(24)
    assert not c.due(7, 9.9) and c.due(7, 10.0)
    c.taken(10.0)
    c.measured_cost(0.01, 0.01)
    assert (c.interval_s, c.rule) == (2.0, "min") and log.lines[-1][0] == "checkpoint_interval"
    assert not c.due(8, 11.9) and c.due(8, 12.0)
    resumed = Clock(train, 3600.0, 0.05, Log(), now=0.0)
    assert resumed.interval_s == pytest.approx(math.sqrt(2 * 0.05 * 3600))
    fixed = Clock(from_dict({"root": "/r", "train": {"checkpoint_every_s": 600, "checkpoint_every_steps": 50}}).train,
                  120.0, None, Log(), now=0.0)
    assert (fixed.interval_s, fixed.rule) == (600.0, "fixed")
    assert fixed.due(50, 1.0) and not fixed.due(51, 1.0) and fixed.due(51, 600.0)
