"""The real worker as a subprocess on the tiny model: exit codes, stops, checkpoints, exactness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from workerutil import (adapter_bytes, clean_runs, finish, make_batch, run_worker, sample_lines, start_worker,
                        wait_for_event, write_settings)

LONG = 600  # lines: enough steps that a stop lands mid-run


def _reference(tmp_path_factory, tiny_model_dir, dtype):
    tmp = tmp_path_factory.mktemp(f"reference-{dtype}")
    batch = make_batch(tmp, tiny_model_dir, sample_lines(120), dtype=dtype)
    rc, result, logs = run_worker(batch)
    assert rc == 0, result
    assert result["precision"] == dtype
    return batch, result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """One uninterrupted fp32 run that the resumed runs must match bit for bit."""
    return _reference(tmp_path_factory, tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def reference_bf16(tmp_path_factory, tiny_model_dir):
    """The same uninterrupted run in bf16 (autocast, bf16 base Linear weights, fp32 LoRA and AdamW)."""
    return _reference(tmp_path_factory, tiny_model_dir, "bfloat16")


@pytest.fixture(params=["float32", "bfloat16"])
def precision_reference(request):
    """(dtype, reference batch, its result) for each precision."""
    name = "reference" if request.param == "float32" else "reference_bf16"
    return (request.param, *request.getfixturevalue(name))


def test_uninterrupted_run_finishes_and_reports(reference):
    """A clean run exits 0 and result.json carries steps, tokens, losses, tokens/s and peak RSS."""
    batch, result = reference
    assert result["status"] == "done" and result["exit_code"] == 0
    assert result["step"] == result["total_steps"] > 1
    assert result["tokens"] > 0 and result["tokens_per_s"] > 0 and result["peak_rss_bytes"] > 10 << 20
    assert result["first_loss"] > 0 and result["last_loss"] > 0
    assert (batch / "final_adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((batch / "final_adapter" / "trainerd.json").read_text())
    assert meta["steps"] == result["step"]


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path, tiny_model_dir, precision_reference):
    """SIGKILL right after step 5 (checkpoint at 4), then a resume: the adapter equals the uninterrupted one (fp32 and bf16)."""
    dtype, ref_batch, ref = precision_reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120), dtype=dtype)
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))
    assert rc == -signal.SIGKILL
    rc, result, logs = run_worker(batch)
    assert rc == 0
    started = next(l for l in logs if l["event"] == "training_started")
    assert started["resumed_from"] == "step-00000004" and started["step"] == 4
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")
    assert result["last_loss"] == ref["last_loss"]


def test_stop_file_resume_many_times_is_bit_identical(tmp_path, tiny_model_dir, precision_reference):
    """Stopped by the batch .stop at arbitrary points (mid-step too) and resumed 3 times: bit-identical (fp32 and bf16)."""
    dtype, ref_batch, _ = precision_reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120), dtype=dtype)
    stops = 0
    for min_step in (2, 5, 9):
        proc = start_worker(batch)
        wait_for_event(proc, "step", min_step=min_step)
        (batch / ".stop").write_text("memory")
        rc = finish(proc)
        result = json.loads((batch / "result.json").read_text())
        if rc == 0:
            break
        assert rc == 75 and result["reason"] == "memory" and result["checkpoint"]
        stops += 1
        clean_runs(batch)
    assert stops >= 2
    rc, result, _ = run_worker(batch)
    assert rc == 0
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")


@pytest.mark.parametrize("how", ["batch_stop", "global_stop", "sigterm", "sigint", "stdin_closed"])
def test_each_stop_gives_exit_75_and_a_checkpoint(tmp_path, tiny_model_dir, how):
    """The batch .stop, the global .stop, SIGTERM, SIGINT and EOF on the lifeline each end in 75 + checkpoint."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(LONG), train={"checkpoint_every_steps": 0})
    root = tmp_path / "root"
    # Only the lifeline case gets a pipe: communicate() closes stdin, which is itself a stop.
    proc = start_worker(batch, stdin=subprocess.PIPE if how == "stdin_closed" else subprocess.DEVNULL)
    wait_for_event(proc, "step", min_step=1)
    # If the kernel must kill, it kills the worker, never the supervisor.
    assert Path(f"/proc/{proc.pid}/oom_score_adj").read_text().strip() == "1000"
    if how == "batch_stop":  # written atomically, as the memory guard does
        (batch / ".stop.tmp").write_text("recycle")
        os.replace(batch / ".stop.tmp", batch / ".stop")
    elif how == "global_stop":
        (root / ".stop").touch()
    elif how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "sigint":
        proc.send_signal(signal.SIGINT)
    else:
        proc.stdin.close()
    rc = finish(proc)
    result = json.loads((batch / "result.json").read_text())
    expected = {"batch_stop": "recycle", "global_stop": "paused", "sigterm": "shutdown", "sigint": "shutdown",
                "stdin_closed": "parent_gone"}[how]
    assert rc == 75, result
    assert result["status"] == "stopped" and result["reason"] == expected
    assert result["step"] < result["total_steps"]
    ckpt = batch / result["checkpoint"]
    assert (ckpt / "state.json").is_file() and (ckpt / "optimizer.pt").is_file()


