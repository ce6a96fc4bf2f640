"""The finished-file rule: names, settling, writers still open, and entries that are not files."""

import contextlib
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.log import ListLog
from trainerd.supervisor.inbox import Inbox, is_candidate_name, is_inbox_name, open_for_writing
from trainerd.supervisor.writers import WriterWalk


@contextlib.contextmanager
def held_open(path):
    """A real process that has written a line to ``path`` and keeps it open for writing."""
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; f=open(sys.argv[1],'w'); f.write('{}\\n'); f.flush(); time.sleep(30)",
                               str(path)])
    try:
        deadline = time.monotonic() + 10
        while not (path.exists() and path.stat().st_size):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield writer
    finally:
        writer.kill()
        writer.wait()


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
    with held_open(f) as writer:
        assert open_for_writing(f) == writer.pid
        assert inbox.scan(1000.0)[0] == []
        assert inbox.scan(2000.0)[0] == []  # settled long ago, still open
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


def _counting_inbox(tmp_path, **kw):
    """An inbox on tmp_path/inbox that keeps every /proc walk it makes (a real WriterWalk)."""
    d = tmp_path / "inbox"
    d.mkdir()
    walks: list[WriterWalk] = []

    def counting_walk(targets):
        walks.append(WriterWalk(targets))
        return walks[-1]

    return Inbox(d, settle_s=0.0, log=ListLog(), walk=counting_walk, **kw), walks


def test_writer_check_throttled_per_file(tmp_path):
    """A settled file that stays open is walked for again at most every WRITER_RECHECK_S."""
    from trainerd.supervisor.inbox import WRITER_RECHECK_S

    box, walks = _counting_inbox(tmp_path)
    f = box.dir / "held.jsonl"
    with open(f, "w") as w:
        w.write("{}\n")
        w.flush()
        assert box.scan(100.0)[0] == [] and len(walks) == 1
        ready, _, recheck = box.scan(100.5)
        assert ready == [] and len(walks) == 1 and recheck == 100.0 + WRITER_RECHECK_S
    assert box.scan(100.0 + WRITER_RECHECK_S)[0] == ["held.jsonl"] and len(walks) == 2


def test_one_walk_per_scan_for_every_file_in_doubt(tmp_path):
    """However many settled files are in doubt, a scan walks /proc once, for all of them: 200
    renamed-in files are ready, the one a real process still has open for writing is not."""
    box, walks = _counting_inbox(tmp_path)
    d = box.dir
    for i in range(200):
        (tmp_path / f"{i}.part").write_text("{}\n")
        os.rename(tmp_path / f"{i}.part", d / f"f{i:03d}.jsonl")
    with held_open(d / "held.jsonl") as writer:
        ready, _, _ = box.scan(1000.0)
        assert len(walks) == 1 and len(walks[0].targets) == 201
        assert walks[0].found and list(walks[0].found.values()) == [writer.pid]
        assert sorted(ready) == [f"f{i:03d}.jsonl" for i in range(200)]


def test_writer_walk_in_slices_finds_the_writer(tmp_path):
    """A walk stepped with a deadline already past looks at one process per step, and still
    finds the writer by the end; a file only read elsewhere is not reported."""
    f = tmp_path / "w.jsonl"
    r = tmp_path / "r.jsonl"
    r.write_text("{}\n")
    with open(f, "w"), open(r):
        st, sr = os.stat(f), os.stat(r)
        walk = WriterWalk({(st.st_dev, st.st_ino), (sr.st_dev, sr.st_ino)})
        steps = 1
        while not walk.step(0.0):
            steps += 1
        assert steps >= walk.processes_seen > 1
        assert walk.found == {(st.st_dev, st.st_ino): os.getpid()}


def test_closed_file_needs_no_walk(tmp_path):
    """A file written straight into the watched inbox and closed (inotify's close-after-write) is
    taken once settled without any /proc walk; touched again after the close, it is walked for."""
    box, walks = _counting_inbox(tmp_path)
    box.start_watching(lambda: None)
    try:
        f = box.dir / "copied.jsonl"
        with open(f, "w") as w:
            w.write('{"text": "hi"}\n')
        st = os.stat(f)
        deadline = time.monotonic() + 10
        while not box.closes.unchanged_since_close(st):  # the observer's thread records the close
            assert time.monotonic() < deadline, "no close event"
            time.sleep(0.02)
        assert box.scan(100.0)[0] == ["copied.jsonl"] and walks == []
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # changed since the close: in doubt again
        assert box.scan(200.0)[0] == ["copied.jsonl"] and len(walks) == 1
    finally:
        box.stop_watching()


def test_data_waits_for_its_eval_file_and_a_lone_one_is_reported(tmp_path):
    """name.jsonl waits while name.eval.jsonl is still changing, and both are ready together; an
    eval file alone is never ready and is reported once; a compressed eval file is reported."""
    from trainerd.supervisor.inbox import LONE_EVAL_REPORT_S

    d = tmp_path / "inbox"
    d.mkdir()
    log = ListLog()
    box = Inbox(d, settle_s=1.0, log=log)
    (d / "a.jsonl").write_text("{}\n")
    (d / "a.eval.jsonl").write_text("{}\n")
    (d / "lone.eval.jsonl").write_text("{}\n")
    (d / "c.eval.jsonl.gz").write_bytes(b"\x1f\x8b")
    box.scan(100.0)
    (d / "a.eval.jsonl").write_text("{}\n{}\n")  # still being written
    assert box.scan(101.0)[0] == []  # a.jsonl settled, its eval file not
    assert box.scan(102.0)[0] == ["a.jsonl"]
    assert log.find("eval_file_compressed") and not log.find("eval_file_alone")
    box.scan(100.0 + LONE_EVAL_REPORT_S)
    box.scan(101.0 + LONE_EVAL_REPORT_S)
    alone = log.find("eval_file_alone")
    assert [e["file"] for e in alone] == ["lone.eval.jsonl"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["", ".", "a", "eval", ".eval", ".jsonl", ".gz", ".zst", ".part", "\n"]),
                min_size=1, max_size=5).map("".join))
def test_name_rules_follow_the_contract(name):
    """The inbox's name rules (compiled for speed) say what the contract's suffixes say: a data
    suffix, not a dot-file, something before the suffix; a candidate is not an eval file."""
    from trainerd.core.contract import data_suffix

    suffix = data_suffix(name)
    inbox_name = suffix is not None and not name.startswith(".") and len(name) > len(suffix)
    assert is_inbox_name(name) == inbox_name
    assert is_candidate_name(name) == (inbox_name and not name[: -len(suffix)].endswith(".eval"))
