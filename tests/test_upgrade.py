"""Upgrade in place: a root written by the release before the evaluation memory (run here for real,
from git) is taken over by this one without losing an adapter, a lineage or an eval set; a batch
it left in progress is judged on the memory; the next batch is judged on all of history."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# The last commit before the evaluation memory (issue 17): what "today's version" wrote.
BEFORE = "24c3cef"
TRAIN = {"train": {"learning_rate": 1e-2, "epochs": 2, "micro_batch_size": 4, "grad_accum_steps": 1,
                   "warmup_steps": 0, "checkpoint_every_steps": 1}, "model": {"dtype": "float32"}}


def _old_tree(dest: Path) -> Path:
    """trainerd as it was at BEFORE, exported from this repository's history."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE, "trainerd"], capture_output=True,
                                 check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the release before the evaluation memory ({BEFORE}) is not in this checkout's git history: {e}")
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def facts(word: str, start: int, n: int = 20) -> list[str]:
    return [json.dumps({"prompt": f"Q: what is item {i}? A:", "completion": f" {word}"})
            for i in range(start, start + n)] * 3


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finished(d, name: str) -> str:
    return d.wait_for(lambda: d.state_of(name) if d.state_of(name) in ("done", "rejected", "failed") else None, 600)


def test_a_root_from_the_previous_release_upgrades_in_place(daemon_factory, tmp_path):
    """Two versions published and a third batch paused mid-training by the previous release; this
    release keeps every adapter, lineage and set byte for byte, migrates the ledger (schema 4, a
    backup of the old one beside it), builds the memory from the kept sets, re-freezes the paused
    batch on it (its old evalsets.json kept), finishes that batch from its checkpoint, and judges
    the next one on the memory of all three."""
    old = _old_tree(tmp_path / "old")
    # PYTHONSAFEPATH: `python -m` must not put the test's working directory (this checkout) first.
    d = daemon_factory(env={"PYTHONPATH": str(old), "PYTHONSAFEPATH": "1"}, **TRAIN).start()
    root = d.root
    d.drop("a.jsonl", facts("red", 0))
    assert finished(d, "a.jsonl") == "done"
    d.drop("b.jsonl", facts("red", 100))
    assert finished(d, "b.jsonl") == "done"
    # Four times the lines (the same 20 contents): ~100 steps, so the pause lands mid-training on a
    # fast machine too (16 steps could all be done before the daemon saw .stop).
    d.drop("c.jsonl", facts("red", 200) * 4)
    d.wait_for(lambda: d.progress_step(3) >= 2, 300)
    (root / ".stop").touch()
    d.wait_for(lambda: d.state_of("c.jsonl") == "queued", 300)
    assert d.terminate() == 0
    assert sqlite3.connect(root / "state.db").execute("PRAGMA user_version").fetchone()[0] == 3
    kept = {p: _digest(root / p) for p in ("adapters/1", "adapters/2", "evalsets/batches")}
    old_frozen = (root / "batches" / "000003" / "evalsets.json").read_bytes()
    assert b'"earlier"' in old_frozen  # the old way: every earlier set listed

    d.env = {}  # this release from here on
    (root / ".stop").unlink()
    d.start()
    assert finished(d, "c.jsonl") == "done"
    migrated = d.events("eval_memory_migrated")
    assert migrated and migrated[0]["sets"] == 2 and migrated[0]["batches_refrozen"] == [3]
    for p, digest in kept.items():
        now = _digest(root / p)
        assert {k: now.get(k) for k in digest} == digest, p  # nothing rewritten (batch 3's set is new)
    assert (root / "state.db.v3.bak").is_file()
    assert sqlite3.connect(root / "state.db").execute("PRAGMA user_version").fetchone()[0] == 4
    c = root / "batches" / "000003"
    assert (c / "evalsets.json.v1").read_bytes() == old_frozen
    assert json.loads((c / "evalsets.json").read_text())["memory"]["batches"] == 2
    started = [e for e in d.events("training_started") if e["batch"] == 3]
    assert started and started[-1]["resumed_from"], "the paused batch resumes from its checkpoint"
    memory = next(s for s in json.loads((c / "eval.json").read_text())["sets"] if s["kind"] == "memory")
    assert {p["batch"] for p in memory["candidate"]["per_example"]} == {1, 2}

    d.drop("d.jsonl", facts("red", 300))
    assert finished(d, "d.jsonl") == "done"
    ev = json.loads((root / "batches" / "000004" / "eval.json").read_text())
    memory = next(s for s in ev["sets"] if s["kind"] == "memory")
    assert {p["batch"] for p in memory["candidate"]["per_example"]} == {1, 2, 3}
    assert json.loads((root / "adapters" / "4" / "lineage.json").read_text())["parent"] == 3
    assert d.terminate() == 0
    shutil.rmtree(old)