def test_torn_checkpoint_is_skipped(tmp_path, tiny_model_dir, reference):
    """A newer checkpoint missing a file (torn) and a .tmp folder are ignored; resume uses the last complete one."""
    ref_batch, _ = reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120))
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))
    assert rc == -signal.SIGKILL
    ck = batch / "checkpoints"
    torn = ck / "step-00000009"
    torn.mkdir()
    (torn / "state.json").write_text('{"step": 9, "cursor": ')  # half-written JSON
    (ck / ".tmp-step-00000010-99999").mkdir()
    rc, _, logs = run_worker(batch)
    assert rc == 0
    started = next(l for l in logs if l["event"] == "training_started")
    assert started["resumed_from"] == "step-00000004"
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")


@pytest.mark.parametrize("background", [False, True])
def test_crash_during_checkpoint_write_keeps_previous(tmp_path, tiny_model_dir, reference, background):
    """Killed in the middle of writing a checkpoint (in the step loop, or in the background writer's
    thread): only a .tmp folder is left; resume is still exact."""
    ref_batch, _ = reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120), train={"checkpoint_async": background})
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_in_checkpoint"))
    assert rc == -signal.SIGKILL
    assert not [p for p in (batch / "checkpoints").iterdir() if p.name.startswith("step-")]
    rc, _, _ = run_worker(batch)
    assert rc == 0
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")


def _tally_step(batch: Path) -> int:
    try:
        return int(json.loads((batch / "tally.json").read_bytes())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


@pytest.mark.slow
def test_resume_is_exact_across_an_adaptive_interval_and_background_writes(tmp_path, tiny_model_dir):
    """checkpoint_every_s: auto with a short MTBF: checkpoints at steps only the clock chooses,
    written by the background writer from a copy; SIGKILL after the second one, then resume: the
    adapter equals an uninterrupted run's (whose checkpoints land elsewhere) bit for bit.

    The clock's interval is at least 2 s and grows with what a checkpoint costs here, so how many
    lines give two clock-chosen checkpoints before the end depends on the machine: a run that ends
    first (its final checkpoint, written in the loop, comes before the second background one) is
    tried again with twice the lines."""
    adaptive = {"checkpoint_every_steps": 0, "checkpoint_every_s": "auto", "checkpoint_async": True}
    for n in (3000, 6000, 12000, 24000):
        lines = sample_lines(n)
        batch = make_batch(tmp_path / str(n), tiny_model_dir, lines, train=adaptive)
        proc = start_worker(batch, "--mtbf-s", "1")
        interval = wait_for_event(proc, "checkpoint_interval")
        assert interval["rule"] in ("min", "overhead") and interval["mtbf_s"] == 1.0
        saved = []
        while len(saved) < 2 and (e := wait_for_event(proc, "checkpoint_saved"))["background"]:
            saved.append(e)  # only the final checkpoint is written in the loop
        # Far enough from the end that a kill lands before it on a fast machine too.
        if len(saved) == 2 and saved[-1]["step"] + 20 < json.loads((batch / "progress.json").read_text())["total_steps"]:
            break
        assert finish(proc) == 0  # too short for two clock-chosen checkpoints here: twice the lines
    else:
        pytest.fail("24000 lines never gave two clock-chosen checkpoints before the end")
    # Two steps past that checkpoint, read from tally.json (written every step; step lines thin
    # out after the first 10 steps, progress.json is written twice a second).
    deadline = time.monotonic() + 120
    while (kill_after := _tally_step(batch)) < saved[-1]["step"] + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    assert finish(proc) == -signal.SIGKILL
    assert kill_after < json.loads((batch / "progress.json").read_text())["total_steps"], "finished before the kill"
    ref = make_batch(tmp_path / str(n), tiny_model_dir, lines, name="ref")
    rc, _, _ = run_worker(ref)
    assert rc == 0
    rc, result, logs = run_worker(batch, "--mtbf-s", "1")
    assert rc == 0
    started = next(l for l in logs if l["event"] == "training_started")
    assert started["step"] >= saved[-1]["step"]  # the newest complete checkpoint (maybe one the kill left behind)
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref / "final_adapter")


