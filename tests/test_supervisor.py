"""The supervisor's loop against fake workers (tests/bin/fake_worker.py): real processes, real
signals, real SQLite under tmp_path; time is injected through ``tick(now=...)`` where the
behaviour depends on it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from support.config import config_dict
from trainerd.core.config import from_dict
from trainerd.core.planning import back_off
from trainerd.supervisor.daemon import Supervisor
from trainerd.supervisor import forensics

FAKE = Path(__file__).parent / "bin" / "fake_worker.py"


# A supervisor with fake workers keeps the product's train, data and retry settings (tests/support/
# config.py's FAST is for the tiny model): the memory back-off tests below assert the real ladder
# from train's 4 x 4.
FAKE_WORKER_CONFIG = {"train": None, "data": None, "retry": None}
# The in-process supervisor: settle at once, rescan often, a short stop grace, and the retry
# numbers whose arithmetic the crash test checks (10 s, then 20 s capped at 15 s, 3 attempts).
IN_PROCESS = {"supervisor": {"settle_s": 0, "rescan_s": 0.2, "stop_grace_s": 3},
              "retry": {"max_attempts": 3, "backoff_s": 10, "backoff_max_s": 15}, "log": {"file": False}}


def make_settings(tmp_path: Path, **over):
    """In-process Settings for a supervisor on ``tmp_path/root`` with fake workers, ``over`` merged in."""
    return from_dict(config_dict(tmp_path / "root", tmp_path / "no-model", FAKE_WORKER_CONFIG, IN_PROCESS, **over))


@pytest.fixture
def sup(tmp_path):
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    s.open()
    yield s
    if s.running is not None:
        s.running.child.kill_group()
        s.running.child.wait(5)
    s.close()


def drop(sup: Supervisor, name: str, plan: list[str], extra: str = "") -> Path:
    """Write a file into the inbox the recommended way (write elsewhere, then rename)."""
    tmp = sup.layout.inbox / f".{name}.part"
    tmp.write_text(json.dumps({"plan": plan, "salt": name + extra}) + "\n")
    os.rename(tmp, sup.layout.inbox / name)
    return sup.layout.inbox / name


def drive(sup: Supervisor, until, *, timeout: float = 15.0, now=None, settle: bool = False) -> None:
    """Tick with the real clock (or a fixed ``now``) until ``until()``; workers are real processes.
    With ``settle`` a running worker is let exit before the next tick (a fast attempt begins and
    ends between two ticks)."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached in time"
        sup.tick(time.time() if now is None else now)
        if sup.running is not None:
            sup.running.child.wait(max(0.05, deadline - time.monotonic()) if settle else 0.05)


def state(sup: Supervisor, batch_id: int = 1) -> dict:
    return sup.ledger.batch(batch_id)


def test_back_off_keeps_effective_batch():
    """Back-off halves the micro-batch, keeps micro x accum, then turns on checkpointing, then gives up."""
    assert back_off(4, 4, False) == (2, 8, False)
    assert back_off(2, 8, False) == (1, 16, False)
    assert back_off(3, 2, False) == (1, 6, False)
    assert back_off(1, 16, False) == (1, 16, True)
    assert back_off(1, 16, True) is None


