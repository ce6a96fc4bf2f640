"""The evaluation gate through the real daemon and worker on the tiny model: a contradicting batch
is rejected, promote and rollback publish new versions (through a running daemon and without
one) and survive a restart; a diverging batch is rejected; the figures are deterministic; early
stopping keeps its best checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from workerutil import adapter_bytes, make_batch, run_worker

pytestmark = pytest.mark.slow

# Twenty items, each line five times: the tiny model learns the answer word quickly, and the
# held-out slice (2 distinct contents) measures whether it carries to unseen items.
TRAIN = {"train": {"learning_rate": 1e-2, "epochs": 3, "micro_batch_size": 4, "grad_accum_steps": 1,
                   "warmup_steps": 0, "checkpoint_every_steps": 0}, "model": {"dtype": "float32"}}


def facts(answer: str, start: int = 0, n: int = 20) -> list[str]:
    return [json.dumps({"prompt": f"Q: what color is item {i}? A:", "completion": f" {answer}"})
            for i in range(start, start + n)] * 5


def trainerd(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def finished(d, name: str) -> str:
    return d.wait_for(lambda: d.state_of(name) if d.state_of(name) in ("done", "rejected", "failed") else None, 300)


def test_contradiction_rejected_then_promote_rollback_and_restart(daemon_factory):
    """Batch 2 contradicts batch 1 (same prompts, another answer): rejected with its figures, current
    unmoved; promote publishes it as version 2 (forced), rollback 1 publishes a copy as version 3,
    the next batch continues from version 3, and all of it survives a daemon restart."""
    d = daemon_factory(**TRAIN, gate={"heal_attempts": 0}).start()  # healing: tests/test_heal_e2e.py
    root = d.root
    d.drop("a.jsonl", facts("red"))
    assert finished(d, "a.jsonl") == "done"
    d.drop("b.jsonl", facts("blue"))
    assert finished(d, "b.jsonl") == "rejected"
    assert os.readlink(root / "adapters" / "current") == "1"
    assert sorted(p.name for p in (root / "adapters").iterdir()) == ["1", "current", "rejected"]
    assert (root / "adapters" / "rejected" / "000002" / "adapter_model.safetensors").is_file()
    note = json.loads((root / "done" / "b.jsonl.rejected.json").read_text())
    regressed = note["gate"]["history"]["regressed"]
    assert note["decision"] == "rejected" and regressed and regressed[0]["set"] == "batch 000001"
    assert regressed[0]["change"] > note["gate"]["thresholds"]["max_regression"] and "batch 000001" in note["reason"]
    assert (root / "done" / "b.jsonl").is_file()
    rejected = d.events("adapter_rejected")
    assert rejected and rejected[0]["worst_regression"]["set"] == "batch 000001"
    assert json.loads((root / "batches" / "000002" / "result.json").read_text())["decision"] == "rejected"
    st = d.status()
    assert st["rejected"][0]["id"] == 2 and st["last_decision"]["decision"] == "rejected"
    assert "trainerd promote 2" in trainerd(root, "status").stdout

    r = trainerd(root, "promote", "2")  # the daemon runs: a request it carries out
    assert r.returncode == 0 and "version 2 (forced)" in r.stdout, r.stdout + r.stderr
    assert os.readlink(root / "adapters" / "current") == "2"
    lineage = json.loads((root / "adapters" / "2" / "lineage.json").read_text())
    assert (lineage["kind"], lineage["parent"], lineage["batch"], lineage["decision"]) == ("forced", 1, 2, "forced")
    assert "batch 000001" in lineage["gate"]["rule"]

    r = trainerd(root, "rollback", "1")
    assert r.returncode == 0 and "version 3" in r.stdout, r.stdout + r.stderr
    assert os.readlink(root / "adapters" / "current") == "3"
    assert adapter_bytes(root / "adapters" / "3") == adapter_bytes(root / "adapters" / "1")
    assert json.loads((root / "adapters" / "3" / "lineage.json").read_text())["rollback_of"] == 1
    assert trainerd(root, "rollback", "3").returncode == 1  # already current: refused with a reason

    d.drop("c.jsonl", facts("red", start=100))
    finished(d, "c.jsonl")
    started = [e for e in d.events("worker_started") if e["file"] == "c.jsonl"][0]
    assert started["init_adapter_version"] == 3 and started["init_adapter"].endswith("adapters/3")

    assert d.terminate() == 0
    r = trainerd(root, "rollback", "2")  # no daemon: applied under the root's lock
    assert r.returncode == 0 and "copy of version 2" in r.stdout, r.stdout + r.stderr
    newest = max(int(p.name) for p in (root / "adapters").iterdir() if p.name.isdigit())
    d.start()
    d.wait_for(lambda: d.status()["daemon"]["running"])
    assert os.readlink(root / "adapters" / "current") == str(newest)
    hist = json.loads(trainerd(root, "history", "--json").stdout)
    kinds = [(h["version"], h["kind"]) for h in hist if h["version"] is not None]
    assert kinds[:3] == [(1, "blessed"), (2, "forced"), (3, "rollback")] and kinds[-1] == (newest, "rollback")
    assert [h["batch"] for h in hist if h["kind"] == "rejected"] == []  # promoted: no longer rejected
    table = trainerd(root, "history").stdout
    assert "forced" in table and "rollback" in table and "a.jsonl" in table
    assert d.terminate() == 0


def test_diverging_batch_is_rejected(daemon_factory):
    """A learning rate that blows the adapter up: refused for NaN/inf or for its regression."""
    d = daemon_factory(**TRAIN, gate={"heal_attempts": 0}).start()
    d.drop("a.jsonl", facts("red"))
    assert finished(d, "a.jsonl") == "done"
    d.config_data["train"]["learning_rate"] = 1.0
    d.config.write_text(json.dumps(d.config_data))
    d.send(signal.SIGHUP)
    d.wait_for(lambda: d.events("config_reloaded"))
    d.drop("b.jsonl", facts("green", start=40))
    assert finished(d, "b.jsonl") == "rejected"
    rule = d.events("adapter_rejected")[0]["rule"]
    assert "not finite" in rule or "worse on" in rule or "forgot batch 000001" in rule, rule
    assert os.readlink(d.root / "adapters" / "current") == "1"
    assert d.terminate() == 0


def test_two_batches_blessed_and_the_chain_is_complete(daemon_factory):
    """A normal run: both batches blessed, each version's lineage leads back to the base model."""
    d = daemon_factory(**TRAIN).start()
    d.drop("a.jsonl", facts("red"))
    assert finished(d, "a.jsonl") == "done"
    d.drop("b.jsonl", facts("red", start=50))
    assert finished(d, "b.jsonl") == "done"
    hist = json.loads(trainerd(d.root, "history", "--json").stdout)
    assert [(h["version"], h["kind"], h["parent"], h["file"]) for h in hist] == [
        (1, "blessed", None, "a.jsonl"), (2, "blessed", 1, "b.jsonl")]
    for v in (1, 2):
        lin = json.loads((d.root / "adapters" / str(v) / "lineage.json").read_text())
        assert lin["sha256"] and lin["steps"] and lin["tokens"] and lin["versions"]["torch"]
        assert lin["settings"]["train"]["learning_rate"] == 1e-2 and lin["eval"]
    lin2 = json.loads((d.root / "adapters" / "2" / "lineage.json").read_text())
    assert {s["kind"] for s in lin2["eval"]} == {"new", "memory"}
    assert (d.root / "evalsets" / "batches" / "000001.jsonl").is_file()
    assert lin2["memory"]["version"] == 1 and lin2["memory"]["batches"] == 1
    assert d.terminate() == 0


