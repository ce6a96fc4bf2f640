"""Chaos against the real daemon (tiny model, CPU): random kills and pauses, and crashes injected
inside checkpoint writes and adapter publishes. The promise under test: every batch is done
exactly once, the ledger agrees with the folders, no process is left behind, no half-written
adapter is ever `current`, and the adapters are bit-identical to an undisturbed run's.

The same three files, in the same order, go through an undisturbed daemon once (the
reference, module-scoped), through a daemon whose worker and supervisor are killed and paused
at seeded random moments, and through a daemon restarted with each fault injection point
(``TRAINERD_FAULT``, docs/architecture.md) in turn.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import struct
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from support.daemon import Daemon
from support.procsig import has_signal
from trainerd.supervisor.ledger import Ledger
from workerutil import sample_lines

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("TRAINERD_CHAOS_SEED", "20261122"))
FILES = [("a.jsonl", 0), ("b.jsonl", 10_000), ("c.jsonl", 20_000)]
LINES = 160  # ~40 optimizer steps each at seq 32, micro 2 x accum 2: room to hit mid-run
PER_BATCH = 8  # chaos events while each batch runs
WEIGHTS = "adapter_model.safetensors"


# Every attempt may be interrupted, so none may be the last; a short grace keeps the chaos quick.
CHAOS = {"retry": {"max_attempts": 1000, "backoff_s": 0.2, "backoff_max_s": 1.0}, "supervisor": {"stop_grace_s": 30}}


def data_for(start: int) -> bytes:
    return ("\n".join(sample_lines(LINES, start=start)) + "\n").encode()


def drop(d: Daemon, name: str, start: int) -> None:
    """Write elsewhere, rename in, and wait until it is claimed: the order of files is fixed."""
    d.drop(name, data_for(start))
    d.wait_for(lambda: d.batch(name) is not None, 60)


def ledger_rows(root: Path) -> tuple[list[dict], list[dict], dict[int, list[dict]]]:
    led = Ledger.open_readonly(root / "state.db")
    try:
        batches = [asdict(b) for b in led.batches()]
        return (batches, [asdict(v) for v in led.adapter_versions()],
                {b["id"]: [asdict(a) for a in led.attempts(b["id"])] for b in batches})
    finally:
        led.close()


def safetensors_complete(path: Path) -> bool:
    """The file's header parses and its declared tensors fit the file exactly (not torn)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return False
    if len(raw) < 8:
        return False
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end == len(raw)


class CurrentWatcher(threading.Thread):
    """Samples adapters/current every few ms: it must never point at a missing or half adapter."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.current = root / "adapters" / "current"
        self.bad: list[str] = []
        self.seen: set[str] = set()
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                target = os.readlink(self.current)
            except OSError:
                target = None
            if target is not None:
                self.samples += 1
                self.seen.add(target)
                d = self.current.parent / target
                if not ((d / "adapter_config.json").is_file() and safetensors_complete(d / WEIGHTS)):
                    # Re-check once: a reader racing the directory rename sees the old link.
                    time.sleep(0.01)
                    if os.readlink(self.current) == target and not safetensors_complete(d / WEIGHTS):
                        self.bad.append(target)
            time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def check_consistent(d: Daemon, expected_files: list[str]) -> dict[int, list[dict]]:
    """Each file done exactly once, adapters 1..n in order, the ledger agreeing with the folders."""
    batches, versions, attempts = ledger_rows(d.root)
    names = [b["name"] for b in batches]
    assert names == expected_files, f"claimed {names}: a file lost or claimed twice"
    assert all(b["state"] == "done" for b in batches), [(b["name"], b["state"], b["last_reason"]) for b in batches]
    assert [b["adapter_version"] for b in batches] == list(range(1, len(expected_files) + 1))
    assert [(v["n"], v["batch_id"]) for v in versions] == [(b["adapter_version"], b["id"]) for b in batches]
    for b in batches:
        done_attempts = [a for a in attempts[b["id"]] if a["outcome"] == "done"]
        assert len(done_attempts) == 1, f"{b['name']} finished {len(done_attempts)} times"
        assert all(a["ended_at"] is not None for a in attempts[b["id"]]), "an attempt was left open"
    done = sorted(p.name for p in (d.root / "done").iterdir())
    assert done == sorted(expected_files), done
    for name, start in FILES[: len(expected_files)]:
        assert (d.root / "done" / name).read_bytes() == data_for(start), f"{name}: original bytes changed"
    on_disk = sorted(p.name for p in (d.root / "adapters").iterdir())
    assert on_disk == sorted([str(i) for i in range(1, len(expected_files) + 1)] + ["current"]), on_disk
    assert os.readlink(d.root / "adapters" / "current") == str(len(expected_files))
    for i in range(1, len(expected_files) + 1):
        assert safetensors_complete(d.root / "adapters" / str(i) / WEIGHTS)
    assert [p for p in (d.root / "inbox").iterdir() if p.name not in ("high", "low")] == [] and list((d.root / "failed").iterdir()) == []
    for b in batches:  # nothing staged or torn left behind in the batch folders
        bdir = d.root / "batches" / f"{b['id']:06d}"
        assert not (bdir / "published").exists() and not list(bdir.glob(".published.tmp-*"))
    assert d.status()["kernel_oom_kills"] == 0
    return attempts


def our_processes(root: Path) -> list[psutil.Process]:
    """Any process on the machine whose command line names this root (daemon or worker)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in a for a in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def reap(pids: list[int]) -> None:
    """Orphaned workers re-parent to pytest (a subreaper): collect their exit status."""
    for pid in list(pids):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pids.remove(pid)
        except ChildProcessError:
            pids.remove(pid)


