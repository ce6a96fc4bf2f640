"""File permissions: nothing the daemon or its workers create is readable by other users, even
when started with a wide-open umask, and the daemon does its whole job as an unprivileged user
(nobody, no capabilities) — see ``unprivileged_prefix`` in tests/support/daemon.py for how; what
it publishes (adapters, checkpoints) is readable by its group, whatever library wrote it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.daemon import NOBODY, Daemon, unprivileged_prefix
from workerutil import make_batch, run_worker, sample_lines

pytestmark = pytest.mark.slow


def world_access(root: Path, originals: set[str]) -> list[str]:
    """Paths under ``root`` that others can read, write or enter; the operator's own files that
    the daemon moved (never created) are judged by their folder alone."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                continue  # adapters/current: a link's own mode means nothing
            if name in originals or (name == "data.jsonl" and p.parent.parent.name == "batches"):
                continue
            if mode & 0o007:
                bad.append(f"{p.relative_to(root)} {stat.filemode(mode)}")
    return bad


def test_nothing_created_is_world_readable_and_root_is_not_needed(tiny_model_dir):
    """Started with umask 000 (as nobody where possible): state.db with its -wal/-shm, logs, batch
    folders, checkpoints, adapters, done/failed records are all closed to others, while a good
    file trains to adapter 1 and a bad one is quarantined."""
    base = Path(tempfile.mkdtemp(prefix="trainerd-perms-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "stash").mkdir()
    model = base / "model"
    shutil.copytree(tiny_model_dir, model)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    prefix, why = unprivileged_prefix(base / "stash")
    home = base / "home"
    home.mkdir()
    ddir = base / "d"
    ddir.mkdir(mode=0o755)
    # umask 000: the worst an init system or a shell could hand it.
    # Checkpoints kept past the batch's end (dropped by default since issue 18): their modes are checked.
    d = Daemon(ddir, model, argv_prefix=prefix, umask=0, env={"HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"},
               train={"keep_finished_checkpoints": True})
    if prefix is not None:
        os.chown(home, NOBODY, NOBODY)
        d.root.mkdir(mode=0o700)
        os.chown(d.root, NOBODY, NOBODY)
    try:
        d.start()
        for name, body in (("good.jsonl", "\n".join(sample_lines(20)) + "\n"), ("bad.jsonl", "nope\n")):
            d.drop(name, body, mode=0o644)
        d.wait_for(lambda: d.state_of("good.jsonl") == "done" and d.state_of("bad.jsonl") == "failed", 300)
        # While it runs, so the SQLite -wal and -shm files exist (they go at a clean close).
        assert (d.root / "state.db-wal").exists() and (d.root / "state.db-shm").exists()
        running_bad = world_access(d.root, {"good.jsonl", "bad.jsonl"})
        for f in ("state.db", "state.db-wal", "state.db-shm", "logs/trainerd.jsonl", "daemon.json", "trainerd.pid"):
            assert not os.stat(d.root / f).st_mode & 0o007, f"{f} {stat.filemode(os.stat(d.root / f).st_mode)}"
        assert d.terminate() == 0
        assert running_bad == [], running_bad
        assert world_access(d.root, {"good.jsonl", "bad.jsonl"}) == []
        assert (d.root / "adapters" / "1" / "adapter_model.safetensors").is_file()
        if prefix is None:
            pytest.skip(f"ran as root: {why}")
        owners = {os.lstat(p).st_uid for p in (d.root / "adapters" / "1").iterdir()}
        assert owners == {NOBODY}
        ckpts = list(d.root.glob("batches/*/checkpoints/step-*/*"))
        assert ckpts and {os.lstat(p).st_uid for p in ckpts} == {NOBODY}
    finally:
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


# A reader that is not the owner but is in the owner's group (and one that is in neither): real
# uid/gid switches in a child, as root. The gids need no /etc/group entry: the kernel compares numbers.
_OWNER_UID, _GROUP_GID, _MEMBER_UID, _STRANGER_GID = NOBODY, 41234, 41235, 41236
_READ_ALL = r"""
import os, sys
gid, uid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
refused = []
for top in sys.argv[3:]:
    for dirpath, _, files in os.walk(top, onerror=lambda e: refused.append(e.filename)):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    f.read()
            except PermissionError:
                refused.append(os.path.join(dirpath, name))
print("\n".join(refused))
"""


def _read_as(gid: int, uid: int, *paths: Path) -> list[str]:
    """The files under ``paths`` a process with this uid and only this group cannot read."""
    p = subprocess.run([sys.executable, "-c", _READ_ALL, str(gid), str(uid), *map(str, paths)],
                       capture_output=True, text=True, timeout=60, check=True)
    return [ln for ln in p.stdout.splitlines() if ln]


def test_a_published_adapter_and_its_checkpoint_are_readable_by_the_group(tiny_model_dir):
    """What a worker publishes (the adapter, safetensors' 0600 file included, and a checkpoint) is
    0640/0750: a group member who is not the owner reads every file; a stranger reads none of the weights."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid/gid")
    base = Path(tempfile.mkdtemp(prefix="trainerd-group-", dir="/tmp"))
    os.chmod(base, 0o755)  # pytest's own tmp folders are 0700 to everyone but root
    old = os.umask(0o027)  # the daemon's umask, inherited by its workers
    try:
        batch = make_batch(base, tiny_model_dir, sample_lines(12))
        rc, _, _ = run_worker(batch, "--publish", str(batch / "published"))
        assert rc == 0
    finally:
        os.umask(old)
    try:
        ckpts = sorted((batch / "checkpoints").glob("step-*"))
        published = batch / "published"
        assert ckpts and (published / "adapter_model.safetensors").is_file()
        assert (ckpts[-1] / "adapter_model.safetensors").is_file()
        for tree in (published, ckpts[-1]):
            modes = {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in tree.iterdir()}
            assert set(modes.values()) == {0o640}, modes
            assert stat.S_IMODE(os.lstat(tree).st_mode) == 0o750
        subprocess.run(["chown", "-R", f"{_OWNER_UID}:{_GROUP_GID}", str(batch)], check=True)
        assert _read_as(_GROUP_GID, _MEMBER_UID, published, ckpts[-1]) == []
        stranger = _read_as(_STRANGER_GID, _MEMBER_UID, published, ckpts[-1])
        assert str(published / "adapter_model.safetensors") in stranger or str(published) in stranger
    finally:
        shutil.rmtree(base, ignore_errors=True)
