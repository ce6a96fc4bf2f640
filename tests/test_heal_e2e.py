"""Healing through the real daemon and worker on the tiny model: a batch refused for forgetting
is trained again with the forgotten batch's lines and published; a true contradiction is healed
as far as the budget allows and then rejected naming the batch it conflicts with; a healing try
stopped or SIGKILLed part-way resumes to the very adapter of an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from support.log import ListLog
from trainerd.core.contract import BatchFiles
from trainerd.supervisor.ledger.rows import Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor import heal
from workerutil import adapter_bytes, clean_runs, finish, make_batch, run_worker, start_worker, wait_for_event

pytestmark = pytest.mark.slow

TRAIN = {"train": {"learning_rate": 1e-2, "epochs": 3, "micro_batch_size": 4, "grad_accum_steps": 1,
                   "warmup_steps": 0, "checkpoint_every_steps": 0}, "model": {"dtype": "float32"},
         "replay": {"fraction": 0.0}}  # no rehearsal but the healing's: the first try forgets for sure


def sky(color: str, n: int = 20) -> list[str]:
    return [json.dumps({"prompt": f"Q: what color is the sky of planet {i}? A:", "completion": f" {color}"})
            for i in range(n)] * 5


def fruit(taste: str, n: int = 20) -> list[str]:
    return [json.dumps({"prompt": f"Q: how does the fruit {i} taste? A:", "completion": f" {taste}"})
            for i in range(n)] * 5


def finished(d, name: str) -> str:
    return d.wait_for(lambda: d.state_of(name) if d.state_of(name) in ("done", "rejected", "failed") else None, 600)


def trainerd(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_a_conflict_ends_rejected_and_forgetting_is_healed(daemon_factory):
    """Batch 2 answers batch 1's questions otherwise, with a healing budget too small to keep both
    (gate.heal_replay 0.02): refused, healed twice, still refused, rejected naming batch 1. After a
    reload to the default budget, batch 3 (another topic, no replay) forgets batch 1: refused,
    trained again from the same champion with batch 1's lines replayed, published; its lineage,
    history and status show the two tries. (The tiny model learns answers as token frequencies,
    not facts: whether a real contradiction can be healed is measured on SmolLM2 in
    benchmarks/continual.py.)"""
    d = daemon_factory(**TRAIN, gate={"heal_replay": 0.02}).start()
    d.drop("a.jsonl", sky("red"))
    assert finished(d, "a.jsonl") == "done"
    d.drop("b.jsonl", sky("blue"))
    assert finished(d, "b.jsonl") == "rejected"
    b = d.batch("b.jsonl")
    assert "batch 000001" in b["reason"] and "after 2 healing tries" in b["reason"], b["reason"]
    assert len([e for e in d.events("batch_healing") if e["file"] == "b.jsonl"]) == 2
    tries = json.loads((d.root / "batches" / "000002" / "tries.json").read_text())["tries"]
    assert [t["verdict"] for t in tries] == ["refused"] * 3 and all(t["targets"] == [1] for t in tries)
    last = d.status()["last_decision"]
    assert last["decision"] == "rejected" and last["heals"] == 2
    assert "2 healing tries did not heal it" in trainerd(d.root, "history").stdout

    d.config_data["gate"]["heal_replay"] = 0.25
    d.config.write_text(json.dumps(d.config_data))
    d.send(signal.SIGHUP)
    d.wait_for(lambda: d.events("config_reloaded"))
    d.drop("c.jsonl", fruit("sweet"))
    assert finished(d, "c.jsonl") == "done"
    healing = [e for e in d.events("batch_healing") if e["file"] == "c.jsonl"]
    assert len(healing) == 1 and healing[0]["targets"] == [1] and "batch 000001" in healing[0]["rule"]
    started = [e for e in d.events("worker_started") if e["file"] == "c.jsonl"]
    assert [e["init_adapter_version"] for e in started] == [1, 1]  # the same champion, twice
    drawn = [e for e in d.events("replay_drawn") if e.get("healing_try") == 1 and e["batch"] == 3]
    assert drawn and drawn[0]["targeted_lines"] > 0 and drawn[0]["targets"] == [1]
    lineage = json.loads((d.root / "adapters" / "2" / "lineage.json").read_text())
    tries = lineage["heals"]["tries"]
    assert [t["verdict"] for t in tries] == ["refused", "blessed"] and tries[0]["targets"] == [1]
    assert lineage["decision"] == "blessed" and lineage["replay"]["lines"] > 0
    hist = json.loads(trainerd(d.root, "history", "--json").stdout)
    assert [(h["version"], h["heals"]) for h in hist if h["version"]] == [(1, 0), (2, 1)]
    assert "healed after 1 healing try" in trainerd(d.root, "history").stdout
    assert d.terminate() == 0


def _batch_row(heals: int) -> Batch:
    return Batch(id=2, name="b.jsonl", state=BatchState.QUEUED, created_at=0.0, updated_at=0.0, heals=heals)


def _refused_try(tmp: Path, model: Path) -> Path:
    """A batch folder whose first try ran (trained, evaluated), refused on batch 1: heal.prepare
    then makes it a healing try as the supervisor would, with tries.json naming batch 1."""
    from test_replay import put

    put(tmp / "root", 1, sky("red"))
    # Checkpoints every 2 steps (the test config's), so that a SIGKILL leaves one to resume from.
    train = {k: v for k, v in TRAIN["train"].items() if k != "checkpoint_every_steps"}
    batch = make_batch(tmp, model, fruit("sweet"), name="b", train=train, model=TRAIN["model"],
                       replay={"fraction": 0.0})
    assert run_worker(batch)[0] == 0
    files = BatchFiles(batch)
    (files.tries).write_text(json.dumps({"tries": [{"try": 0, "verdict": "refused", "targets": [1]}]}))
    return batch


def _prepare(batch: Path) -> None:
    assert heal.prepare(BatchFiles(batch), _batch_row(1), 0.25, ListLog())
    assert not heal.prepare(BatchFiles(batch), _batch_row(1), 0.25, ListLog())  # once


def test_a_healing_try_resumes_bit_identical_after_sigkill_and_stop(tmp_path, tiny_model_dir):
    """A healing try starts from the champion with its replay drawn again (the refused try's
    checkpoints gone); SIGKILLed after a checkpoint and stopped mid-step later, each resumed, it
    ends with the uninterrupted healing try's adapter, bit for bit, and the same replay."""
    first = _refused_try(tmp_path / "first", tiny_model_dir)
    ref = tmp_path / "ref" / "b"
    shutil.copytree(first.parent, ref.parent, symlinks=True)
    _prepare(ref)
    rc, ref_result, logs = run_worker(ref)
    assert rc == 0 and ref_result["replay"]["lines"] > 0
    assert any(e["event"] == "replay_drawn" and e.get("targeted_lines") for e in logs)
    started = next(e for e in logs if e["event"] == "training_started")
    assert started["resumed_from"] is None and started["step"] == 0

    test = tmp_path / "test" / "b"
    shutil.copytree(first.parent, test.parent, symlinks=True)
    _prepare(test)
    assert run_worker(test, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))[0] == -signal.SIGKILL
    clean_runs(test)
    proc = start_worker(test)
    wait_for_event(proc, "step", min_step=8)
    (test / ".stop").write_text("memory")
    assert finish(proc) in (0, 75)
    clean_runs(test)
    rc, result, _ = run_worker(test)
    assert rc == 0 and result["replay"] == ref_result["replay"]
    assert (test / "replay.jsonl").read_bytes() == (ref / "replay.jsonl").read_bytes()
    assert adapter_bytes(test / "final_adapter") == adapter_bytes(ref / "final_adapter")
