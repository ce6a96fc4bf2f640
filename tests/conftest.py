"""Shared fixtures: the tiny offline model, memory cgroups, real daemons, and a guard that fails any
test leaking a process. The helpers behind them live in tests/support/."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    # Orphans (a worker whose supervisor was SIGKILLed) re-parent to us instead of init, so the
    # leak check below sees them and can kill them.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # pragma: no cover - non-Linux
        pass


_become_subreaper()


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template, built offline once per session."""
    from trainerd.worker.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def memcg():
    """Factory for real memory cgroups; skips with the reason where none can be created."""
    from tests import cgroups

    reason = cgroups.unavailable_reason()
    if reason:
        pytest.skip(f"cannot create a memory cgroup: {reason}")
    made: list = []

    def make(limit_bytes: int):
        cg = cgroups.create(limit_bytes)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()


@pytest.fixture
def daemon_factory(request, tmp_path):
    """Factory for real daemons (tests/support/daemon.py), on ``tmp_path`` and the tiny model unless
    told otherwise; each one still running at the end is stopped (SIGTERM, then SIGKILL)."""
    from support.daemon import Daemon

    made: list = []

    def make(*, tmp: Path | None = None, model_dir: Path | str | None = None, **kw):
        if model_dir is None:
            model_dir = request.getfixturevalue("tiny_model_dir")  # only built when needed
        d = Daemon(tmp or tmp_path, model_dir, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def shm_tmp(tmp_path):
    """A fresh folder on /dev/shm when that is a tmpfs, else ``tmp_path``: for tests whose point is
    many batches through the real code, not durability (a tmpfs makes each fsync free; on this
    machine's disk one costs ~9 ms, and a batch does ~30). Removed afterwards."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 1 << 30):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="trainerd-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a trainerd subprocess: the repo importable, offline, quiet tokenizers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _descendants() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail the test if it leaves any process behind (after a short grace to exit)."""
    before = _descendants()
    yield
    deadline = time.monotonic() + 5.0
    leaked: list[psutil.Process] = []
    while True:
        leaked = []
        for pid in _descendants() - before:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    leaked.append(p)
                else:
                    os.waitpid(pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if leaked:
        desc = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in leaked if p.is_running()]
        for p in leaked:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leaked, timeout=5)
        if desc:
            pytest.fail(f"test leaked processes: {desc}")
