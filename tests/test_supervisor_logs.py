"""trainerd.core.logs: JSON lines with timestamp/level/event, bound fields, and logrotate safety."""

import io
import json
import os

from trainerd.core import logs


def test_json_lines_have_required_fields(tmp_path):
    """Every line is one JSON object with timestamp, level, event first, then bound fields."""
    out = io.StringIO()
    logs.configure(fmt="json", file=tmp_path / "t.jsonl", stream=out)
    logs.get_logger(batch=3).bind(attempt=2).warning("worker_started", pid=10)
    line = json.loads(out.getvalue().splitlines()[-1])
    assert list(line)[:5] == ["timestamp", "level", "event", "batch", "attempt"]
    assert line["level"] == "warning" and line["pid"] == 10
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1]) == line


def test_file_reopened_after_rotation(tmp_path):
    """After logrotate renames the file away, the next line goes to a new file at the same path."""
    path = tmp_path / "t.jsonl"
    logs.configure(fmt="json", file=path, stream=io.StringIO())
    log = logs.get_logger()
    log.info("before_rotation")
    os.rename(path, tmp_path / "t.jsonl.1")
    log.info("after_rotation")
    assert json.loads(path.read_text())["event"] == "after_rotation"
    assert json.loads((tmp_path / "t.jsonl.1").read_text())["event"] == "before_rotation"


def test_console_format_is_human_readable():
    """fmt=console renders a readable line, not JSON."""
    out = io.StringIO()
    logs.configure(fmt="console", stream=out)
    logs.get_logger().info("paused", stop_file="/x/.stop")
    text = out.getvalue()
    assert "paused" in text and "stop_file=/x/.stop" in text and not text.startswith("{")


def test_broken_stdout_pipe_goes_quiet(tmp_path):
    """A process logging to a pipe whose reader died neither crashes nor spams stderr."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import time, sys\nfrom trainerd.core import logs\nlogs.configure(fmt='json')\nlog = logs.get_logger()\n"
            "log.info('first')\ntime.sleep(0.5)\nfor i in range(50): log.info('after_reader_died', i=i)\n"
            "print('survived', file=sys.stderr)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert b"first" in p.stdout.readline()
    p.stdout.close()  # the reader (the supervisor) is gone
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0
    assert err.decode().strip() == "survived"
