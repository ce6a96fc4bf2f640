"""End to end: the real daemon (`python -m trainerd run`) with the real worker and the tiny model.

Each test starts the daemon as a subprocess under tmp_path, drops files into its inbox the
ways an operator would, interrupts it the ways production does, and checks the ledger (via
`trainerd status --json`'s data), the folders and the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from workerutil import sample_lines

pytestmark = pytest.mark.slow

LONG = 600  # lines: ~130 optimizer steps, long enough to interrupt mid-run
SHORT = 60


def test_pipeline_cp_rename_half_written_and_duplicate(daemon_factory, tmp_path):
    """Write-then-rename -> adapter 1; a plain cp -> adapter 2 trained from adapter 1; a file still
    open for writing is not taken early; identical content is skipped, not trained twice."""
    d = daemon_factory().start()
    a_lines = sample_lines(SHORT)
    d.drop("a.jsonl", a_lines)
    # A writer that keeps its file open across several settle periods (a slow cp).
    half = open(d.root / "inbox" / "slow.jsonl", "w")
    half.write("\n".join(a_lines[:10]) + "\n")
    half.flush()
    d.wait_for(lambda: d.state_of("a.jsonl") == "done")
    assert os.readlink(d.root / "adapters" / "current") == "1"
    assert d.state_of("slow.jsonl") is None, "a file still open for writing was claimed"

    src = tmp_path / "b-source.jsonl"
    src.write_text("\n".join(sample_lines(SHORT, start=1000)) + "\n")
    subprocess.run(["cp", str(src), str(d.root / "inbox" / "b.jsonl")], check=True)
    d.wait_for(lambda: d.state_of("b.jsonl") == "done")
    assert os.readlink(d.root / "adapters" / "current") == "2"
    started_b = [e for e in d.events("worker_started") if e["file"] == "b.jsonl"][0]
    assert started_b["init_adapter"] == str(d.root / "adapters" / "1")
    assert started_b["init_adapter_version"] == 1
    trained_b = [e for e in d.events("training_started") if e["batch"] == started_b["batch"]][0]
    assert trained_b["init_adapter"] == str(d.root / "adapters" / "1")  # the worker used it
    assert (d.root / "adapters" / "1" / "adapter_config.json").is_file()
    assert (d.root / "adapters" / "2" / "adapter_config.json").is_file()

    half.write("\n".join(a_lines[10:]) + "\n")  # now the same bytes as a.jsonl
    half.close()
    d.wait_for(lambda: d.state_of("slow.jsonl") == "skipped")
    dup = d.events("duplicate_skipped")[0]
    assert dup["file"] == "slow.jsonl" and dup["duplicate_of_file"] == "a.jsonl"
    assert sum(1 for e in d.events("worker_started") if e["file"] == "slow.jsonl") == 0
    assert sorted(p.name for p in (d.root / "done").iterdir() if p.suffix == ".jsonl") == [
        "a.jsonl", "b.jsonl", "slow.jsonl"]
    assert d.status()["current_adapter"] == 2
    assert d.terminate() == 0


def test_pause_mid_training_then_resume(daemon_factory):
    """touch .stop mid-training: checkpoint, exit 75 (paused), nothing starts; rm .stop: resumes to done."""
    d = daemon_factory().start()
    d.drop("a.jsonl", sample_lines(LONG))
    d.drop("b.jsonl", sample_lines(SHORT, start=5000))
    d.wait_for(lambda: d.progress_step(1) >= 4)
    (d.root / ".stop").write_text("")
    d.wait_for(lambda: (b := d.batch("a.jsonl")) and b["state"] == "queued" and b["reason"] == "paused")
    st = d.status()
    assert st["paused"] is True and st["running"] is None
    assert any((d.root / "batches" / "000001" / "checkpoints").glob("step-*"))
    assert d.events("paused")
    time.sleep(2)  # nothing may start while paused (real time: the daemon runs on its own clock)
    assert d.status()["running"] is None and d.state_of("b.jsonl") == "queued"
    (d.root / ".stop").unlink()
    d.wait_for(lambda: d.state_of("b.jsonl") == "done", 240)
    a = d.batch("a.jsonl")
    assert a["state"] == "done" and a["attempts"] == 2 and a["adapter_version"] == 1
    assert d.events("resumed")
    assert d.terminate() == 0


def test_sigkill_worker_mid_run_resumes(daemon_factory):
    """SIGKILL of the worker by another process (the kernel counted no OOM kill): logged as
    worker_killed_externally, not as an OOM kill; the batch retries and resumes from its
    checkpoint to done with its memory settings unchanged."""
    d = daemon_factory().start()
    d.drop("a.jsonl", sample_lines(LONG))
    d.wait_for(lambda: d.progress_step(1) >= 6)
    os.kill(d.worker_pid(), signal.SIGKILL)
    d.wait_for(lambda: d.state_of("a.jsonl") == "done", 240)
    b = d.batch("a.jsonl")
    assert b["attempts"] == 2 and b["adapter_version"] == 1
    assert d.status()["kernel_oom_kills"] == 0
    assert d.events("worker_killed_externally")[0]["level"] == "warning"
    assert not d.events("memory_back_off")
    starts = [e for e in d.logs() if e["event"] == "training_started"]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"], "attempt 2 did not resume"
    assert starts[1]["attempt"] == 2 and starts[1]["step"] >= 2
    assert d.terminate() == 0


def test_bad_file_fails_while_next_trains(daemon_factory):
    """A file of only bad lines goes to failed/ with its reason and line numbers; the next file trains."""
    d = daemon_factory().start()
    d.drop("bad.jsonl", ["not json", '{"wrong": 1}', '{"text": 5}'])
    d.drop("good.jsonl", sample_lines(SHORT))
    d.wait_for(lambda: d.state_of("good.jsonl") == "done", 240)
    assert d.state_of("bad.jsonl") == "failed"
    err = json.loads((d.root / "failed" / "bad.jsonl.error.json").read_text())
    assert "data unusable" in err["reason"]
    assert [e["line"] for e in err["errors"]][:3] == [1, 2, 3]
    assert (d.root / "failed" / "bad.jsonl").read_text().startswith("not json")
    assert d.terminate() == 0


def test_sigterm_checkpoints_exits_0_and_sigkill_restart_leaves_no_orphan(daemon_factory):
    """SIGTERM: the worker checkpoints, the daemon exits 0, the batch stays queued. Restart;
    SIGKILL the daemon mid-run: its worker stops by itself; restart again: resumed, done, no orphan."""
    d = daemon_factory()
    d.start()
    d.drop("a.jsonl", sample_lines(LONG))
    d.wait_for(lambda: d.progress_step(1) >= 4)
    assert d.terminate() == 0
    b = d.batch("a.jsonl")
    assert b["state"] == "queued" and b["reason"] == "shutdown"
    assert any((d.root / "batches" / "000001" / "checkpoints").glob("step-*"))

    d.start()
    d.wait_for(lambda: d.worker_pid() and d.batch("a.jsonl")["attempts"] == 2 and d.progress_step(1) >= 0)
    step_before = d.progress_step(1)
    d.wait_for(lambda: d.progress_step(1) > step_before + 2)
    orphan = psutil.Process(d.worker_pid())
    d.kill()
    # The orphan re-parents to pytest (a subreaper); it must read EOF on its lifeline and exit 75.
    deadline = time.monotonic() + 60
    while orphan.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned worker did not stop by itself"
        time.sleep(0.1)
    os.waitpid(orphan.pid, 0)
    result = json.loads((d.root / "batches" / "000001" / "result.json").read_text())
    assert result["exit_code"] == 75 and result["reason"] == "parent_gone"

    d.start()
    d.wait_for(lambda: d.state_of("a.jsonl") == "done", 240)
    b = d.batch("a.jsonl")
    assert b["attempts"] == 3 and b["adapter_version"] == 1
    assert d.terminate() == 0