def test_crash_during_publish_never_leaves_half_adapter(tmp_path, tiny_model_dir, reference):
    """Killed while publishing: the destination does not exist; the rerun publishes the same adapter."""
    ref_batch, _ = reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120))
    dest = tmp_path / "published"
    rc, _, _ = run_worker(batch, "--publish", str(dest), env=subprocess_env(TRAINERD_FAULT="crash_in_publish"))
    assert rc == -signal.SIGKILL and not dest.exists()
    rc, result, logs = run_worker(batch, "--publish", str(dest))
    assert rc == 0 and result["adapter"] == str(dest)
    assert not [l for l in logs if l["event"] == "step"]  # resumed at the end: nothing retrained
    assert adapter_bytes(dest) == adapter_bytes(ref_batch / "final_adapter")


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-4), ("bfloat16", 2e-3)])
def test_memory_backoff_resume_keeps_cursor_and_effective_batch(tmp_path, tiny_model_dir, request, dtype, rel):
    """Resumed with half the micro-batch and double accumulation: same cursor, same effective batch, same losses
    (within float summation order: 1e-4 in fp32, 2e-3 in bf16)."""
    ref_batch, ref = request.getfixturevalue("reference" if dtype == "float32" else "reference_bf16")
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120), dtype=dtype)
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))
    assert rc == -signal.SIGKILL
    state = json.loads((batch / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["precision"] == dtype
    write_settings(batch, tmp_path / "root", tiny_model_dir, train={"micro_batch_size": 1, "grad_accum_steps": 4},
                   dtype=dtype)
    rc, result, logs = run_worker(batch)
    assert rc == 0
    started = next(l for l in logs if l["event"] == "training_started")
    assert started["cursor"] == state["cursor"] and started["micro_batch_size"] == 1
    assert started["effective_batch"] == 4 and result["total_steps"] == ref["total_steps"]
    assert result["micro_batch_size"] == 1 and result["grad_accum_steps"] == 4
    # Same tokens, same objective; only the float summation order differs.
    assert result["last_loss"] == pytest.approx(ref["last_loss"], rel=rel)


def test_resumed_batch_keeps_its_precision_when_the_settings_change(tmp_path, tiny_model_dir, reference_bf16):
    """A bf16 batch resumed under settings that now say float32 stays bf16 (from its checkpoint) and ends bit-identical."""
    ref_batch, _ = reference_bf16
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120), dtype="bfloat16")
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))
    assert rc == -signal.SIGKILL
    assert json.loads((batch / "precision.json").read_text())["precision"] == "bfloat16"
    write_settings(batch, tmp_path / "root", tiny_model_dir, dtype="float32")  # an upgrade, another machine...
    rc, result, logs = run_worker(batch)
    assert rc == 0 and result["precision"] == "bfloat16"
    kept = next(l for l in logs if l["event"] == "precision_kept")
    assert kept["source"] == "checkpoint" and kept["settings_dtype"] == "float32"
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")


