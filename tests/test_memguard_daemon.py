"""The memory guard in the real daemon: `trainerd run` inside a real memory cgroup, the real
worker, the tiny model made memory-hungry by a long seq_len.

Measured on this machine (cgroup working set = usage - inactive_file, daemon included), the
tiny model at seq_len 2048 peaks at ~630 MiB with micro-batch 8 and ~455 MiB with 4; the idle
daemon holds ~25 MiB. The limits below are chosen from those numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.daemon import Daemon
from tests import cgroups
from workerutil import sample_lines

pytestmark = [pytest.mark.slow, pytest.mark.cgroup]

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
BALLOON = str(REPO / "tests" / "bin" / "balloon.py")
LINES = 1200  # ~25 blocks of 2048 tokens: a few optimizer steps


# The tiny model made memory-hungry (numbers above), a checkpoint after every optimizer step, and
# the guard sampling every 50 ms. The daemon is started inside the test's memory cgroup and
# detects the limit itself.
HUNGRY = {
    # fp32 on every CPU: the figures above are fp32's (auto would pick bf16 on AMX / avx512_bf16)
    "model": {"dtype": "float32"},
    "train": {"seq_len": 2048, "micro_batch_size": 8, "grad_accum_steps": 1, "checkpoint_every_steps": 1,
              "warmup_steps": 0},
    "data": {"chunk_lines": 64},
    "memory": {"interval_ms": 50},
}


def _done_checks(d: Daemon, cg: cgroups.TestCgroup) -> dict[str, Any]:
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed") and x, 300)
    assert b["state"] == "done", b
    st = d.status()
    assert st["kernel_oom_kills"] == 0 and cg.oom_kills() == 0
    assert st["current_adapter"] == 1
    assert (d.root / "adapters" / "1" / "adapter_config.json").is_file()
    assert os.readlink(d.root / "adapters" / "current") == "1"
    assert not d.events("memory_kill_decided") and not d.events("kernel_oom_kill")
    return b


def test_plan_starts_small_enough_when_configured_micro_batch_cannot_fit(memcg, daemon_factory):
    """Under 800 MiB the configured micro-batch 8 is estimated over soft: the first attempt starts at a smaller
    micro-batch with doubled accumulation (logged), trains to done with no stop and no OOM kill, adapter published."""
    cg = memcg(800 * MiB)
    d = daemon_factory(cgroup=cg, **HUNGRY).start()
    detected = d.events("memory_limit_detected")[0]
    assert detected["limit_bytes"] == 800 * MiB and cg.path.name in detected["source"]
    d.drop("a.jsonl", sample_lines(LINES))
    _done_checks(d, cg)
    plan = d.events("memory_plan_reduced")[0]
    assert plan["configured_micro_batch_size"] == 8 and plan["micro_batch_size"] < 8
    assert plan["micro_batch_size"] * plan["grad_accum_steps"] == 8
    started = d.events("worker_started")
    assert started[0]["micro_batch_size"] == plan["micro_batch_size"]
    assert not d.events("memory_stop_decided")
    assert d.terminate() == 0


def test_micro_batch_that_stops_fitting_is_stopped_backed_off_and_resumed(memcg, daemon_factory):
    """Under 900 MiB micro-batch 8 fits at plan time; then a 180 MiB neighbour joins the cgroup, so it cannot fit:
    the guard writes .stop before the limit, the worker checkpoints and exits 75, the daemon halves the micro-batch,
    resumes from the checkpoint and finishes; the cgroup's kernel OOM kills are 0 and the adapter is published."""
    cg = memcg(900 * MiB)
    d = daemon_factory(cgroup=cg, **HUNGRY).start()
    neighbour = None
    try:
        d.drop("a.jsonl", sample_lines(LINES))
        d.wait_for(lambda: d.events("worker_started"), 60)
        assert d.events("memory_plan_kept")[0]["micro_batch_size"] == 8
        # Memory the plan could not know about (another process of the service, say): from now
        # on micro-batch 8 (~630 MiB) + 180 MiB passes soft (765 MiB); micro-batch 4 does not.
        neighbour = subprocess.Popen([sys.executable, BALLOON, "--rate-mib-s", "0", "--start-mib", "180",
                                      "--max-s", "600"], preexec_fn=cg.enter)
        b = _done_checks(d, cg)
        stops = d.events("memory_stop_decided")
        assert stops and stops[0]["usage_bytes"] < 900 * MiB * 0.95  # stopped before hard, gracefully
        assert not d.events("memory_term_decided")
        assert b["attempts"] >= 2
        starts = d.events("worker_started")
        assert starts[0]["micro_batch_size"] == 8
        assert starts[1]["micro_batch_size"] < 8
        assert starts[1]["micro_batch_size"] * starts[1]["grad_accum_steps"] == 8  # effective batch kept
        assert d.events("memory_back_off")
        resumed = [e for e in d.events("training_started") if e.get("attempt") == 2]
        assert resumed and resumed[0]["resumed_from"], "attempt 2 did not resume from the checkpoint"
        assert d.terminate() == 0
    finally:  # the daemon_factory stops the daemon
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