def test_done_publishes_adapter_and_moves_original(sup):
    """Exit 0 publishes adapters/1, points current at it, moves the original to done/."""
    drop(sup, "a.jsonl", ["done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    assert (sup.layout.adapters / "1" / "adapter_config.json").is_file()
    assert os.readlink(sup.layout.current) == "1"
    assert (sup.layout.done / "a.jsonl").is_file()
    assert not (sup.layout.inbox / "a.jsonl").exists()
    assert state(sup).adapter_version == 1
    stderr = (sup.layout.batch_dir(1) / "worker.stderr").read_text()
    assert "a line on stderr" in stderr


def test_second_batch_starts_from_first_adapter(sup):
    """The second batch's worker gets --init-adapter adapters/1, and publishes adapters/2."""
    drop(sup, "a.jsonl", ["done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    drop(sup, "b.jsonl", ["done"])
    drive(sup, lambda: len(sup.ledger.batches()) == 2 and state(sup, 2).state == "done")
    call = json.loads((sup.layout.batch_dir(2) / "fake_calls.jsonl").read_text().splitlines()[0])
    assert call["argv"][call["argv"].index("--init-adapter") + 1] == str(sup.layout.adapters / "1")
    assert os.readlink(sup.layout.current) == "2"
    first = json.loads((sup.layout.batch_dir(1) / "fake_calls.jsonl").read_text().splitlines()[0])
    assert "--init-adapter" not in first["argv"]


def test_memory_stop_backs_off_in_next_settings(sup):
    """A memory stop (exit 75) resumes at once with half the micro-batch and double accumulation."""
    drop(sup, "a.jsonl", ["stop:memory", "stop:memory", "stop:memory", "done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    b = state(sup)
    assert (b.micro_batch_size, b.grad_accum_steps, b.gradient_checkpointing) == (1, 16, 1)
    assert b.memory_stops == 3 and b.crashes == 0 and b.attempts == 4
    settings = json.loads((sup.layout.batch_dir(1) / "settings.json").read_text())
    assert settings["train"]["micro_batch_size"] == 1
    assert settings["train"]["grad_accum_steps"] == 16
    assert settings["train"]["gradient_checkpointing"] is True


def test_memory_stop_beyond_last_setting_fails(sup):
    """After micro-batch 1 with checkpointing, one more memory stop fails the batch with a clear reason."""
    drop(sup, "a.jsonl", ["stop:memory"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "failed")
    b = state(sup)
    assert b.memory_stops == 4
    assert "needs more memory than the limit" in b.last_reason
    err = json.loads((sup.layout.failed / "a.jsonl.error.json").read_text())
    assert "needs more memory" in err["reason"]


def test_bad_data_quarantined_with_line_numbers(sup):
    """Exit 65 moves the original to failed/ with an error.json naming the bad lines."""
    drop(sup, "bad.jsonl", ["bad_data"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "failed")
    err = json.loads((sup.layout.failed / "bad.jsonl.error.json").read_text())
    assert [e["line"] for e in err["errors"]] == [2, 3]
    assert "too many bad lines" in err["reason"]
    assert (sup.layout.failed / "bad.jsonl").is_file()


def test_bad_config_fails_the_batch(sup):
    """Exit 78 fails the batch (settings unusable) and quarantines it."""
    drop(sup, "c.jsonl", ["bad_config"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "failed")
    assert "settings unusable" in state(sup).last_reason


def test_crash_retries_with_exponential_back_off_then_fails(sup):
    """Crashes (exit 3, SIGSEGV) retry after backoff_s * 2^k, then fail after retry.max_attempts."""
    drop(sup, "a.jsonl", ["exit:3", "segv", "exit:3"])
    t0 = time.time()
    drive(sup, lambda: sup.ledger.batches() and state(sup).crashes == 1, now=t0)
    assert state(sup).next_attempt_at == pytest.approx(t0 + 10)
    sup.tick(t0 + 9.9)
    assert sup.running is None and state(sup).state == "queued"
    drive(sup, lambda: state(sup).crashes == 2, now=t0 + 10)
    assert "Signal 11 (SIGSEGV)" in state(sup).last_reason
    assert state(sup).next_attempt_at == pytest.approx(t0 + 10 + 15)  # 20 capped at backoff_max_s
    drive(sup, lambda: state(sup).state == "failed", now=t0 + 25)
    assert "crashed 3 times" in state(sup).last_reason
    assert (sup.layout.failed / "a.jsonl").is_file()


def test_unsent_sigkill_counts_as_kernel_oom_kill(sup, monkeypatch):
    """A SIGKILL trainerd did not send, which the kernel's evidence does not rule out as an OOM
    kill, is logged as kernel_oom_kill, counted, and backs off (the evidence is stubbed here:
    provoking a real OOM kill is test_memguard's job)."""
    monkeypatch.setattr(forensics, "kernel_oom_killed", lambda pid, before: True)
    drop(sup, "a.jsonl", ["sigkill", "done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    assert sup.ledger.counter("kernel_oom_kills") == 1
    b = state(sup)
    assert b.crashes == 0 and b.memory_stops == 1 and b.micro_batch_size == 2


def test_sigkill_the_kernel_did_not_count_is_a_crash(sup):
    """A bare SIGKILL while /proc/vmstat's oom_kill count stays put (someone's kill -9) is a
    crash with back-off, logged as worker_killed_externally: no OOM count, no memory back-off."""
    if forensics.vmstat_oom_kills() is None:
        pytest.skip("/proc/vmstat has no oom_kill counter here")
    drop(sup, "a.jsonl", ["sigkill", "done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).crashes == 1)
    b = state(sup)
    assert sup.ledger.counter("kernel_oom_kills") == 0
    assert b.memory_stops == 0 and b.micro_batch_size == 4 and b.state == "queued"
    assert "sent by another process" in b.last_reason


def test_bad_file_fails_while_next_trains(sup):
    """A failing batch leaves the queue and the next file still trains."""
    drop(sup, "bad.jsonl", ["bad_data"])
    drop(sup, "good.jsonl", ["done"])
    drive(sup, lambda: len(sup.ledger.batches()) == 2 and all(
        b.state in ("done", "failed") for b in sup.ledger.batches()))
    by_name = {b.name: b.state for b in sup.ledger.batches()}
    assert by_name == {"bad.jsonl": "failed", "good.jsonl": "done"}


def test_same_content_twice_trained_once(sup):
    """A second file with the same bytes is skipped with a clear reason, never trained twice."""
    content = json.dumps({"plan": ["done"], "salt": "same"}) + "\n"
    (sup.layout.inbox / "one.jsonl").write_text(content)
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    (sup.layout.inbox / "two.jsonl").write_text(content)
    drive(sup, lambda: len(sup.ledger.batches()) == 2 and state(sup, 2).state != "claiming")  # claimed over turns
    b2 = state(sup, 2)
    assert b2.state == "skipped" and b2.duplicate_of == 1
    assert not (sup.layout.batch_dir(2) / "fake_calls.jsonl").exists()
    assert (sup.layout.done / "two.jsonl").is_file()
    assert len(sup.ledger.adapter_versions()) == 1


def test_pause_stops_worker_and_nothing_starts(sup):
    """root/.stop: the worker exits 75 (paused), nothing new starts; removing it resumes."""
    drop(sup, "a.jsonl", ["wait", "done"])
    drive(sup, lambda: sup.running is not None)
    sup.layout.stop.write_text("")
    drive(sup, lambda: sup.running is None)
    b = state(sup)
    assert b.state == "queued" and b.last_reason == "paused" and sup.paused
    for _ in range(5):
        sup.tick(time.time())
    assert sup.running is None
    daemon = json.loads(sup.layout.daemon.read_text())
    assert daemon["paused"] is True
    sup.layout.stop.unlink()
    drive(sup, lambda: state(sup).state == "done")
    assert state(sup).crashes == 0


def test_request_stop_checkpoints_and_requeues(sup):
    """A shutdown request SIGTERMs the worker, which exits 75; the batch stays queued."""
    drop(sup, "a.jsonl", ["wait"])
    drive(sup, lambda: sup.running is not None)
    sup.request_stop(time.time(), "SIGTERM")
    drive(sup, lambda: sup.finished)
    b = state(sup)
    assert b.state == "queued" and b.last_reason == "shutdown" and b.crashes == 0


def test_stop_grace_then_sigkill_of_whole_group(sup):
    """A worker that ignores SIGTERM is SIGKILLed with its group after the grace; no grandchild survives."""
    drop(sup, "a.jsonl", ["ignore_term"])
    # Wait until the worker really ignores SIGTERM (it would die of it while still starting up).
    drive(sup, lambda: sup.running is not None and (sup.layout.batch_dir(1) / "term_ignored").exists())
    stop = sup.running.stop
    t0 = time.time()
    sup.request_stop(t0, "SIGTERM")
    sup.tick(t0 + 1)
    assert sup.running is not None  # still within the grace
    drive(sup, lambda: sup.finished, now=t0 + 3.1)
    assert stop.sent_by(signal.SIGKILL) == "supervisor"
    assert state(sup).state == "queued" and state(sup).crashes == 0


def test_kill_group_leaves_no_grandchild(sup):
    """A second stop request SIGKILLs the worker's whole process group: the grandchild dies too."""
    drop(sup, "a.jsonl", ["grandchild"])
    drive(sup, lambda: sup.running is not None and (sup.layout.batch_dir(1) / "grandchild.pid").exists())
    gc_pid = int((sup.layout.batch_dir(1) / "grandchild.pid").read_text())
    grandchild = psutil.Process(gc_pid)
    sup.request_stop(time.time(), "SIGTERM")
    sup.request_stop(time.time(), "SIGINT")
    drive(sup, lambda: sup.finished)
    gone, alive = psutil.wait_procs([grandchild], timeout=5)
    assert not alive


def test_disk_low_waits_without_failing(tmp_path):
    """Below disk.min_free_bytes nothing starts and the batch stays queued (not failed)."""
    s = Supervisor(make_settings(tmp_path, disk={"min_free_bytes": "1000TiB"}),
                   worker_cmd=[sys.executable, str(FAKE)])
    s.open()
    try:
        drop(s, "a.jsonl", ["done"])
        # The claim is applied by a later tick once its threads are done: wait for it, then give
        # the loop more turns in which nothing may start.
        drive(s, lambda: s.ledger.batches() and state(s).state == "queued")
        for _ in range(3):
            s.tick(time.time())
        assert s.running is None and state(s).state == "queued" and s.disk_low
        s.settings.disk.min_free_bytes = 0
        drive(s, lambda: state(s).state == "done")
    finally:
        s.close()


def test_relay_adds_batch_and_attempt(tmp_path, capsys):
    """Worker JSON lines are relayed with batch and attempt; non-JSON lines are logged as text."""
    from trainerd.core import logs

    logs.configure(fmt="json", file=tmp_path / "log.jsonl")
    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    s.open()
    try:
        drop(s, "a.jsonl", ["done"])
        drive(s, lambda: s.ledger.batches() and state(s).state == "done")
    finally:
        s.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    started = next(x for x in lines if x["event"] == "fake_worker_started")
    assert started["batch"] == 1 and started["attempt"] == 1 and started["source"] == "worker"
    text = next(x for x in lines if x["event"] == "worker_output")
    assert text["text"] == "plain text from the worker" and text["batch"] == 1
    assert all({"timestamp", "level", "event"} <= set(x) for x in lines)


def test_second_supervisor_refused(sup, tmp_path):
    """A second supervisor on the same root refuses to start (single writer)."""
    from trainerd.supervisor.rootlock import AlreadyRunning

    other = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)])
    with pytest.raises(AlreadyRunning):
        other.open()


class ScriptedGuard:
    """The MemoryGuard interface with scripted decisions: stands in for memory pressure (which
    tests/test_memguard.py produces for real), so these tests check only the supervisor's reaction."""

    interval_s = 0.1

    def __init__(self, real, actions):
        self.real, self.actions, self.attached = real, list(actions), []
        self.batch_dir = None

    def attach(self, pid, batch_dir, started_at):
        self.attached.append(pid)
        self.batch_dir = Path(batch_dir)

    def detach(self):
        pass

    def poll(self, now):
        from trainerd.memguard import Decision

        # Script the decisions from the moment the fake worker runs its plan (it has recorded its
        # start): the guard polls on its own thread from the worker's spawn, and a SIGTERM before
        # the worker's first line would end an attempt the fake never counted.
        started = self.batch_dir is not None and (self.batch_dir / "fake_calls.jsonl").exists()
        return Decision(action=self.actions.pop(0) if self.actions and started else "none", reason="scripted")

    def kernel_oom_kills(self):
        return 0

    def plan(self, model_dir, train, lora=None, **kw):
        return self.real.plan(model_dir, train, lora, **kw)

    def ladder(self, *a, **kw):
        return self.real.ladder(*a, **kw)


@pytest.mark.parametrize("action", ["term", "kill"])
def test_guard_term_or_kill_is_a_memory_stop_not_a_crash(sup, action):
    """When the guard asks for SIGTERM/SIGKILL the supervisor sends it, records itself as the
    sender, and treats the exit as a memory stop (back-off), not a crash or a kernel OOM kill."""
    sup.guard = ScriptedGuard(sup.guard, ["none", action])
    drop(sup, "a.jsonl", ["wait", "done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "done")
    b = state(sup)
    assert b.memory_stops == 1 and b.crashes == 0 and b.micro_batch_size == 2
    assert sup.ledger.counter("kernel_oom_kills") == 0
    first = sup.ledger.attempts(1)[0]
    assert first.reason == "memory" and first.outcome == "stopped"
    if action == "kill":
        assert first.signal == signal.SIGKILL and first.signal_sent_by == "guard"


def test_sighup_reload_applies_to_next_attempt_and_keeps_old_on_error(tmp_path):
    """reload() takes a valid new config for the next attempts; an invalid one is logged and ignored."""
    cfg = tmp_path / "c.yaml"
    base = {"root": str(tmp_path / "root"), "model": {"path": str(tmp_path / "m")},
            "supervisor": {"settle_s": 0, "rescan_s": 0.2}, "disk": {"min_free_bytes": 0},
            "train": {"seq_len": 64}}
    cfg.write_text(json.dumps(base))
    from trainerd.core.config import load

    s = Supervisor(load(cfg), config_path=cfg, worker_cmd=[sys.executable, str(FAKE)])
    s.open()
    try:
        base["train"]["seq_len"] = 128
        cfg.write_text(json.dumps(base))
        s.reload()
        assert s.settings.train.seq_len == 128
        cfg.write_text(json.dumps({**base, "train": {"seq_len": 1}}))
        s.reload()
        assert s.settings.train.seq_len == 128
        drop(s, "a.jsonl", ["done"])
        drive(s, lambda: s.ledger.batches() and state(s).state == "done")
        assert json.loads((s.layout.batch_dir(1) / "settings.json").read_text())["train"]["seq_len"] == 128
    finally:
        s.close()


def test_eval_file_is_claimed_with_its_data(sup):
    """name.eval.jsonl goes with name.jsonl into the batch folder (eval.jsonl); nothing is left in
    the inbox and the eval file is no batch of its own."""
    sup.layout.stop.touch()  # paused: only the claim
    (sup.layout.inbox / "a.eval.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    drop(sup, "a.jsonl", ["done"])
    drive(sup, lambda: sup.ledger.batches() and state(sup).state == "queued")
    files = sup.layout.batch(1)
    assert files.eval_file.read_text() == json.dumps({"text": "held out"}) + "\n"
    assert files.claimed("a.jsonl").is_file()
    assert [p.name for p in sup.layout.inbox.iterdir() if p.is_file()] == []
    assert len(sup.ledger.batches()) == 1