def test_precision_is_decided_before_the_first_checkpoint(tmp_path, tiny_model_dir):
    """A restart without a checkpoint keeps what precision.json says; a fresh auto batch resolves, logs why, records it."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(30), dtype="auto")
    (batch / "precision.json").write_text(json.dumps({"precision": "float32"}))  # as left by a first attempt
    rc, result, logs = run_worker(batch)
    assert rc == 0 and result["precision"] == "float32"
    assert not [l for l in logs if l["event"] == "precision_resolved"]
    assert next(l for l in logs if l["event"] == "precision_kept")["source"] == "batch"
    batch2 = make_batch(tmp_path / "fresh", tiny_model_dir, sample_lines(30), dtype="auto")
    rc, result, logs = run_worker(batch2)
    resolved = next(l for l in logs if l["event"] == "precision_resolved")
    assert rc == 0 and resolved["source"] == "auto" and "native_bf16" in resolved
    assert json.loads((batch2 / "precision.json").read_text())["precision"] == result["precision"]


def test_continues_from_init_adapter(tmp_path, tiny_model_dir, reference):
    """--init-adapter starts from the given adapter's weights rather than a fresh LoRA init."""
    ref_batch, ref = reference
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(120))
    rc, result, logs = run_worker(batch, "--init-adapter", str(ref_batch / "final_adapter"))
    assert rc == 0
    started = next(l for l in logs if l["event"] == "training_started")
    assert started["init_adapter"] == str(ref_batch / "final_adapter")
    # Trained further from a trained adapter: it starts where the first run ended, not from scratch.
    assert result["first_loss"] < ref["first_loss"]
    assert adapter_bytes(batch / "final_adapter") != adapter_bytes(ref_batch / "final_adapter")


def test_bad_lines_reported_and_file_rejected_above_threshold(tmp_path, tiny_model_dir):
    """Too many bad lines: exit 65, result.json lists them with line numbers and reasons; errors.jsonl has all."""
    lines = sample_lines(20)
    lines[3] = "{not json"
    lines[7] = json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    lines[11] = json.dumps([1, 2])
    batch = make_batch(tmp_path, tiny_model_dir, lines, data={"max_bad_fraction": 0.1})
    rc, result, logs = run_worker(batch)
    assert rc == 65 and result["status"] == "bad_data"
    assert "too many bad lines: 3 of 20" in result["reason"]
    got = {e["line"]: e["reason"] for e in result["errors"]}
    assert set(got) == {4, 8, 12}
    assert "invalid JSON" in got[4] and "role" in got[8] and "array" in got[12]
    assert len((batch / "errors.jsonl").read_text().splitlines()) == 3


def test_few_bad_lines_are_skipped_and_training_goes_on(tmp_path, tiny_model_dir):
    """Bad lines under the threshold are skipped, counted and written to errors.jsonl; the run finishes."""
    lines = sample_lines(60)
    lines[10] = "\xff garbage"
    batch = make_batch(tmp_path, tiny_model_dir, lines, data={"max_bad_fraction": 0.05})
    rc, result, _ = run_worker(batch)
    assert rc == 0 and result["lines_bad"] == 1 and result["lines_good"] == 59
    assert json.loads((batch / "errors.jsonl").read_text())["line"] == 11


def test_settings_errors_exit_78_with_every_problem(tmp_path, tiny_model_dir):
    """Invalid settings.json: exit 78 and every problem is named with its key path."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(5))
    bad = json.loads((batch / "settings.json").read_text())
    bad["train"]["micro_batch_size"] = 0
    bad["train"]["learning_rat"] = 0.1
    bad["lora"]["dropout"] = "high"
    (batch / "settings.json").write_text(json.dumps(bad))
    rc, result, _ = run_worker(batch)
    assert rc == 78 and result["status"] == "bad_config"
    problems = "\n".join(result["problems"])
    assert "train.micro_batch_size: must be >= 1, got 0" in problems
    assert "train.learning_rat: unknown key (did you mean 'learning_rate'?)" in problems
    assert "lora.dropout: must be a number" in problems


def test_missing_model_is_a_settings_error(tmp_path, tiny_model_dir):
    """A model path with no model is exit 78 with a hint, not a crash."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(5), model={"path": str(tmp_path / "nope")})
    rc, result, _ = run_worker(batch)
    assert rc == 78 and "model.path" in result["reason"]


