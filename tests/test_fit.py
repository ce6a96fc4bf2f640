"""Fitting a model that does not fit (issue 19): the plan made from the model's files before
anything is loaded, with the real daemon, the real worker and a real memory cgroup.

The big model is issue 19's: a random Llama of 0.92 B parameters (hidden 2048, 16 layers,
SmolLM2's vocabulary size, tied embeddings) saved in bf16: 1.72 GiB on disk, 3.44 GiB in fp32.
It is built once a session (~25 s of CPU) and kept under the temporary directory for later ones.
Why not a smaller one: the planner's fixed costs (the runtime, the fp32 batch's copy of the tied
head, the margin) are ~1 GiB whatever the size, so for a 0.5 B model even the bf16 rung's need is
above the model's fp32 size and the premise (a cgroup smaller than that, larger than the rung's
need) cannot hold; 14 layers leave a window of 0.07 GiB. What costs time is tokens, not
parameters: one optimizer step of one 32-token block.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import tempfile
from pathlib import Path

import pytest

from workerutil import make_batch, run_worker, sample_lines

MiB, GiB = 1 << 20, 1 << 30
BIG_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152)
# An fp32 batch whatever the CPU (dtype auto is bf16 on one with avx512_bf16): the case the issue
# is about, a bf16 checkpoint that the worker used to load as fp32. What is tested is memory,
# not learning: one optimizer step of one micro-batch (one line of 27 tokens, one 32-token block),
# no warm-up, no periodic checkpoint. The evaluation's budget (0.1 x the trained tokens) holds no
# set, so the gate checks the loss for NaN only.
ONE_STEP = {"model": {"dtype": "float32"},
            "train": {"seq_len": 32, "micro_batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 0,
                      "checkpoint_every_steps": 0, "threads": 2},
            "memory": {"interval_ms": 50}}
ONE_LINE = [json.dumps({"text": "The quick brown fox 0 jumps over the lazy dog. " * 2})]
# What the daemon itself holds in the cgroup besides the worker (the supervisor is ~40 MiB).
SUPERVISOR_BYTES = 96 * MiB


@pytest.fixture(scope="session")
def big_model_dir() -> Path:
    """The 0.92 B bf16 model, built once and kept in the temporary directory."""
    from trainerd.worker.testing import build_random_model

    return build_random_model(Path(tempfile.gettempdir()) / "trainerd-test-models" / "llama-0.92b-bf16", BIG_SHAPE)


def _drop_from_page_cache(model_dir: Path) -> None:
    """Evict the model's files from the page cache. A page is charged to the cgroup that first read
    it: weights cached by whoever built or last read the model would cost the test's cgroup nothing
    (measured: a process in a 1 GiB cgroup mapped all 1.7 GiB of this model's cached file with a peak
    usage of 5 MiB). Evicted, every page the worker maps is charged to its cgroup."""
    for f in model_dir.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _window(model_dir: Path) -> tuple[int, int, int]:
    """(the bf16 rung's need, the cgroup limit, the model's fp32 size): the limit halfway between the
    need (the plan's estimate over the soft fraction, plus the supervisor) and the fp32 weights."""
    from trainerd.core.settings import MemorySettings, TrainSettings
    from trainerd.core.ladder import ladder
    from trainerd.core.planning import read_model_shape

    shape = read_model_shape(model_dir)
    rungs = ladder(shape, TrainSettings(**ONE_STEP["train"]), precision="float32")
    bf16 = next(r for r in rungs if r.weights == "bfloat16")
    need = int(bf16.estimate_bytes / MemorySettings().soft) + SUPERVISOR_BYTES
    fp32 = shape["params"] * 4
    assert need < fp32, ("the premise does not hold for this shape", need / GiB, fp32 / GiB)
    return need, (need + fp32) // 2, fp32


def _attempt_results(root: Path) -> list[dict]:
    db = sqlite3.connect(root / "state.db")
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT result_json FROM attempts ORDER BY n") if r[0]]
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.cgroup
def test_bf16_model_larger_than_the_cgroup_in_fp32_trains_to_an_adapter(memcg, daemon_factory, big_model_dir):
    """Under a cgroup smaller than the model's fp32 weights (and larger than what the planner says the
    bf16-as-stored rung needs) the plan picks that rung, the worker maps the bf16 checkpoint as
    stored, and the batch trains to a published adapter with no memory stop, no guard kill and no
    kernel OOM kill; the weights were really charged to that cgroup; the worker's measured peak RSS is
    under the plan's estimate and the estimate within 1.6x of it."""
    need, limit, fp32 = _window(big_model_dir)
    _drop_from_page_cache(big_model_dir)
    cg = memcg(limit)
    d = daemon_factory(cgroup=cg, model_dir=big_model_dir, **ONE_STEP).start()
    d.drop("a.jsonl", ONE_LINE)
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed") and x, 600)
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
    # The premise, measured: the cgroup held the mapped bf16 weights at its peak (they were charged
    # to it, not to an earlier reader), and its limit is under the fp32 weights.
    stored = sum(f.stat().st_size for f in big_model_dir.glob("*.safetensors"))
    assert stored < cg.max_usage_bytes() <= limit < fp32, (stored / GiB, cg.max_usage_bytes() / GiB, limit / GiB)
    (result,) = _attempt_results(d.root)
    assert result["total_steps"] == 1, result["total_steps"]  # what the test's cost is sized on
    peak = result["peak_rss_bytes"]
    print(f"limit {limit / MiB:.0f} MiB (rung needs {need / MiB:.0f}, fp32 weights {fp32 / MiB:.0f}); cgroup peak "
          f"{cg.max_usage_bytes() / MiB:.0f} MiB; worker peak RSS {peak / MiB:.0f} MiB, estimate "
          f"{plan['estimate_bytes'] / MiB:.0f} MiB ({plan['estimate_bytes'] / peak:.3f}x)")
    assert peak <= plan["estimate_bytes"] <= 1.6 * peak, (peak / MiB, plan["estimate_bytes"] / MiB)
    meta = json.loads((d.root / "adapters" / "1" / "trainerd.json").read_text())
    assert (meta["base_weights"], meta["quantized"], meta["numerics_changes"]) == ("bfloat16", False, [])
    assert d.terminate() == 0


def _header_only_model(d: Path, shape: dict, params_per_layer: int) -> Path:
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
    model = _header_only_model(tmp_path / "llama-8b", shape, params_per_layer=218_103_808)
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


SECOND_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=49152)