def weights(root: Path, n: int) -> bytes:
    return (root / "adapters" / str(n) / WEIGHTS).read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """The undisturbed run: the three files one after another, nothing interrupted."""
    d = Daemon(tmp_path_factory.mktemp("reference"), tiny_model_dir, **CHAOS)
    try:
        d.start()
        for name, start in FILES:
            drop(d, name, start)
        d.wait_for(lambda: all(d.state_of(n) == "done" for n, _ in FILES), 600)
        attempts = check_consistent(d, [n for n, _ in FILES])
        assert all(len(a) == 1 for a in attempts.values()), "the reference must not be interrupted"
        assert d.terminate() == 0
    finally:
        d.cleanup()
    return d.root


def test_random_kills_and_pauses_lose_nothing(daemon_factory, reference):
    """Seeded random SIGKILL/SIGTERM of the worker, SIGKILL + restart of the supervisor and
    pause/resume while three files train: each is done exactly once, the ledger agrees with
    the folders, no process is left, `current` never points at a half adapter, and every
    adapter is bit-identical to the undisturbed run's."""
    rng = random.Random(SEED)
    d = daemon_factory(**CHAOS)
    watcher = CurrentWatcher(d.root)
    orphans: list[int] = []
    counts: collections.Counter = collections.Counter()
    try:
        d.start()
        watcher.start()
        pending = list(FILES)
        name, start = pending.pop(0)
        drop(d, name, start)
        deadline = time.monotonic() + 900
        per_batch: collections.Counter = collections.Counter()
        while not all(d.state_of(n) == "done" for n, _ in FILES):
            assert time.monotonic() < deadline, f"chaos did not converge; counts {dict(counts)}"
            reap(orphans)
            time.sleep(rng.uniform(0.3, 2.5))
            if pending and rng.random() < 0.3:  # new files arrive in the middle of the chaos
                name, start = pending.pop(0)
                drop(d, name, start)
                continue
            kind = rng.choices(["worker_sigkill", "worker_sigterm", "supervisor_sigkill", "pause"], [3, 2, 2, 2])[0]
            running = d.status()["running"]
            if running is None or per_batch[running["id"]] >= PER_BATCH:
                if per_batch[running["id"] if running else 0] >= PER_BATCH and pending:
                    name, start = pending.pop(0)
                    drop(d, name, start)
                continue  # spread the chaos over every batch, then let it converge
            if kind in ("worker_sigkill", "worker_sigterm"):
                try:
                    pid = d.worker_pid()
                    p = psutil.Process(pid) if pid else None
                    if p is None or str(d.root) not in " ".join(p.cmdline()):
                        continue
                    p.send_signal(signal.SIGKILL if kind == "worker_sigkill" else signal.SIGTERM)
                except (psutil.Error, OSError, ValueError):
                    continue
            elif kind == "supervisor_sigkill":
                orphans += [p.pid for p in psutil.Process(d.proc.pid).children()]
                d.kill()
                time.sleep(rng.uniform(0.0, 1.0))
                d.start()
            else:
                (d.root / ".stop").write_text("")
                time.sleep(rng.uniform(0.2, 2.0))
                (d.root / ".stop").unlink()
            counts[kind] += 1
            per_batch[running["id"]] += 1
        while pending:  # in case the random draws left some out
            name, start = pending.pop(0)
            drop(d, name, start)
            d.wait_for(lambda: d.state_of(name) == "done", 600)
        watcher.stop()
        attempts = check_consistent(d, [n for n, _ in FILES])
        assert d.terminate() == 0
        reap(orphans)
        print(f"\nchaos seed {SEED}: {dict(counts)}; events per batch {dict(per_batch)}; attempts per batch "
              f"{[len(a) for a in attempts.values()]}; current sampled {watcher.samples} times")
        assert all(per_batch[b] >= 3 for b in (1, 2, 3)), f"too little chaos per batch to mean anything: {per_batch}"
        assert watcher.bad == [], f"current pointed at a half adapter: {watcher.bad}"
        for i in range(1, len(FILES) + 1):
            assert weights(d.root, i) == weights(reference, i), f"adapter {i} differs from the undisturbed run"
        assert our_processes(d.root) == []
    finally:  # the daemon_factory stops the daemon
        watcher.stop()
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _checkpoint_names(bdir: Path, prefix: str) -> list[str]:
    # A finished batch's checkpoints folder is gone (train.keep_finished_checkpoints is off).
    ck = bdir / "checkpoints"
    return sorted(p.name for p in ck.iterdir() if p.name.startswith(prefix)) if ck.is_dir() else []


