"""`trainerd logs`: filters, the console rendering (colours only on a terminal), --json passing lines
through, -n, and -f following a real file as it is appended to, rotated (logrotate's move) and
truncated, in a real subprocess."""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import subprocess_env


def line(event: str, level: str = "info", **kw: object) -> str:
    return json.dumps({"timestamp": "2026-12-01T10:00:00.000Z", "level": level, "event": event, **kw})


LINES = [line("supervisor_ready", paused=False),
         line("worker_started", batch=1, attempt=1, pid=10),
         line("memory_stop_decided", "warning", batch=2, attempt=1, usage_bytes=123),
         line("batch_failed", "error", batch=2, reason="bad data"),
         "Traceback (not JSON)",
         line("step", batch=2, attempt=1, step=3, loss=1.5)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "logs").mkdir()
    (tmp_path / "inbox").mkdir()
    (tmp_path / "logs" / "trainerd.jsonl").write_text("\n".join(LINES) + "\n")
    return tmp_path


def logs(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", "logs", "--root", str(root), *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


def test_json_filters_by_batch_and_level(root):
    """--json prints the matching lines byte for byte; --batch and --level combine."""
    out = logs(root, "--json", "--batch", "2", "--level", "warning")
    assert out.returncode == 0
    assert out.stdout.splitlines() == [LINES[2], LINES[3]]
    assert logs(root, "--json", "--level", "error").stdout.splitlines() == [LINES[3]]
    assert logs(root, "--json").stdout.splitlines() == LINES  # no filter: every line, non-JSON too
    assert logs(root, "--json", "-n", "2").stdout.splitlines() == LINES[-2:]


def test_console_rendering_without_a_terminal_has_no_colour(root):
    """Piped: structlog's console layout (timestamp, [level], event, key=value), no escape codes."""
    out = logs(root, "--batch", "2").stdout.splitlines()
    assert len(out) == 3
    assert "[warning  ] memory_stop_decided" in out[0] and "usage_bytes=123" in out[0] and "batch=2" in out[0]
    assert "\x1b[" not in "".join(out)


def test_colours_on_a_terminal(root):
    """With a terminal as stdout the levels and events are coloured."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "trainerd", "logs", "--root", str(root), "--level", "error"],
                         env=subprocess_env(), stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert p.wait(60) == 0
    assert b"\x1b[" in data and b"batch_failed" in data


def test_missing_log_is_a_clear_error(tmp_path):
    """A root with no log file yet (and no -f): exit 66 (no input) naming the path."""
    (tmp_path / "inbox").mkdir()
    out = logs(tmp_path)
    assert out.returncode == 66 and f"no log at {tmp_path}/logs/trainerd.jsonl" in out.stderr


def test_level_warn_is_accepted_as_warning(root):
    """`--level warn` (and WARN) is the same filter as `--level warning`, as the log's own aliases are."""
    want = logs(root, "--json", "--level", "warning")
    assert want.returncode == 0 and want.stdout
    for alias in ("warn", "WARN"):
        out = logs(root, "--json", "--level", alias)
        assert out.returncode == 0 and out.stdout == want.stdout


class Follower:
    """`trainerd logs -f` in a subprocess; its lines arrive on a queue."""

    def __init__(self, root: Path, *args: str):
        # SIGINT as a terminal's Ctrl-C gives it: a pytest started in the background (`cmd &` in a
        # script) ignores SIGINT, its children inherit that, and Python then never raises
        # KeyboardInterrupt — stop() would wait in vain.
        self.p = subprocess.Popen([sys.executable, "-m", "trainerd", "logs", "--root", str(root), "-f", *args],
                                  env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for ln in self.p.stdout:
            self.q.put(ln.rstrip("\n"))

    def take(self, n: int, timeout: float = 20.0) -> list[str]:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got only {out}") from None
        return out

    def quiet(self, s: float = 1.0) -> list[str]:
        time.sleep(s)
        out = []
        while not self.q.empty():
            out.append(self.q.get())
        return out

    def stop(self) -> int:
        self.p.send_signal(signal.SIGINT)
        return self.p.wait(20)


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.write("".join(ln + "\n" for ln in lines))


def test_follow_survives_append_rotation_and_truncation(root):
    """-f prints the last matching lines, then appended ones (a partial line only once complete);
    after logrotate moves the file it finishes the old one and reads the new file at the path;
    after a truncation it reads from the start; Ctrl-C exits 0."""
    log = root / "logs" / "trainerd.jsonl"
    f = Follower(root, "--json", "--batch", "2", "-n", "1")
    try:
        assert f.take(1) == [LINES[5]]
        append(log, line("checkpoint_saved", batch=2, step=4), line("other", batch=1))
        assert f.take(1) == [line("checkpoint_saved", batch=2, step=4)]
        partial = line("stopped", batch=2, reason="memory")
        with open(log, "a") as fh:
            fh.write(partial[:20])
        assert f.quiet() == []
        with open(log, "a") as fh:
            fh.write(partial[20:] + "\n")
        assert f.take(1) == [partial]
        # logrotate: move, then the writer keeps writing the moved file for a moment, then a new file
        os.rename(log, log.with_name("trainerd.jsonl.1"))
        append(log.with_name("trainerd.jsonl.1"), line("late_in_old_file", batch=2))
        append(log, line("first_in_new_file", batch=2))
        assert f.take(2) == [line("late_in_old_file", batch=2), line("first_in_new_file", batch=2)]
        append(log, line("second_in_new_file", batch=2))
        assert f.take(1) == [line("second_in_new_file", batch=2)]
        log.write_text("")  # copytruncate
        time.sleep(0.6)
        append(log, line("after_truncate", batch=2))
        assert f.take(1) == [line("after_truncate", batch=2)]
        assert f.quiet(0.5) == []
    finally:
        rc = f.stop()
    assert rc == 0


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path):
    """-f on a root whose log is not there yet waits for it, then prints its lines."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "inbox").mkdir()
    f = Follower(tmp_path, "--json")
    try:
        assert f.quiet(0.5) == []
        append(tmp_path / "logs" / "trainerd.jsonl", LINES[0])
        assert f.take(1) == [LINES[0]]
    finally:
        assert f.stop() == 0


WRITER = """
import sys, time
from trainerd.core import logs
path, rotate, keep, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
logs.configure(fmt="json", stream=open("/dev/null", "w"), file=path, rotate_bytes=rotate, keep_files=keep)
log = logs.get_logger()
for i in range(first, last):
    log.info("tick", i=i, batch=i % 3, pad="x" * 40)
    time.sleep(0.002)
"""


def write_ticks(log: Path, rotate: int, keep: int, first: int, last: int) -> None:
    """Lines tick i=first..last-1 through trainerd's own log handler, rotating at ``rotate`` bytes."""
    r = subprocess.run([sys.executable, "-c", WRITER, str(log), str(rotate), str(keep), str(first), str(last)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def ticks(lines: list[str]) -> list[int]:
    return [json.loads(ln)["i"] for ln in lines if '"tick"' in ln]


def test_follow_reads_every_line_across_many_rotations_and_compressed_files(root):
    """The daemon's handler rotates a 2 KB log ~30 times while `trainerd logs -f` follows, several
    times between two of its looks: every line arrives once, in order (it reads the rotated files
    it did not see go by, compressed ones too). Then `trainerd logs` reads the same lines back
    across the plain and the gzip files, -n from the newest; with log.keep_files 3 at most 3
    rotated files remain (.1 plain, .2.gz, .3.gz), the oldest lines gone."""
    log = root / "logs" / "trainerd.jsonl"
    log.write_text(line("start") + "\n")
    f = Follower(root, "--json", "-n", "1")
    try:
        assert f.take(1) == [line("start")]
        write_ticks(log, 2000, 50, 0, 400)
        got, deadline = [], time.monotonic() + 60
        while not (ticks(got) and ticks(got)[-1] == 399) and time.monotonic() < deadline:
            got += f.quiet(0.25)
        got += f.quiet(0.5)
        missing = sorted(set(range(400)) - set(ticks(got)))
        assert ticks(got) == list(range(400)), f"missing {missing[:10]}, {len(ticks(got))} lines"
    finally:
        assert f.stop() == 0
    rotated = sorted(p.name for p in log.parent.iterdir() if p.name != log.name)
    assert "trainerd.jsonl.1" in rotated and "trainerd.jsonl.2.gz" in rotated and len(rotated) >= 25
    assert not [n for n in rotated if n.endswith(".tmp")]
    out = logs(root, "--json").stdout.splitlines()
    assert out[0] == line("start") and ticks(out) == list(range(400))
    assert ticks(logs(root, "--json", "-n", "5").stdout.splitlines()) == list(range(395, 400))
    assert ticks(logs(root, "--json", "--batch", "1", "-n", "150").stdout.splitlines()) == list(range(1, 400, 3))[-133:]
    write_ticks(log, 2000, 3, 400, 500)
    rotated = sorted(p.name for p in log.parent.iterdir() if p.name != log.name)
    assert rotated == ["trainerd.jsonl.1", "trainerd.jsonl.2.gz", "trainerd.jsonl.3.gz"], rotated
    kept = ticks(logs(root, "--json").stdout.splitlines())
    assert kept == list(range(kept[0], 500)) and 400 < kept[0] < 470  # a contiguous, bounded tail