@pytest.mark.slow
def test_estimates_hold_on_a_second_shape(tmp_path):
    """A 0.14 B bf16 model (hidden 1024, 8 layers, grouped-query attention) trained by the real worker in an fp32
    batch at micro-batch 2 x seq 64 on each exact layout: the measured peak RSS (result.json) is under the
    estimate of its rung and the estimate within 1.6x of it."""
    from trainerd.core.planning import estimate_training_bytes, read_model_shape
    from trainerd.worker.testing import build_random_model

    model = build_random_model(Path(tempfile.gettempdir()) / "trainerd-test-models" / "llama-0.14b-bf16", SECOND_SHAPE)
    shape = read_model_shape(model)
    train = {"seq_len": 64, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 0,
             "checkpoint_every_steps": 0, "threads": 2}
    for layout in ("float32", "bfloat16"):
        batch = make_batch(tmp_path / layout, model, sample_lines(3), model={"base_weights": layout}, train=train)
        code, result, _ = run_worker(batch, timeout=600)
        assert code == 0 and result["base_weights"] == layout, (code, result)
        est = estimate_training_bytes(shape, 2, 64, precision="float32", weights=layout)
        peak = result["peak_rss_bytes"]
        print(f"{layout}: peak RSS {peak / MiB:.0f} MiB, estimate {est / MiB:.0f} MiB ({est / peak:.3f}x)")
        assert peak <= est <= 1.6 * peak, (layout, peak / MiB, est / MiB)
