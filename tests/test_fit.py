"""Fitting a model that does not fit (issue 19): the plan made from the model's files before
anything is loaded, with the real daemon, the real worker and a real memory cgroup.

The big model is issue 19's: a random Llama of 0.92 B parameters (hidden 2048, 16 layers,
SmolLM2's vocabulary size, tied embeddings) saved in bf16: 1.84 GB on disk, 3.43 GiB in fp32.
It is built once (about a minute) and cached under the temporary directory for later sessions.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import tempfile
import time
from pathlib import Path

import pytest

from workerutil import sample_lines

MiB, GiB = 1 << 20, 1 << 30
BIG_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152)
# Few, short steps: what is tested is memory, not learning.
SHORT = {"train": {"seq_len": 64, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 0,
                   "checkpoint_every_steps": 0, "threads": 2},
         "eval": {"max_tokens": 512, "holdout_max": 2, "batch_size": 1},
         "memory": {"interval_ms": 50}}


@pytest.fixture(scope="session")
def big_model_dir() -> Path:
    """The 0.92 B bf16 model, built once and kept in the temporary directory (keyed by its shape)."""
    from trainerd.worker.testing import build_random_model

    return build_random_model(Path(tempfile.gettempdir()) / "trainerd-test-models" / "llama-0.92b-bf16", BIG_SHAPE)


def _attempt_results(root: Path) -> list[dict]:
    db = sqlite3.connect(root / "state.db")
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT result_json FROM attempts ORDER BY n") if r[0]]
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.cgroup
def test_bf16_model_larger_than_the_cgroup_in_fp32_trains_to_an_adapter(memcg, daemon_factory, big_model_dir):
    """Under a 3.3 GiB cgroup (its fp32 weights alone are 3.43 GiB) the plan picks a rung that holds the bf16
    checkpoint as stored, and the batch trains to a published adapter with no stop, no guard kill and no kernel
    OOM kill; the worker's measured peak RSS is under the plan's estimate, and the estimate within 1.6x of it."""
    cg = memcg(int(3.3 * GiB))
    d = daemon_factory(cgroup=cg, model_dir=big_model_dir, **SHORT).start()
    d.drop("a.jsonl", sample_lines(24))
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed") and x, 900)
    assert b["state"] == "done", b
    assert cg.oom_kills() == 0 and d.status()["kernel_oom_kills"] == 0
    for guard_event in ("memory_stop_decided", "memory_term_decided", "memory_kill_decided", "kernel_oom_kill"):
        assert not d.events(guard_event), guard_event
    assert (d.root / "adapters" / "1" / "adapter_config.json").is_file()
    plan = d.events("memory_plan")[0]
    assert plan["fits"] and plan["base_weights"] == "bfloat16" and plan["params"] > 900_000_000
    assert plan["estimated_tokens_per_s"] > 0 and plan["rungs"][0]["estimate_bytes"] > plan["budget_bytes"]
    loaded = d.events("model_loaded")[0]
    assert loaded["base_weights"] == "bfloat16" and loaded["load_dtype"] == "bfloat16"  # never an fp32 copy
    (result,) = _attempt_results(d.root)
    peak = result["peak_rss_bytes"]
    assert peak <= plan["estimate_bytes"] <= 1.6 * peak, (peak / MiB, plan["estimate_bytes"] / MiB)
    meta = json.loads((d.root / "adapters" / "1" / "trainerd.json").read_text())
    assert (meta["base_weights"], meta["quantized"], meta["numerics_changes"]) == ("bfloat16", False, [])
    assert d.terminate() == 0


def _header_only_model(d: Path, shape: dict, params_per_layer: int, embed: int) -> Path:
    """config.json and a safetensors header without tensor data (the plan never reads any): a model too big
    for anything here, planned in milliseconds."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({**shape, "tie_word_embeddings": True, "model_type": "llama"}))
    tensors = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [shape["vocab_size"], shape["hidden_size"]],
                                             "data_offsets": [0, 0]}}
    for i in range(shape["num_hidden_layers"]):
        tensors[f"model.layers.{i}.mlp.weight"] = {"dtype": "BF16", "shape": [params_per_layer // 2048, 2048],
                                                   "data_offsets": [0, 0]}
    body = json.dumps(tensors).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    return d


def test_model_that_fits_no_rung_fails_before_loading_with_the_figures(daemon_factory, tmp_path):
    """An 8 B-shaped bf16 model under a 4 GiB memory limit fits no rung: the batch fails before any worker starts,
    within a second of its claim, and the reason (ledger, failed/ beside the original) names the smallest rung's
    estimate and the limit."""
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    model = _header_only_model(tmp_path / "llama-8b", shape, params_per_layer=218_103_808, embed=0)
    d = daemon_factory(model_dir=model, memory={"limit": "4GiB"}).start()
    d.drop("a.jsonl", sample_lines(10))
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed") and x, 60)
    assert b["state"] == "failed"
    assert not d.events("worker_started")
    reason = b["reason"]
    assert "does not fit in memory on any setting" in reason and "nothing was loaded" in reason
    assert "GiB" in reason and "4.0 GiB" in reason, reason  # the estimate and the limit, as figures
    plan = d.events("memory_plan")[0]
    assert plan["never_fits"] and not plan["fits"]
    queued, failed = d.events("batch_queued")[0], d.events("batch_failed")[0]
    from datetime import datetime

    took = datetime.fromisoformat(failed["timestamp"]) - datetime.fromisoformat(queued["timestamp"])
    assert took.total_seconds() < 1.0, took
    assert (d.root / "failed" / "a.jsonl").is_file()
    assert any("does not fit" in p.read_text() for p in (d.root / "failed").iterdir() if p.name != "a.jsonl")
    assert d.terminate() == 0


@pytest.mark.slow
def test_estimates_hold_on_a_second_shape(tmp_path):
    """A 0.14 B bf16 model (hidden 1024, 8 layers) trained by the real worker in an fp32 batch on each exact layout:
    the measured peak RSS (result.json) is under the estimate of its rung and the estimate within 1.6x of it."""
    import os
    import subprocess
    import sys

    from trainerd.config import TrainSettings, dump_json, from_dict
    from trainerd.planning import estimate_training_bytes, read_model_shape
    from trainerd.worker.testing import build_random_model

    model = build_random_model(Path(tempfile.gettempdir()) / "trainerd-test-models" / "llama-0.14b-bf16",
                               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                    num_attention_heads=16, num_key_value_heads=4, vocab_size=49152))
    shape = read_model_shape(model)
    for layout in ("float32", "bfloat16"):
        batch = tmp_path / layout
        batch.mkdir()
        (batch / "data.jsonl").write_text("\n".join(sample_lines(24)) + "\n")
        s = from_dict({"root": str(tmp_path / "root"), "model": {"path": str(model), "dtype": "float32",
                                                                 "base_weights": layout, "device": "cpu"},
                       **SHORT, "log": {"file": False}}, source="test")
        dump_json(s, batch / "settings.json")
        # stdin held open as the supervisor does (EOF there means "parent gone": stop)
        p = subprocess.Popen([sys.executable, "-m", "trainerd.worker", str(batch)], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=open(batch / "stderr", "w"),
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        try:
            assert p.wait(timeout=600) == 0, (batch / "stderr").read_text()[-2000:]
        finally:
            p.stdin.close()
        result = json.loads((batch / "result.json").read_text())
        assert result["base_weights"] == layout
        t: TrainSettings = s.train
        est = estimate_training_bytes(shape, t.micro_batch_size, t.seq_len, precision="float32", weights=layout)
        peak = result["peak_rss_bytes"]
        assert peak <= est <= 1.6 * peak, (layout, peak / MiB, est / MiB)
