"""A LoRA adapter belongs to its base model: the identity, and a changed model.path holding the queue
until the operator restores it or rebases the chain."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import subprocess_env
from trainerd.supervisor.basemodel import Watched, identity
from trainerd.worker.testing import build_tiny_model


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The tiny model's shape with other weights (another seed)."""
    return build_tiny_model(tmp_path_factory.mktemp("other-model"), seed=1)


def test_identity_is_the_model_not_its_folder(tmp_path, tiny_model_dir, other_model):
    """A copy in another folder has the same identity; other weights under the same config do not."""
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert identity(copy)["id"] == identity(tiny_model_dir)["id"]
    assert identity(other_model)["id"] != identity(tiny_model_dir)["id"]
    w = Watched(copy)
    first = w.get()
    assert w.get() is first  # unchanged files: not read again
    shutil.rmtree(copy)
    assert w.get() is None


def trainerd(root, *args):
    return subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_changed_base_holds_the_queue_until_rebase(daemon_factory, tiny_model_dir, other_model):
    """model.path pointed at another model with a chain on the first: the next batch waits (no file
    fails), status and the log name both models; `trainerd rebase` starts a new chain whose first
    version has no parent and records both bases."""
    d = daemon_factory(eval={"holdout_fraction": 0.0, "holdout_min": 0}).start()
    d.drop("a.jsonl", [json.dumps({"text": f"fox {i} jumps"}) for i in range(20)])
    d.wait_for(lambda: d.state_of("a.jsonl") == "done", 300)
    d.config_data["model"]["path"] = str(other_model)
    d.config.write_text(json.dumps(d.config_data))
    d.send(signal.SIGHUP)
    d.wait_for(lambda: d.events("config_reloaded"))
    d.drop("b.jsonl", [json.dumps({"text": f"dog {i} sleeps"}) for i in range(20)])
    d.wait_for(lambda: d.events("base_model_changed"), 60)
    changed = d.events("base_model_changed")[0]
    assert str(other_model) in changed["configured_base"] and "tiny-model" in changed["chain_base"]
    st = d.status()
    assert st["daemon"]["state"].startswith("held: the base model is") and st["base_held"]["batch"] == 2
    assert d.state_of("b.jsonl") == "queued" and not [e for e in d.events("worker_started") if e["file"] == "b.jsonl"]
    r = trainerd(d.root, "rebase")
    assert r.returncode == 0 and "new chain" in r.stdout, r.stdout + r.stderr
    d.wait_for(lambda: d.state_of("b.jsonl") == "done", 300)
    started = [e for e in d.events("worker_started") if e["file"] == "b.jsonl"][0]
    assert started["init_adapter"] is None
    lin = json.loads((d.root / "adapters" / "2" / "lineage.json").read_text())
    assert lin["parent"] is None and lin["base"]["path"] == str(other_model.resolve())
    assert lin["rebase"]["previous_base"]["id"] == identity(tiny_model_dir)["id"]
    hist = json.loads(trainerd(d.root, "history", "--json").stdout)
    assert [(h["version"], h["parent"]) for h in hist] == [(1, None), (2, None)]
    assert d.terminate() == 0
