"""The quickstart's sample through the real daemon, with the quickstart's own settings, on the tiny
model: it is published, and the proof the quickstart ends with (``trainerd learned``: held-out loss
before and after with its standard error, a held-out question answered by the base and by the
adapter) is printed and well formed, with the same figures in ``trainerd history``. The tiny model's
answers are gibberish; whether the real model learns is benchmarks/quickstart_proof.py's business."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, subprocess_env

from trainerd.supervisor.views import heldout
from trainerd.core.settings import EvalSettings
from trainerd.worker.split import holdout_count

pytestmark = pytest.mark.slow

SAMPLE = REPO / "examples" / "sample.jsonl"


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory, tiny_model_dir) -> Path:
    """A root where a real daemon, on configs/quickstart.yaml's train and eval settings, published
    the sample as version 1 (then stopped)."""
    from support.daemon import Daemon

    qs = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    train = {**qs["train"], "seq_len": None, "checkpoint_every_steps": None}  # the product's, not the tests' FAST ones
    d = Daemon(tmp_path_factory.mktemp("quickstart"), tiny_model_dir, train=train, eval=qs["eval"])
    d.start()
    try:
        d.drop("sample.jsonl", SAMPLE.read_bytes())
        d.wait_for(lambda: d.state_of("sample.jsonl") in ("done", "rejected", "failed"), 300)
        assert d.state_of("sample.jsonl") == "done", d._tail()
    finally:
        assert d.terminate() == 0
    return d.root


def _distinct_lines() -> int:
    return len({ln for ln in SAMPLE.read_bytes().splitlines() if ln.strip()})


def test_sample_holds_out_a_real_number_of_examples_and_trains_a_real_number_of_steps(quickstart_root):
    """The split holds out about a tenth of the sample's distinct phrasings (at least 8), all of
    them evaluated; the batch makes at least 20 optimizer steps at the quickstart's settings."""
    split = json.loads((quickstart_root / "batches" / "000001" / "split.json").read_text())
    held = holdout_count(_distinct_lines(), EvalSettings())
    assert held >= 8 and split["heldout_lines"] == held
    lin = json.loads((quickstart_root / "adapters" / "1" / "lineage.json").read_text())
    assert lin["steps"] >= 20
    assert lin["heldout"]["examples"] == held  # the whole held-out set fits the evaluation's budget


def test_learned_prints_the_proof(quickstart_root):
    """``trainerd learned 1`` prints the held-out loss of the base and of version 1 with the change's
    standard error and a verdict, then a held-out question (one of the held-out lines, never
    trained), the file's answer, and the answers of version 1 and of the base."""
    p = _cli(quickstart_root, "learned", "1", "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert re.fullmatch(r"version 1: batch #1 sample\.jsonl, \d+ steps, \d+ tokens, blessed", out[0]), out[0]
    m = re.fullmatch(r"held-out loss  base (\d+\.\d{3}) -> version 1 (\d+\.\d{3}) nats/token: ([+-]\d+\.\d{3}) "
                     r"± (\d+\.\d{3}) \(standard error\), on (\d+) examples \((\d+) tokens\) never trained on", out[1])
    assert m, out[1]
    before, after, change, se = (float(m.group(i)) for i in range(1, 5))
    assert abs((after - before) - change) <= 0.0015 and se > 0
    assert re.fullmatch(r" {15}(fell|rose) by \d+\.\d{3} nats/token.*", out[2]), out[2]
    held = [json.loads(ln) for ln in (quickstart_root / "batches" / "000001" / "holdout.jsonl").read_text().splitlines()]
    questions = {m["content"]: ex["messages"][-1]["content"]  # (the held-out text lines ask nothing)
                 for ex in held if "messages" in ex for m in ex["messages"] if m["role"] == "user"}
    q = out[3].removeprefix("held-out question (never trained on): ")
    assert q in questions, out[3]
    assert out[4] == f"  the file's answer: {questions[q]}"
    assert out[5] == "--- version 1 (current)" and out[7] == "--- base" and len(out) == 9


def test_learned_json_history_and_check_agree(quickstart_root):
    """``learned --json`` carries the same figures as the lineage; ``trainerd history`` shows them
    compactly (before->after ±se n); ``--check`` exits 1 exactly when the loss did not fall beyond
    noise (t standard errors)."""
    p = _cli(quickstart_root, "learned", "--json", "--no-ask")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    lin = json.loads((quickstart_root / "adapters" / "1" / "lineage.json").read_text())
    assert info["heldout"] == lin["heldout"] and info["answers"] is None
    fig = info["heldout"]
    assert fig["change"] == pytest.approx(fig["after"] - fig["before"])
    assert info["learned"] == (fig["change"] < -heldout.t_bound(fig["examples"]) * fig["stderr"])
    h = _cli(quickstart_root, "history")
    assert h.returncode == 0, h.stderr
    row = h.stdout.splitlines()[1]
    assert f"{fig['before']:.3f}->{fig['after']:.3f} ±{fig['stderr']:.3f} n{fig['examples']}" in row, h.stdout
    c = _cli(quickstart_root, "learned", "--no-ask", "--check")
    assert c.returncode == (0 if info["learned"] else 1)
