"""The memory guard in the real daemon: `trainerd run` inside a real memory cgroup, the real
worker, the tiny model made memory-hungry by a long seq_len.

Measured on this machine (cgroup working set = usage - inactive_file, daemon included), the
tiny model at seq_len 2048 peaks at ~630 MiB with micro-batch 8 and ~455 MiB with 4; the idle
daemon holds ~25 MiB. The limits below are chosen from those numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import subprocess_env
from tests import cgroups
from trainerd.status import collect_status
from workerutil import sample_lines

pytestmark = [pytest.mark.slow, pytest.mark.cgroup]

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
BALLOON = str(REPO / "tests" / "bin" / "balloon.py")
LINES = 1200  # ~25 blocks of 2048 tokens: a few optimizer steps


class CgroupDaemon:
    """`python -m trainerd run` started inside a memory cgroup (it detects the limit itself)."""

    def __init__(self, tmp: Path, model_dir: Path, cg: cgroups.TestCgroup, **train: Any):
        self.root = tmp / "root"
        self.cg = cg
        cfg = {
            "root": str(self.root),
            "model": {"path": str(model_dir)},
            "train": {"seq_len": 2048, "micro_batch_size": 8, "grad_accum_steps": 1, "checkpoint_every_steps": 1,
                      "threads": 1, "warmup_steps": 0, **train},
            "data": {"chunk_lines": 64},
            "memory": {"interval_ms": 50},
            "supervisor": {"settle_s": 0.3, "rescan_s": 1.0, "stop_grace_s": 60},
            "retry": {"backoff_s": 0.5, "backoff_max_s": 2},
            "disk": {"min_free_bytes": 0},
        }
        self.config = tmp / "trainerd.yaml"
        self.config.write_text(json.dumps(cfg))
        self.out = tmp / "daemon.out"
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config", str(self.config)],
                                         env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=cg.enter)
        self.wait_for(lambda: (self.root / "trainerd.pid").exists() and collect_status(self.root)["daemon"]["running"],
                      60)

    def drop(self, name: str, lines: list[str]) -> None:
        part = self.root / "inbox" / f".{name}.part"
        part.write_text("\n".join(lines) + "\n")
        os.rename(part, self.root / "inbox" / name)

    def batch(self, name: str) -> dict[str, Any] | None:
        return next((b for b in collect_status(self.root)["batches"] if b["file"] == name), None)

    def logs(self) -> list[dict[str, Any]]:
        try:
            text = (self.root / "logs" / "trainerd.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [x for x in self.logs() if x.get("event") == event]

    def wait_for(self, cond: Callable[[], Any], timeout: float = 240.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.out.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; daemon log tail:\n{self.out.read_text()[-4000:]}")
            time.sleep(0.1)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _done_checks(d: CgroupDaemon, cg: cgroups.TestCgroup) -> dict[str, Any]:
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed") and x, 300)
    assert b["state"] == "done", b
    st = collect_status(d.root)
    assert st["kernel_oom_kills"] == 0 and cg.oom_kills() == 0
    assert st["current_adapter"] == 1
    assert (d.root / "adapters" / "1" / "adapter_config.json").is_file()
    assert os.readlink(d.root / "adapters" / "current") == "1"
    assert not d.events("memory_kill_decided") and not d.events("kernel_oom_kill")
    return b


def test_plan_starts_small_enough_when_configured_micro_batch_cannot_fit(memcg, tmp_path, tiny_model_dir):
    """Under 800 MiB the configured micro-batch 8 is estimated over soft: the first attempt starts at a smaller
    micro-batch with doubled accumulation (logged), trains to done with no stop and no OOM kill, adapter published."""
    cg = memcg(800 * MiB)
    d = CgroupDaemon(tmp_path, tiny_model_dir, cg)
    try:
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
    finally:
        d.cleanup()


def test_micro_batch_that_stops_fitting_is_stopped_backed_off_and_resumed(memcg, tmp_path, tiny_model_dir):
    """Under 900 MiB micro-batch 8 fits at plan time; then a 180 MiB neighbour joins the cgroup, so it cannot fit:
    the guard writes .stop before the limit, the worker checkpoints and exits 75, the daemon halves the micro-batch,
    resumes from the checkpoint and finishes; the cgroup's kernel OOM kills are 0 and the adapter is published."""
    cg = memcg(900 * MiB)
    d = CgroupDaemon(tmp_path, tiny_model_dir, cg)
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
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        d.cleanup()