def test_no_dataset_cache_files_appear(tmp_path, tiny_model_dir):
    """Training writes nothing to the HF/datasets caches and only the documented files in the batch folder."""
    cache = tmp_path / "hf-home"
    cache.mkdir()
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(60))
    env = subprocess_env(HF_HOME=str(cache), HF_DATASETS_CACHE=str(cache / "datasets"), XDG_CACHE_HOME=str(cache))
    rc, _, _ = run_worker(batch, env=env)
    assert rc == 0
    assert [p for p in cache.rglob("*")] == []
    assert sorted(p.name for p in batch.iterdir()) == sorted(
        ["data.jsonl", "settings.json", "split.json", "holdout.jsonl", "scan.json", "errors.jsonl", "checkpoints",
         "progress.json", "heartbeat", "replay-contrib.jsonl", "eval.json", "result.json", "final_adapter",
         "precision.json", "tally.json"])
    assert not list(batch.rglob("*.arrow")) and not list(tmp_path.rglob("cache-*"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_out_of_memory_in_a_step_halves_micro_batch_and_redoes_the_step(tmp_path, tiny_model_dir, dtype):
    """An OOM inside a step (injected) backs off 4 -> 2 -> 1 and ends bit-identical to a micro-batch-1 run (fp32 and bf16)."""
    plain = make_batch(tmp_path / "plain", tiny_model_dir, sample_lines(60),
                       train={"micro_batch_size": 1, "grad_accum_steps": 4}, dtype=dtype)
    rc, ref, _ = run_worker(plain)
    assert rc == 0
    batch = make_batch(tmp_path / "oom", tiny_model_dir, sample_lines(60),
                       train={"micro_batch_size": 4, "grad_accum_steps": 1}, dtype=dtype)
    rc, result, logs = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="oom_above_micro:1"))
    assert rc == 0, result
    backoffs = [l for l in logs if l["event"] == "cuda_oom_backoff"]
    assert [(b["micro_batch_size_was"], b["micro_batch_size"]) for b in backoffs] == [(4, 2), (2, 1)]
    assert result["micro_batch_size"] == 1 and result["grad_accum_steps"] == 4
    assert result["total_steps"] == ref["total_steps"]
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(plain / "final_adapter")


def test_out_of_memory_at_micro_batch_1_is_a_memory_stop(tmp_path, tiny_model_dir):
    """An OOM that persists at micro-batch 1 ends in exit 75, reason memory, with a checkpoint to resume from."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(60), train={"micro_batch_size": 2})
    rc, result, logs = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="oom_above_micro:0"))
    assert rc == 75 and result["reason"] == "memory"
    assert (batch / result["checkpoint"] / "state.json").is_file()
    assert any(l["event"] == "cuda_oom_at_micro_batch_1" for l in logs)


@pytest.mark.slow
def test_compiled_layers_resume_bit_identical(tmp_path, tiny_model_dir):
    """train.compile (torch.compile per decoder layer, bf16): SIGKILL after step 5 and a resume end bit-identical
    to an uninterrupted compiled run (the first compile takes minutes on 2 cores; later ones hit inductor's cache)."""
    ref = make_batch(tmp_path / "ref", tiny_model_dir, sample_lines(120), dtype="bfloat16", train={"compile": True})
    rc, result, logs = run_worker(ref, timeout=900)
    assert rc == 0 and next(l for l in logs if l["event"] == "compile_enabled")["layers"] == 2
    batch = make_batch(tmp_path / "run", tiny_model_dir, sample_lines(120), dtype="bfloat16", train={"compile": True})
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"), timeout=900)
    assert rc == -signal.SIGKILL
    rc, _, _ = run_worker(batch, timeout=900)
    assert rc == 0
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref / "final_adapter")
