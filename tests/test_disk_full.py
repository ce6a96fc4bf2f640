"""Disk full, for real: the root on a small tmpfs that the test fills to the last byte.

Running out of space while checkpointing or publishing must keep the previous checkpoint and
adapter intact, say so clearly, pause training, and resume by itself once space is back; the
daemon checks ``disk.min_free_bytes`` before starting a batch. Needs root (mount); skips with
the reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.daemon import Daemon
from test_chaos import CHAOS, safetensors_complete
from workerutil import adapter_bytes, make_batch, run_worker, sample_lines

pytestmark = pytest.mark.slow

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path``, unmounted (lazily if busy) at the end."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Write a filler file until only ``leave`` bytes are free (0: until ENOSPC)."""
    filler = path / f"filler-{time.monotonic_ns()}"
    with open(filler, "wb") as f:
        block = b"\0" * (256 << 10)
        while True:
            room = free_bytes(path) - leave
            if room <= 0:
                break
            try:
                f.write(block[: min(len(block), room)])
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def stdout_events(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's stdout (on another file system): its log file cannot grow while the disk is full."""
    out = []
    for line in d.out.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def complete_checkpoints(bdir: Path) -> dict[str, bytes]:
    """name -> adapter bytes of every complete checkpoint (state.json parses, weights not torn)."""
    out = {}
    for p in sorted((bdir / "checkpoints").glob("step-*")):
        json.loads((p / "state.json").read_text())
        assert safetensors_complete(p / "adapter_model.safetensors"), p
        out[p.name] = (p / "adapter_model.safetensors").read_bytes()
    return out


def test_disk_full_pauses_and_resumes_by_itself(tmp_path, tiny_model_dir):
    """On a 48 MiB tmpfs: a batch waits while free space is under disk.min_free_bytes and starts once
    it is back; filling the disk mid-training stops the worker at its next checkpoint with a clear
    disk_full error, the previous checkpoints and adapter stay intact, nothing starts while space is
    short, and training resumes by itself from the newest checkpoint once the filler is removed."""
    with tmpfs(tmp_path / "fs", 48 * MiB) as fs:
        # Retries and stop grace as the chaos tests have them; stdout goes to the real disk, where
        # it stays readable (and growing) while fs is full.
        d = Daemon(fs, tiny_model_dir, **CHAOS, disk={"min_free_bytes": 8 * MiB}, out=tmp_path / "daemon.out")
        try:
            d.start()
            # --- the start check: under min_free_bytes nothing starts ------------------------------
            filler = fill(fs, leave=4 * MiB)
            d.drop("a.jsonl", sample_lines(40))
            d.wait_for(lambda: d.state_of("a.jsonl") == "queued", 60)
            d.wait_for(lambda: any(e["event"] == "disk_low" for e in stdout_events(d)), 30)
            time.sleep(2)
            assert d.status()["running"] is None and d.batch("a.jsonl")["attempts"] == 0
            assert d.status()["daemon"]["state"] == "waiting for free disk space"
            low = next(e for e in stdout_events(d) if e["event"] == "disk_low")
            assert low["level"] == "error" and low["min_free_bytes"] == 8 * MiB and low["free_bytes"] < 8 * MiB
            filler.unlink()
            d.wait_for(lambda: d.state_of("a.jsonl") == "done", 300)
            assert any(e["event"] == "disk_ok" for e in stdout_events(d))
            adapter1 = (d.root / "adapters" / "1" / "adapter_model.safetensors").read_bytes()

            # --- full while training: the next checkpoint fails -----------------------------------
            d.drop("b.jsonl", sample_lines(600, start=5000))
            bdir = d.root / "batches" / "000002"
            d.wait_for(lambda: d.progress_step(2) >= 4 and len(list((bdir / "checkpoints").glob("step-*"))) >= 1, 300)
            filler = fill(fs)
            assert free_bytes(fs) < 64 << 10
            d.wait_for(lambda: any(e["event"] == "disk_full" and e.get("source") != "worker"
                                   for e in stdout_events(d)), 120)
            d.wait_for(lambda: d.status()["running"] is None, 60)
            ev = stdout_events(d)
            worker_full = [e for e in ev if e["event"] == "disk_full" and e.get("source") == "worker"]
            assert worker_full and worker_full[0]["level"] == "error", "the worker must say why it stopped"
            sup_full = [e for e in ev if e["event"] == "disk_full" and e.get("source") != "worker"][0]
            assert sup_full["level"] == "error" and "resumes" in sup_full["action"]
            exited = [e for e in ev if e["event"] == "worker_exited" and e.get("batch") == 2][-1]
            assert exited["exit_code"] == 75 and exited["result_reason"] == "disk_full"
            assert not [e for e in ev if e["event"] in ("worker_crashed", "kernel_oom_kill")]
            kept = complete_checkpoints(bdir)
            assert kept, "the previous checkpoints must survive"
            assert not list((bdir / "checkpoints").glob(".tmp-*")), "a torn checkpoint was left holding space"
            assert (d.root / "adapters" / "1" / "adapter_model.safetensors").read_bytes() == adapter1
            assert os.readlink(d.root / "adapters" / "current") == "1"
            attempts = d.batch("b.jsonl")["attempts"]
            time.sleep(3)  # nothing starts while the disk is still full
            assert d.batch("b.jsonl")["attempts"] == attempts and d.status()["running"] is None
            assert d.proc is not None and d.proc.poll() is None, "the daemon itself must survive a full disk"

            # --- space is back: resumes from the newest complete checkpoint, by itself ---------------
            filler.unlink()
            d.wait_for(lambda: d.state_of("b.jsonl") == "done", 600)
            newest = sorted(kept)[-1]
            started = [e for e in d.logs() if e["event"] == "training_started" and e.get("batch") == 2]
            assert started[-1]["resumed_from"] == newest
            b = d.batch("b.jsonl")
            assert b["adapter_version"] == 2 and os.readlink(d.root / "adapters" / "current") == "2"
            assert d.status()["kernel_oom_kills"] == 0
            assert d.terminate() == 0
        finally:
            d.cleanup()


def test_disk_full_while_publishing_keeps_checkpoint_and_no_half_adapter(tmp_path, tiny_model_dir):
    """The worker's adapter write hits a full file system: exit 75 disk_full, no half adapter or
    temporary left at the destination, the final checkpoint intact; with space back the rerun only
    publishes, and the adapter is bit-identical to an undisturbed run's."""
    lines = sample_lines(30)
    ref = make_batch(tmp_path / "ref", tiny_model_dir, lines)
    rc, _, _ = run_worker(ref, "--publish", str(tmp_path / "ref-adapter"))
    assert rc == 0
    with tmpfs(tmp_path / "small", 1 * MiB) as small:
        batch = make_batch(tmp_path / "run", tiny_model_dir, lines)
        dest = small / "adapter"
        filler = fill(small)
        rc, result, logs = run_worker(batch, "--publish", str(dest))
        assert rc == 75 and result["status"] == "stopped" and result["reason"] == "disk_full", result
        full = [e for e in logs if e["event"] == "disk_full"]
        assert full and full[0]["level"] == "error" and "cannot write the adapter" in full[0]["error"]
        assert sorted(os.listdir(small)) == [filler.name], "a half adapter or its temporary was left behind"
        ckpts = complete_checkpoints(batch)
        final = sorted(ckpts)[-1]
        assert json.loads((batch / "checkpoints" / final / "state.json").read_text())["step"] == result["total_steps"]
        filler.unlink()
        rc, result, logs = run_worker(batch, "--publish", str(dest))
        assert rc == 0, result
        assert not [e for e in logs if e["event"] == "step"], "the rerun must only publish"
        assert adapter_bytes(dest) == adapter_bytes(tmp_path / "ref-adapter")
