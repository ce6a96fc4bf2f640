"""A hostile and broken inbox against ONE real daemon (tiny model), run as an unprivileged user.

Every entry of the corpus below is dropped into the inbox of a single `trainerd run` at once;
then two files are damaged while they train (truncated, deleted); then one more good file
proves the daemon still serves. Each case then checks its own outcome: the ledger state, the
reason in the log and in ``failed/<name>.error.json``, and that the original bytes are kept
(byte for byte). inotify watches on the targets outside the root prove the daemon never opened
them.

The daemon runs as ``nobody`` with no capabilities (setpriv) so that an unreadable file is
really unreadable to it (root bypasses file permissions) — which also proves it never needs
root. The interpreter lives under /root (mode 0700), so the daemon gets a private mount
namespace where /root is a tmpfs with only the interpreter's tree bind-mounted in; nothing
changes outside that namespace (``unprivileged_prefix`` in tests/support/daemon.py). Where that
is impossible (not root, no unshare), the daemon runs as the current user and the unreadable
case is skipped with the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from support.daemon import NOBODY, Daemon, unprivileged_prefix
from trainerd.supervisor.ledger import Ledger
from workerutil import sample_lines

pytestmark = pytest.mark.slow

BOM = b"\xef\xbb\xbf"


def _lines(*objs: Any, end: bytes = b"\n") -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + end for o in objs)


def _good(n: int, start: int, end: bytes = b"\n") -> bytes:
    return b"".join(l.encode() + end for l in sample_lines(n, start=start))


# --- the corpus ----------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    name: str                      # name in the inbox
    expect: str                    # done | failed | rejected | unmovable | ignored | skipped
    needle: str = ""               # in the reason (error.json and log)
    data: bytes | None = None      # for regular files
    kind: str = "file"             # file | dir | foreign-dir | fifo | socket | symlink-fifo | symlink-file
    #                                  | hardlink | unreadable
    bad_lines: list[int] = field(default_factory=list)  # line numbers error.json must list first


HUGE = 100 * 1024 * 1024  # a 100 MB single line


def corpus() -> list[Case]:
    nested = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    mixed_bad = _lines(b"not json", {"x": 1}, {"text": 5}, b"\xff\xfe", {"prompt": "only"}, b"[1, 2]")
    c = [
        Case("empty", "empty.jsonl", "failed", "the file is empty or only blank lines", b""),
        Case("blank-lines", "blank.jsonl", "failed", "the file is empty or only blank lines", b"\n\n   \n\r\n\t\n"),
        Case("bom", "bom.jsonl", "done", data=BOM + _good(6, 100)),
        Case("crlf", "crlf.jsonl", "done", data=_good(6, 200, end=b"\r\n")),
        Case("invalid-utf8", "latin1.jsonl", "failed", "invalid UTF-8",
             "{\"text\": \"caf\xe9 cr\xe8me\"}\n".encode("latin-1") * 3, bad_lines=[1, 2, 3]),
        Case("nul-bytes", "nul.jsonl", "failed", "NUL byte", b'{"text": "a\x00b"}\n\x00\x00\x00\n',
             bad_lines=[1, 2]),
        Case("json-array-one-line", "array.jsonl", "failed", "expected a JSON object per line, got array",
             json.dumps([{"text": "a"}, {"text": "b"}]).encode() + b"\n", bad_lines=[1]),
        Case("json-array-pretty", "array-pretty.jsonl", "failed", "invalid JSON",
             json.dumps([{"text": "a"}, {"text": "b"}], indent=2).encode() + b"\n", bad_lines=[1, 2]),
        Case("wrong-shape", "shape.jsonl", "failed", "no training fields", _lines({"input": "a", "output": "b"}),
             bad_lines=[1]),
        Case("scalars", "scalars.jsonl", "failed", "expected a JSON object per line, got number",
             _lines(b"42", b'"text"', b"null"), bad_lines=[1, 2, 3]),
        Case("missing-field", "missing.jsonl", "failed", "missing field 'completion'", _lines({"prompt": "Q?"}),
             bad_lines=[1]),
        Case("empty-field", "empty-field.jsonl", "failed", "field 'text' is empty", _lines({"text": "   "}),
             bad_lines=[1]),
        Case("field-not-string", "number-text.jsonl", "failed", "field 'text' must be a string, got number",
             _lines({"text": 12}), bad_lines=[1]),
        Case("wrong-role", "roles.jsonl", "failed", "messages[1].role must be one of system, user, assistant",
             _lines({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
             bad_lines=[1]),
        Case("no-assistant", "no-assistant.jsonl", "failed", "messages has no assistant turn",
             _lines({"messages": [{"role": "user", "content": "hi"}]}), bad_lines=[1]),
        Case("empty-messages", "no-messages.jsonl", "failed", "field 'messages' is empty", _lines({"messages": []}),
             bad_lines=[1]),
        Case("ambiguous", "ambiguous.jsonl", "failed", "ambiguous line",
             _lines({"text": "a", "prompt": "b", "completion": "c"}), bad_lines=[1]),
        Case("nested-deep", "nested.jsonl", "failed", "nested too deeply", nested + b"\n", bad_lines=[1]),
        Case("huge-line", "huge.jsonl", "failed", "longer than data.max_line_bytes", None, bad_lines=[1]),
        Case("only-bad-lines", "all-bad.jsonl", "failed", "all 6 non-blank lines are bad", mixed_bad,
             bad_lines=[1, 2, 3, 4, 5, 6]),
        Case("98-percent-good", "98.jsonl", "failed", "too many bad lines: 2 of 100",
             _good(49, 300) + b"{broken\n" + _good(49, 349) + b"{broken\n", bad_lines=[50, 100]),
        Case("99-percent-good", "99.jsonl", "done", data=_good(50, 400) + b"{broken\n" + _good(49, 450)),
        Case("name-spaces", "my training data.jsonl", "failed", "invalid JSON", _lines(b"nope sp")),
        Case("name-unicode", "données-日本語-😀.jsonl", "failed", "invalid JSON", _lines(b"nope uni")),
        Case("name-newline", "two\nlines.jsonl", "failed", "invalid JSON", _lines(b"nope nl")),
        Case("name-leading-dash", "-rf --no-preserve-root.jsonl", "failed", "invalid JSON", _lines(b"nope dash")),
        Case("name-all-of-them-good", "- ünï cödé\nand space.jsonl", "done", data=_good(6, 500)),
        Case("directory", "dir.jsonl", "rejected", "not a regular file (directory); never read", kind="dir"),
        Case("directory-of-another-user", "root-dir.jsonl", "unmovable", "not a regular file (directory); never read",
             kind="foreign-dir"),
        Case("fifo", "pipe.jsonl", "rejected", "not a regular file (FIFO); never read", kind="fifo"),
        Case("socket", "sock.jsonl", "rejected", "not a regular file (socket); never read", kind="socket"),
        Case("symlink-to-outside-fifo", "link-fifo.jsonl", "rejected", "not a regular file (symlink); never read",
             kind="symlink-fifo"),
        Case("symlink-to-outside-file", "link-file.jsonl", "rejected", "not a regular file (symlink); never read",
             kind="symlink-file"),
        Case("hard-link", "hard.jsonl", "done", data=_good(6, 600), kind="hardlink"),
        Case("unreadable", "secret.jsonl", "failed", "cannot read the claimed file: Permission denied",
             _good(6, 700), kind="unreadable"),
        Case("duplicate-content", "bom-again.jsonl", "skipped", data=BOM + _good(6, 100)),
        Case("dotfile", ".hidden.jsonl", "ignored", data=_good(3, 800)),
        Case("part-file", "upload.jsonl.part", "ignored", data=_good(3, 810)),
        Case("other-suffix", "notes.txt", "ignored", data=_good(3, 820)),
    ]
    return c


CASES = corpus()

# --- inotify: proof that nothing outside the root was opened ------------------------------------

IN_ACCESS, IN_OPEN = 0x1, 0x20


class OpenWatch:
    """inotify IN_OPEN|IN_ACCESS on paths; ``events()`` lists (path, mask) seen since."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.wds: dict[int, str] = {}

    def add(self, path: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN | IN_ACCESS)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.wds[wd] = str(path)

    def events(self) -> list[tuple[str, int]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, i)
                out.append((self.wds.get(wd, "?"), mask))
                i += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# --- the one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    daemon: Daemon
    root: Path
    outside: Path
    originals: dict[str, str]              # name -> sha256 of the bytes dropped
    batches: dict[str, dict[str, Any]]     # name -> ledger row
    logs: list[dict[str, Any]]
    outside_opens: list[tuple[str, int]]
    unprivileged: bool
    why_not_unprivileged: str
    dynamic: dict[str, Any]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _place(case: Case, inbox: Path, outside: Path, owner: int | None) -> str | None:
    """Create the case's inbox entry; return the sha256 of its bytes (None for non-files)."""
    p = inbox / case.name
    if case.kind in ("dir", "foreign-dir"):
        p.mkdir()
        (p / "inside.jsonl").write_bytes(_good(2, 900))
        if case.kind == "dir" and owner is not None:
            os.chown(p, owner, owner)  # dropped by the daemon's own user (moving a directory
            # needs write access to the directory itself; another user's stays: next case)
        return None
    if case.kind == "fifo":
        os.mkfifo(p)
        return None
    if case.kind == "socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.close()  # the socket file stays
        return None
    if case.kind == "symlink-fifo":
        os.symlink(outside / "secret.fifo", p)
        return None
    if case.kind == "symlink-file":
        os.symlink(outside / "secret.jsonl", p)
        return None
    tmp = inbox / f".{case.id}.part"  # write elsewhere (a dotfile), then rename: the convention
    if case.id == "huge-line":
        with open(tmp, "wb") as f:
            f.write(b'{"text": "')
            block = b"x" * (1 << 20)
            for _ in range(HUGE // len(block)):
                f.write(block)
            f.write(b'"}\n')
    elif case.kind == "hardlink":
        src = outside / "linked.jsonl"
        src.write_bytes(case.data or b"")
        os.chmod(src, 0o644)
        os.link(src, tmp)
    else:
        tmp.write_bytes(case.data or b"")
        os.chmod(tmp, 0o000 if case.kind == "unreadable" else 0o644)
    sha = _sha(tmp)
    os.rename(tmp, p)
    return sha


def _batch_id(d: Daemon, name: str) -> int | None:
    b = d.batch(name)
    return b["id"] if b else None


@pytest.fixture(scope="module")
def run(tiny_model_dir) -> Run:
    # A world-traversable place (tmp_path's parents are 0700): the root belongs to nobody.
    base = Path(tempfile.mkdtemp(prefix="trainerd-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    stash = base / "stash"
    stash.mkdir()
    model = base / "model"
    shutil.copytree(tiny_model_dir, model)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    outside = base / "outside"
    outside.mkdir(mode=0o755)
    os.mkfifo(outside / "secret.fifo", 0o666)       # reading it through a link would hang the daemon
    (outside / "secret.jsonl").write_bytes(_good(3, 950))
    os.chmod(outside / "secret.jsonl", 0o644)        # readable by nobody: only inotify tells
    home = base / "home"
    home.mkdir()
    prefix, why = unprivileged_prefix(stash)
    if prefix is not None:
        os.chown(home, NOBODY, NOBODY)
    daemon_dir = base / "d"
    daemon_dir.mkdir(mode=0o755)
    d = Daemon(daemon_dir, model, argv_prefix=prefix, env={"HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"},
               supervisor={"settle_s": 0.3, "rescan_s": 0.5, "stop_grace_s": 60})
    d.root.mkdir(mode=0o750)
    if prefix is not None:
        os.chown(d.root, NOBODY, NOBODY)
    watch = OpenWatch()
    try:
        d.start()
        inbox = d.root / "inbox"
        watch.add(outside / "secret.fifo")
        watch.add(outside / "secret.jsonl")
        originals: dict[str, str] = {}
        for case in CASES:
            if case.kind == "unreadable" and prefix is None:
                continue
            sha = _place(case, inbox, outside, NOBODY if prefix is not None else None)
            if sha is not None:
                originals[case.name] = sha

        def settled() -> bool:
            st = d.status()
            by = {b["file"]: b["state"] for b in st["batches"]}
            for case in CASES:
                if case.expect in ("done", "failed", "skipped") and not (case.kind == "unreadable" and prefix is None):
                    if by.get(case.name) != case.expect:
                        return False
                if (case.expect == "rejected" or case.expect == "unmovable" and prefix is None) and \
                        not os.path.lexists(d.root / "failed" / f"{case.name}.error.json"):
                    return False
            return st["running"] is None

        d.wait_for(settled, 600)

        # --- damaged while training -----------------------------------------------------------
        dynamic: dict[str, Any] = {}
        long = _good(3000, 10_000)
        for name in ("truncated.jsonl", "deleted.jsonl"):
            d.drop(name, long if name == "truncated.jsonl" else _good(3000, 20_000), mode=0o644)
            d.wait_for(lambda: _batch_id(d, name) is not None, 60)
            bid = _batch_id(d, name)
            d.wait_for(lambda: d.progress_step(bid) >= 2, 300)
            data = d.root / "batches" / f"{bid:06d}" / "data.jsonl"
            if name == "truncated.jsonl":
                os.truncate(data, len(long) // 10)
                dynamic["truncated_sha"] = hashlib.sha256(long[: len(long) // 10]).hexdigest()
            else:
                os.unlink(data)
                # The open worker could read on from the unlinked inode; a pause makes it
                # checkpoint and exit, so the next start must face the missing file.
                (d.root / ".stop").write_text("")
                d.wait_for(lambda: d.status()["running"] is None, 120)
                (d.root / ".stop").unlink()
            d.wait_for(lambda: d.state_of(name) in ("failed", "done"), 300)

        # --- the daemon still serves -----------------------------------------------------------
        after = _good(6, 30_000)
        originals["after.jsonl"] = hashlib.sha256(after).hexdigest()
        d.drop("after.jsonl", after, mode=0o644)
        d.wait_for(lambda: d.state_of("after.jsonl") == "done", 300)

        led = Ledger.open_readonly(d.root / "state.db")
        try:
            rows = {b.name: asdict(b) for b in led.batches()}
        finally:
            led.close()
        opens = watch.events()
        (outside / "secret.jsonl").read_bytes()  # positive control: the watch does see an open
        dynamic["control_events"] = watch.events()
        assert d.terminate() == 0
        yield Run(d, d.root, outside, originals, rows, d.logs(), opens, prefix is not None, why, dynamic)
    finally:
        watch.close()
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


# --- the checks ------------------------------------------------------------------------------------


def _events(run: Run, event: str, name: str) -> list[dict[str, Any]]:
    return [e for e in run.logs if e["event"] == event and e.get("file") == name]


def _error_json(run: Run, name: str) -> dict[str, Any]:
    return json.loads((run.root / "failed" / f"{name}.error.json").read_text())


def test_corpus_is_big_enough():
    """Issue 5 asks for at least 30 hostile or broken inbox cases."""
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_outcome(run, case):
    """Each entry ends where it should (done/failed/rejected/ignored/skipped) with a clear reason in the
    log and in failed/<name>.error.json, and its original bytes are kept byte for byte."""
    if case.kind == "unreadable" and not run.unprivileged:
        pytest.skip(f"the daemon runs as root here, which reads any file: {run.why_not_unprivileged}")
    b = run.batches.get(case.name)
    if case.expect == "done":
        assert b and b["state"] == "done" and b["adapter_version"], b
        assert _sha(run.root / "done" / case.name) == run.originals[case.name]
    elif case.expect == "skipped":
        assert b and b["state"] == "skipped", b
        assert _sha(run.root / "done" / case.name) == run.originals[case.name]
        dup = json.loads((run.root / "done" / f"{case.name}.duplicate.json").read_text())
        assert dup["duplicate_of"] == run.batches["bom.jsonl"]["id"]
        assert _events(run, "duplicate_skipped", case.name)
    elif case.expect == "failed":
        assert b and b["state"] == "failed", b
        err = _error_json(run, case.name)
        assert case.needle in err["reason"], err
        assert err["file"] == case.name
        if case.bad_lines:
            assert [e["line"] for e in err["errors"]][: len(case.bad_lines)] == case.bad_lines, err["errors"]
            assert all(case.needle in e["reason"] for e in err["errors"][:1]) or case.id in (
                "only-bad-lines", "98-percent-good", "json-array-pretty"), err["errors"]
        failed_log = _events(run, "batch_failed", case.name)
        assert failed_log and case.needle in failed_log[-1]["reason"], failed_log
        assert _sha(run.root / "failed" / case.name) == run.originals[case.name]
        assert b["attempts"] <= 1, "bad data is not retried"
    elif case.expect == "rejected":
        assert b is None, "a non-regular entry must never become a batch"
        moved = run.root / "failed" / case.name
        err = _error_json(run, case.name)
        assert err["reason"] == case.needle and err["file"] == case.name
        logged = _events(run, "inbox_entry_rejected", case.name)
        assert logged and logged[0]["reason"] == case.needle
        mode = os.lstat(moved).st_mode
        expect_kind = {"dir": stat.S_ISDIR, "fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK,
                       "symlink-fifo": stat.S_ISLNK, "symlink-file": stat.S_ISLNK}[case.kind]
        assert expect_kind(mode), "the entry is moved as it is, not replaced"
        if case.kind.startswith("symlink"):
            target = run.outside / ("secret.fifo" if case.kind == "symlink-fifo" else "secret.jsonl")
            assert os.readlink(moved) == str(target)
        if case.kind == "dir":
            assert (moved / "inside.jsonl").read_bytes() == _good(2, 900)
    elif case.expect == "unmovable":
        if not run.unprivileged:
            pytest.skip("the daemon runs as root here and can move any directory")
        assert b is None
        assert (run.root / "inbox" / case.name / "inside.jsonl").read_bytes() == _good(2, 900)
        logged = _events(run, "inbox_entry_unmovable", case.name)
        assert len(logged) == 1, f"logged {len(logged)} times: once is clear, every rescan is spam"
        assert logged[0]["reason"] == case.needle and "Permission denied" in logged[0]["error"]
    elif case.expect == "ignored":
        assert b is None
        assert (run.root / "inbox" / case.name).is_file(), "a non-candidate name is left alone"
    else:  # pragma: no cover
        raise AssertionError(case.expect)


def test_nothing_outside_the_root_was_opened(run):
    """inotify saw no open or read of the symlinks' targets outside the root (the FIFO would have hung)."""
    assert run.dynamic["control_events"], "the inotify watch saw nothing even when the test opened the file"
    assert run.outside_opens == []
    assert (run.outside / "secret.jsonl").read_bytes() == _good(3, 950)


def test_hard_link_warned_and_outside_name_untouched(run):
    """A hard-linked inbox file trains (it is a regular file) with a warning; the other name keeps its bytes."""
    warn = [e for e in run.logs if e["event"] == "inbox_file_hard_linked" and e.get("file") == "hard.jsonl"]
    assert warn and warn[0]["links"] == 2
    assert (run.outside / "linked.jsonl").read_bytes() == _good(6, 600)


def test_truncated_while_training_fails_with_reason(run):
    """A claimed file truncated mid-training fails as changed data (not a crash loop); the bytes left are kept."""
    b = run.batches["truncated.jsonl"]
    assert b["state"] == "failed" and b["crashes"] == 0
    err = _error_json(run, "truncated.jsonl")
    assert "data file changed" in err["reason"], err
    assert _sha(run.root / "failed" / "truncated.jsonl") == run.dynamic["truncated_sha"]
    assert _events(run, "batch_failed", "truncated.jsonl")


def test_deleted_while_training_fails_with_reason(run):
    """A claimed file deleted mid-training fails with a reason naming the missing data, in the log and in
    failed/<name>.error.json, although there are no bytes left to keep."""
    b = run.batches["deleted.jsonl"]
    assert b["state"] == "failed" and b["crashes"] == 0
    err = _error_json(run, "deleted.jsonl")
    assert "missing" in err["reason"], err
    assert not os.path.lexists(run.root / "failed" / "deleted.jsonl")
    assert _events(run, "batch_failed", "deleted.jsonl")


def test_daemon_kept_serving_and_ran_unprivileged(run):
    """After the whole corpus the next good file still trains; the daemon and its workers ran as nobody."""
    assert run.batches["after.jsonl"]["state"] == "done"
    if not run.unprivileged:
        pytest.skip(f"could not run the daemon unprivileged: {run.why_not_unprivileged}")
    made = [run.root / "state.db", run.root / "logs" / "trainerd.jsonl", *run.root.glob("batches/*/settings.json"),
            *run.root.glob("batches/*/result.json"), *run.root.glob("batches/*/checkpoints/step-*/*"),
            *run.root.glob("adapters/*/*"), *run.root.glob("failed/*.error.json")]
    assert len(made) > 50
    wrong = [str(p) for p in made if os.lstat(p).st_uid != NOBODY]
    assert wrong == [], "created by someone other than the unprivileged daemon and its workers"
    started = [e for e in run.logs if e["event"] == "worker_started"]
    assert started


def test_no_kernel_oom_kill_and_no_crash(run):
    """Hostile input never crashes a worker or the daemon: no crashes counted, no OOM kill."""
    assert all(b["crashes"] == 0 for b in run.batches.values()), {n: b["crashes"] for n, b in run.batches.items()}
    assert not [e for e in run.logs if e["event"] in ("kernel_oom_kill", "worker_crashed")]