def _frozen(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _term_pending(pid: int) -> bool:
    """SIGTERM waits in the (stopped) process's pending sets."""
    return has_signal(pid, signal.SIGTERM, "ShdPnd", "SigPnd")


def _torn(bdir: Path) -> list[str]:
    return _checkpoint_names(bdir, ".tmp-")


def _complete(bdir: Path) -> list[str]:
    return _checkpoint_names(bdir, "step-")


def test_crash_inside_checkpoint_and_publish_writes(daemon_factory, reference):
    """SIGKILL in the middle of a checkpoint write (file a), of the worker's adapter write (file b)
    and of the supervisor's publish between the version's rename and the `current` switch (file c):
    each restart resumes from the newest complete checkpoint, `current` never names a half or
    missing adapter, and all three adapters are bit-identical to the undisturbed run's."""
    d = daemon_factory(**CHAOS)
    watcher = CurrentWatcher(d.root)
    try:
        watcher.start()
        # --- a: die inside the second checkpoint write; the first complete one is used ---------
        # The worker freezes itself after step 4 (a checkpoint exists from step 2), so the daemon's
        # stop lands mid-training on any machine (a 32-step batch can end within a test's poll).
        d.start(env={"TRAINERD_FAULT": "freeze_at_step:4"})
        drop(d, "a.jsonl", 0)
        bdir = d.root / "batches" / "000001"
        pid = d.wait_for(lambda: (p := d.worker_pid()) and _frozen(p) and p, 300)
        assert _complete(bdir), "no complete checkpoint by step 4"
        d.send(signal.SIGTERM)
        d.wait_for(lambda: _term_pending(pid) or not _frozen(pid), 60)  # the supervisor passed it on
        os.kill(pid, signal.SIGCONT)
        assert d.wait_exit(90) == 0  # checkpoints and stops
        assert d.state_of("a.jsonl") == "queued", "the stop did not land mid-training"
        before = _complete(bdir)
        d.start(env={"TRAINERD_FAULT": "crash_in_checkpoint"})
        d.wait_for(lambda: d.batch("a.jsonl")["attempts"] >= 2 and _torn(bdir), 300)
        d.wait_for(lambda: d.status()["running"] is None, 60)
        assert _complete(bdir) == before, "a torn checkpoint became visible or a complete one was lost"
        assert d.terminate() == 0
        d.start()
        d.wait_for(lambda: d.state_of("a.jsonl") == "done", 300)
        resumed = [e for e in d.logs() if e["event"] == "training_started" and e.get("batch") == 1]
        assert resumed[-1]["resumed_from"] == before[-1], "did not resume from the newest complete checkpoint"
        assert _torn(bdir) == [], "the torn temporary was not cleaned up"
        assert not (bdir / "checkpoints").exists(), "a finished batch keeps no checkpoints"

        # --- b: die while the worker writes the final adapter -------------------------------------
        assert d.terminate() == 0
        d.start(env={"TRAINERD_FAULT": "crash_in_publish"})
        drop(d, "b.jsonl", 10_000)
        bdir = d.root / "batches" / "000002"
        d.wait_for(lambda: list(bdir.glob(".published.tmp-*")) and d.status()["running"] is None, 300)
        assert not (bdir / "published").exists() and not (d.root / "adapters" / "2").exists()
        assert os.readlink(d.root / "adapters" / "current") == "1"
        assert d.terminate() == 0
        d.start()
        d.wait_for(lambda: d.state_of("b.jsonl") == "done", 300)
        assert os.readlink(d.root / "adapters" / "current") == "2"
        assert not list(bdir.glob(".published.tmp-*")), "the half adapter was left behind"

        # --- c: the supervisor dies after adapters/3 appears, before `current` moves ---------------
        assert d.terminate() == 0
        d.start(env={"TRAINERD_FAULT": "supervisor_crash_in_publish"})
        drop(d, "c.jsonl", 20_000)
        assert d.wait_exit(300) == -signal.SIGKILL
        assert (d.root / "adapters" / "3").is_dir() and safetensors_complete(d.root / "adapters" / "3" / WEIGHTS)
        assert os.readlink(d.root / "adapters" / "current") == "2", "current moved before the crash point"
        d.start()  # reconcile rolls the publish forward
        # current moves when the version is filed, the batch's state a moment later (its end is
        # committed after the filing): wait for both.
        d.wait_for(lambda: os.readlink(d.root / "adapters" / "current") == "3" and d.state_of("c.jsonl") == "done", 60)
        watcher.stop()
        check_consistent(d, ["a.jsonl", "b.jsonl", "c.jsonl"])
        assert d.terminate() == 0
        assert watcher.bad == [], f"current pointed at a half adapter: {watcher.bad}"
        for i in (1, 2, 3):
            assert weights(d.root, i) == weights(reference, i), f"adapter {i} differs from the undisturbed run"
        assert our_processes(d.root) == []
    finally:
        watcher.stop()
