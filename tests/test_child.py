"""Starting, relaying, signalling and reaping one worker process (fake worker, real signals)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil

from support.log import ListLog
from trainerd.supervisor.child import Child, ExitStatus, describe_signal, worker_command
from trainerd.core.contract import BatchFiles, StopReason
from trainerd.supervisor.stopping import Escalation, Sender

FAKE = Path(__file__).parent / "bin" / "fake_worker.py"


def batch(tmp_path: Path, plan: list[str]) -> Path:
    d = tmp_path / "batches" / "000001"
    d.mkdir(parents=True)
    (d / "data.jsonl").write_text(json.dumps({"plan": plan}) + "\n")
    (d / "settings.json").write_text(json.dumps({"root": str(tmp_path), "train": {
        "micro_batch_size": 4, "grad_accum_steps": 4}}))
    return d


def spawn(d: Path, log) -> Child:
    return Child([sys.executable, str(FAKE), str(d), "--publish", str(d / "published")],
                 stderr_path=d / "worker.stderr", log=log)


def test_exit_code_and_signal_decoding(tmp_path):
    """An exit code is a code; a death by signal reads "Signal N (NAME)"."""
    assert ExitStatus.from_returncode(3) == ExitStatus(3, None)
    assert ExitStatus.from_returncode(-11).describe() == "Signal 11 (SIGSEGV)"
    assert describe_signal(9) == "Signal 9 (SIGKILL)"
    d = batch(tmp_path, ["segv"])
    c = spawn(d, ListLog())
    st = c.wait(10)
    assert st is not None and st.signal == signal.SIGSEGV and st.code is None


def test_stdout_relayed_and_stderr_appended(tmp_path):
    """JSON stdout lines keep their fields (minus batch/attempt), text lines become worker_output;
    stderr is appended to worker.stderr across attempts."""
    d = batch(tmp_path, ["exit:3"])
    for _ in range(2):
        log = ListLog()
        c = spawn(d, log)
        assert c.wait(10) == ExitStatus(3, None)
    events = {e: kw for _, e, kw in log.lines}
    assert events["fake_worker_started"]["action"] == "exit:3"
    assert "batch" not in events["fake_worker_started"]  # the relay's own binding wins
    assert events["worker_output"]["text"] == "plain text from the worker"
    err = (d / "worker.stderr").read_text()
    assert err.count("a line on stderr") == 2 and err.count("--- ") == 2


def test_lifeline_eof_stops_worker(tmp_path):
    """Closing the stdin lifeline makes a contract-abiding worker exit 75 with reason parent_gone."""
    d = batch(tmp_path, ["wait"])
    c = spawn(d, ListLog())
    time.sleep(0.3)
    assert c.poll() is None
    c.close_lifeline()
    st = c.wait(10)
    assert st == ExitStatus(75, None)
    assert json.loads((d / "result.json").read_text())["reason"] == "parent_gone"


def test_kill_group_reaches_grandchildren(tmp_path):
    """The escalation's kill SIGKILLs the worker's group, grandchildren included; the sender and the
    cause are remembered by the escalation (the one record of who stopped a worker and why)."""
    d = batch(tmp_path, ["grandchild"])
    c = spawn(d, ListLog())
    deadline = time.monotonic() + 10
    while not (d / "grandchild.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gc = psutil.Process(int((d / "grandchild.pid").read_text()))
    assert os.getpgid(gc.pid) == c.pgid != os.getpgid(0)
    esc = Escalation(c, BatchFiles(d), ListLog())
    esc.kill(StopReason.SHUTDOWN, Sender.SUPERVISOR)
    assert c.wait(10) == ExitStatus(None, signal.SIGKILL)
    assert esc.sent_by(signal.SIGKILL) == "supervisor" and esc.sent_by(signal.SIGTERM) is None
    assert esc.cause == "shutdown"
    _, alive = psutil.wait_procs([gc], timeout=5)
    assert not alive


def test_worker_command_override(monkeypatch):
    """The worker command is the real worker unless overridden by argument or TRAINERD_WORKER_CMD."""
    monkeypatch.delenv("TRAINERD_WORKER_CMD", raising=False)
    assert worker_command() == [sys.executable, "-m", "trainerd.worker"]
    monkeypatch.setenv("TRAINERD_WORKER_CMD", "python3 /x/fake.py")
    assert worker_command() == ["python3", "/x/fake.py"]
    assert worker_command(["a", "b"]) == ["a", "b"]
