"""The finished-file rule: names, settling, writers still open, and entries that are not files."""

import os
import subprocess
import sys
import time

import pytest

from support.log import ListLog
from trainerd.inbox import Inbox, is_candidate_name, open_for_writing


@pytest.fixture
def inbox(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    return Inbox(d, settle_s=1.0, log=ListLog())


def test_candidate_names():
    """Only *.jsonl that are not dotfiles count; .part and other suffixes never do."""
    assert is_candidate_name("a.jsonl")
    for n in (".a.jsonl", "a.jsonl.part", ".a.jsonl.part", "a.json", "a.txt", ".jsonl"):
        assert not is_candidate_name(n)


def test_file_must_settle(inbox):
    """A file is ready only after settle_s without size/mtime change; a change restarts the clock."""
    f = inbox.dir / "a.jsonl"
    f.write_text("x\n")
    t = 1000.0
    ready, _, recheck = inbox.scan(t)
    assert ready == [] and recheck == t + 1.0
    f.write_text("x\ny\n")
    assert inbox.scan(t + 0.9)[0] == []
    assert inbox.scan(t + 1.5)[0] == []  # changed at t+0.9: settles at t+1.9
    assert inbox.scan(t + 1.9)[0] == ["a.jsonl"]


def test_open_for_writing_is_not_taken(inbox):
    """A file some process still has open for writing (a slow cp) is not taken until closed."""
    f = inbox.dir / "slow.jsonl"
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; f=open(sys.argv[1],'w'); f.write('{}\\n'); f.flush(); time.sleep(30)",
                               str(f)])
    try:
        deadline = time.monotonic() + 10
        while not (f.exists() and f.stat().st_size):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert open_for_writing(f) == writer.pid
        assert inbox.scan(1000.0)[0] == []
        assert inbox.scan(2000.0)[0] == []  # settled long ago, still open
    finally:
        writer.kill()
        writer.wait()
    assert open_for_writing(f) is None
    assert inbox.scan(3000.0)[0] == ["slow.jsonl"]


def test_reader_does_not_block(inbox):
    """A file open read-only elsewhere is still taken."""
    f = inbox.dir / "r.jsonl"
    f.write_text("{}\n")
    with open(f):
        assert open_for_writing(f) is None
        inbox.scan(0.0)
        assert inbox.scan(5.0)[0] == ["r.jsonl"]


def test_cp_and_rename_both_work(inbox, tmp_path):
    """A plain cp into the inbox and a write-then-rename both become ready once settled."""
    src = tmp_path / "src.jsonl"
    src.write_text('{"text": "hi"}\n' * 1000)
    subprocess.run(["cp", str(src), str(inbox.dir / "copied.jsonl")], check=True)
    (inbox.dir / ".tmp.part").write_text("{}\n")
    os.rename(inbox.dir / ".tmp.part", inbox.dir / "renamed.jsonl")
    inbox.scan(0.0)
    assert sorted(inbox.scan(2.0)[0]) == ["copied.jsonl", "renamed.jsonl"]


def test_non_regular_entries_rejected_unread(inbox, tmp_path):
    """A symlink, FIFO or directory named *.jsonl is reported as rejected and never opened."""
    outside = tmp_path / "outside.fifo"
    os.mkfifo(outside)  # opening it (following the link) would block this test forever
    os.symlink(outside, inbox.dir / "link.jsonl")
    os.mkfifo(inbox.dir / "pipe.jsonl")
    (inbox.dir / "dir.jsonl").mkdir()
    ready, rejected, _ = inbox.scan(0.0)
    ready2, _, _ = inbox.scan(10.0)
    assert ready == ready2 == []
    kinds = {r.name: r.kind for r in rejected}
    assert kinds == {"link.jsonl": "symlink", "pipe.jsonl": "FIFO", "dir.jsonl": "directory"}


def test_writer_check_throttled_per_file(tmp_path):
    """A settled file that stays open is re-checked for writers at most every WRITER_RECHECK_S."""
    from trainerd.inbox import WRITER_RECHECK_S

    d = tmp_path / "inbox"
    d.mkdir()
    calls = []

    def counting_check(path):
        calls.append(path)
        return open_for_writing(path)

    box = Inbox(d, settle_s=0.0, log=ListLog(), writer_check=counting_check)
    f = d / "held.jsonl"
    with open(f, "w") as w:
        w.write("{}\n")
        w.flush()
        assert box.scan(100.0)[0] == [] and len(calls) == 1
        ready, _, recheck = box.scan(100.5)
        assert ready == [] and len(calls) == 1 and recheck == 100.0 + WRITER_RECHECK_S
    assert box.scan(100.0 + WRITER_RECHECK_S)[0] == ["held.jsonl"] and len(calls) == 2