def _gate_batch(tmp: Path, model: Path, name: str, **extra) -> Path:
    cfg = {**TRAIN, "eval": {"batch_size": 1, **extra.pop("eval", {})}, **extra}
    return make_batch(tmp, model, facts("red"), name=name, **cfg)


def test_eval_figures_are_bit_identical_and_survive_a_stop_in_evaluation(tmp_path, tiny_model_dir):
    """Two runs give the same eval.json figures bit for bit, and so does a run stopped (SIGTERM)
    in the middle of its evaluation and resumed: the resume evaluates only, with the same result."""
    a = _gate_batch(tmp_path, tiny_model_dir, "a")
    b = _gate_batch(tmp_path, tiny_model_dir, "b")
    assert run_worker(a)[0] == 0 and run_worker(b)[0] == 0
    fig = lambda p: [(s["kind"], s["sha256"], s["candidate"]["per_example"], s["champion"]["per_example"])
                     for s in json.loads((p / "eval.json").read_text())["sets"]]
    assert fig(a) == fig(b) and fig(a)
    c = _gate_batch(tmp_path, tiny_model_dir, "c")
    rc, _, logs = run_worker(c, env=subprocess_env(TRAINERD_FAULT="term_in_evaluation"))
    assert rc == 75 and [e for e in logs if e["event"] == "evaluation_started"]
    assert json.loads((c / "result.json").read_text())["reason"] == "shutdown" and not (c / "eval.json").exists()
    rc, result, logs = run_worker(c)
    assert rc == 0 and fig(c) == fig(a)
    assert not [e for e in logs if e["event"] == "step"], "the resume must not train again"
    assert adapter_bytes(c / "final_adapter") == adapter_bytes(a / "final_adapter")


def test_early_stopping_keeps_its_best_checkpoint(tmp_path, tiny_model_dir):
    """Evaluating every step against an eval file that contradicts the training lines: the loss
    stops improving, training ends after `patience` evaluations, the best step's checkpoint is
    kept despite keep_checkpoints 1, and it is the candidate that gets written."""
    b = _gate_batch(tmp_path, tiny_model_dir, "b", eval={"every_steps": 1, "early_stopping_patience": 2},
                    train={**TRAIN["train"], "keep_checkpoints": 1})
    (b / "eval.jsonl").write_text("\n".join(facts("blue", n=4)[:4]) + "\n")
    rc, result, logs = run_worker(b)
    assert rc == 0
    evals = [e for e in logs if e["event"] == "eval_step"]
    assert evals[-1]["early_stopped"] and evals[-1]["evals_without_improvement"] == 2
    best = evals[-1]["best_step"]
    assert result["step"] == evals[-1]["step"] == best + 2 < result["total_steps"]
    kept = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert f"step-{best:08d}" in kept
    assert adapter_bytes(b / "final_adapter") == adapter_bytes(b / "checkpoints" / f"step-{best:08d}")
    early = json.loads((b / "eval.json").read_text())["early_stopping"]
    assert early == {"best_step": best, "best_loss": evals[-1]["best_loss"], "bad": 2, "stopped": True}
