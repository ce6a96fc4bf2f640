"""Planning from tables: the one back-off rule, and the plan that walks its ladder."""

from __future__ import annotations

import pytest

from trainerd.core import ladder as ladder_mod
from trainerd.core import planning
from trainerd.core.settings import TrainSettings
from trainerd.core.planning import back_off, estimate_training_bytes


def plan_micro_batch(shape, train, lora=None, *, limit_bytes, baseline_bytes, available_bytes, soft,
                     precision="float32", ranks=1):
    """The ladder's plan over the micro-batch walk alone (the layout of the precision)."""
    rungs = ladder_mod.ladder(shape, train, lora, precision=precision, base_weights=planning.default_weights(precision),
                              ranks=ranks)
    rungs.sort(key=lambda r: -r.estimate_bytes)  # the walk, largest first (speed order puts gc last anyway)
    return ladder_mod.plan(rungs, limit_bytes=min(limit_bytes, baseline_bytes + available_bytes),
                           guard_limit_bytes=limit_bytes, baseline_bytes=baseline_bytes, soft=soft)

MiB = 1 << 20
# SmolLM2-135M's numbers (what read_model_shape gives for it; see test_memguard)
SHAPE = {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64, "intermediate": 1536,
         "vocab": 49152, "params": 134515008}
SEQ = 256


def ladder(mb: int, accum: int, gc: bool) -> list[tuple[int, int, bool]]:
    """Every setting back_off steps through after (mb, accum, gc), in order."""
    out = []
    cur: tuple[int, int, bool] | None = (mb, accum, gc)
    while (cur := back_off(*cur)) is not None:
        out.append(cur)
    return out


@pytest.mark.parametrize("start, expected", [
    ((8, 2, False), [(4, 4, False), (2, 8, False), (1, 16, False), (1, 16, True)]),
    ((4, 4, False), [(2, 8, False), (1, 16, False), (1, 16, True)]),
    ((6, 1, False), [(3, 2, False), (1, 6, False), (1, 6, True)]),
    ((3, 2, False), [(1, 6, False), (1, 6, True)]),
    ((5, 2, False), [(2, 5, False), (1, 10, False), (1, 10, True)]),
    ((4, 4, True), [(2, 8, True), (1, 16, True)]),
    ((1, 16, False), [(1, 16, True)]),
    ((1, 16, True), []),
])
def test_back_off_sequence(start, expected):
    """back_off halves the micro-batch keeping micro x accum exact, then turns on checkpointing, then stops."""
    steps = ladder(*start)
    assert steps == expected
    assert all(mb * acc == start[0] * start[1] for mb, acc, _ in steps)


def _plan(mb: int, accum: int, gc: bool, *, limit: int, baseline: int = 0, available: int = 1 << 50,
          soft: float = 1.0):
    train = TrainSettings(seq_len=SEQ, micro_batch_size=mb, grad_accum_steps=accum, gradient_checkpointing=gc)
    return plan_micro_batch(SHAPE, train, None, limit_bytes=limit, baseline_bytes=baseline,
                            available_bytes=available, soft=soft)


def _estimate(setting: tuple[int, int, bool]) -> int:
    return estimate_training_bytes(SHAPE, setting[0], SEQ, gradient_checkpointing=setting[2])


@pytest.mark.parametrize("start", [(8, 2, False), (6, 1, False), (5, 2, False), (4, 4, True)])
def test_plan_options_are_the_back_off_ladder(start):
    """With a budget of exactly one rung's estimate the plan picks that rung; every plan is on the ladder."""
    rungs = [start, *ladder(*start)]
    for rung in rungs:
        p = _plan(*start, limit=_estimate(rung))
        assert (p.micro_batch_size, p.grad_accum_steps, p.gradient_checkpointing, p.fits) == (*rung, True)
    for budget_mib in range(300, 8000, 37):
        p = _plan(*start, limit=budget_mib * MiB)
        assert (p.micro_batch_size, p.grad_accum_steps, p.gradient_checkpointing) in rungs


@pytest.mark.parametrize("limit_mib, expected", [
    (100_000, ((8, 2, False), True)),      # room to spare: the configured setting is kept
    (3100, ((4, 4, False), True)),         # halved once
    (2500, ((2, 8, False), True)),         # halved twice
    (2000, ((1, 16, False), True)),        # halved three times
    (1400, ((1, 16, True), True)),         # only the last rung fits
    (600, ((1, 16, True), False)),         # nothing fits: the last rung, marked so
])
def test_plan_fits_and_does_not_fit(limit_mib, expected):
    """The plan is the first rung under the budget, or the last one with fits=False."""
    p = _plan(8, 2, False, limit=limit_mib * MiB)
    assert ((p.micro_batch_size, p.grad_accum_steps, p.gradient_checkpointing), p.fits) == expected
    assert p.budget_bytes == limit_mib * MiB and (p.estimate_bytes <= p.budget_bytes) == p.fits


@pytest.mark.parametrize("limit, baseline, available, soft, want_limit, want_budget", [
    (1000, 0, 5000, 0.85, 1000, 850),      # the guard's limit
    (1000, 100, 500, 0.85, 600, 410),      # the host's headroom is smaller: baseline + MemAvailable
    (1000, 200, 5000, 0.85, 1000, 650),    # what the cgroup already holds comes off the budget
])
def test_plan_limit_and_budget(limit, baseline, available, soft, want_limit, want_budget):
    """limit = min(guard limit, baseline + MemAvailable); budget = soft x limit - baseline."""
    p = _plan(4, 4, False, limit=limit * MiB, baseline=baseline * MiB, available=available * MiB, soft=soft)
    assert p.limit_bytes == want_limit * MiB
    assert p.budget_bytes == int(want_limit * MiB * soft) - baseline * MiB == pytest.approx(want_budget * MiB, abs=1)


def test_estimate_knows_precision_and_the_fused_loss():
    """bf16 (projections in bf16, fewer activation bytes) and the fused loss (no full logits) each lower the estimate."""
    for mb in (1, 4, 8):
        fp32 = estimate_training_bytes(SHAPE, mb, SEQ)
        assert estimate_training_bytes(SHAPE, mb, SEQ, precision="bfloat16") < fp32
        assert estimate_training_bytes(SHAPE, mb, SEQ, fused_loss=False) > fp32
    # the full logits cost 4 copies of micro x seq x vocab fp32 (~0.8 GB at micro-batch 4), the fused loss
    # a fixed working set: measured 343-449 MiB less at micro 4, 1115 MiB at micro 8 (fp32)
    saved = estimate_training_bytes(SHAPE, 4, SEQ, fused_loss=False) - estimate_training_bytes(SHAPE, 4, SEQ)
    assert 350 * MiB < saved < 550 * MiB
    with pytest.raises(ValueError, match="precision"):
        estimate_training_bytes(SHAPE, 4, SEQ, precision="fp8")


def test_plan_in_bf16_keeps_a_larger_micro_batch():
    """Under the same budget a bf16 batch is planned at least as large as an fp32 one (here: larger)."""
    train = TrainSettings(seq_len=SEQ, micro_batch_size=8, grad_accum_steps=2)
    kw = dict(limit_bytes=2700 * MiB, baseline_bytes=0, available_bytes=1 << 50, soft=1.0)
    fp32 = plan_micro_batch(SHAPE, train, None, **kw)
    bf16 = plan_micro_batch(SHAPE, train, None, precision="bfloat16", **kw)
    assert (fp32.micro_batch_size, bf16.micro_batch_size) == (2, 4)


def test_plan_counts_every_rank_of_the_node():
    """nproc_per_node ranks each hold a model and a working set under the same limit: with two ranks the plan
    is the one-rank plan for half the budget (the estimate is doubled), and still on the ladder."""
    train = TrainSettings(seq_len=SEQ, micro_batch_size=8, grad_accum_steps=2)
    kw = dict(limit_bytes=6000 * MiB, baseline_bytes=0, available_bytes=1 << 50, soft=1.0)
    one = plan_micro_batch(SHAPE, train, None, **kw)
    two = plan_micro_batch(SHAPE, train, None, ranks=2, **kw)
    half = plan_micro_batch(SHAPE, train, None, **{**kw, "limit_bytes": 3000 * MiB})
    assert two.micro_batch_size < one.micro_batch_size
    assert (two.micro_batch_size, two.grad_accum_steps) == (half.micro_batch_size, half.grad_accum_steps)
    assert two.estimate_bytes == 2 * half.estimate_bytes
    assert two.micro_batch_size * two.grad_accum_steps == 16


def test_expected_precision_follows_the_workers_rule(tmp_path):
    """The batch's recorded precision wins, then an explicit dtype; auto is bf16 exactly when the CPU
    flags have avx512_bf16 or amx_bf16, and float32 where an NVIDIA GPU may take the step."""
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    old = tmp_path / "old"
    old.write_text("flags\t\t: fpu avx2 avx512f\n")
    no_gpu, gpus = tmp_path / "no-driver", tmp_path / "gpus"
    (gpus / "0000:17:00.0").mkdir(parents=True)
    expect = planning.expected_precision
    assert expect("auto", "auto", cpuinfo=amx, gpus=no_gpu) == "bfloat16"
    assert expect("auto", "cpu", cpuinfo=zen4, gpus=gpus) == "bfloat16"  # device cpu: the GPU is not used
    assert expect("auto", "auto", cpuinfo=old, gpus=no_gpu) == "float32"
    assert expect("auto", "auto", cpuinfo=amx, gpus=gpus) == "float32"
    assert expect("auto", "auto", cpuinfo=tmp_path / "unreadable", gpus=no_gpu) == "float32"
    assert expect("float32", "cpu", cpuinfo=amx, gpus=no_gpu) == "float32"
    assert expect("bfloat16", "cpu", cpuinfo=old, gpus=no_gpu) == "bfloat16"
    assert expect("auto", "cpu", "float32", cpuinfo=amx, gpus=no_gpu) == "float32"  # recorded wins
    assert expect("float32", "cpu", "bfloat16", cpuinfo=old, gpus=no_gpu) == "bfloat16"
    assert planning.cpu_flags(amx) >= {"amx_bf16", "avx512f"}


# --- the ladder (issue 19) ------------------------------------------------------------------

# The 0.92 B random Llama of issue 19 (hidden 2048, 16 layers, SmolLM2's vocabulary, tied), stored in bf16:
# what read_model_shape reads from its headers.
BIG = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 32, "head_dim": 64, "intermediate": 5632,
       "vocab": 49152, "tied": 1, "params": 921_225_216, "embed_params": 100_663_296,
       "linear_params": 820_510_720, "max_linear": 11_534_336, "stored_bytes": 1_842_450_432, "bf16_checkpoint": 1}
GiB = 1 << 30


def _rungs(precision: str, shape=BIG, **kw):
    train = TrainSettings(seq_len=128, micro_batch_size=4, grad_accum_steps=4)
    return ladder_mod.ladder(shape, train, precision=precision, **kw)


@pytest.mark.parametrize("precision, quantize, expected", [
    # an fp32 batch: fp32 weights first, then the bf16 checkpoint as stored (computed in fp32), then checkpointing
    ("float32", False, ["float32 4x4", "float32 2x8", "float32 1x16", "bfloat16 4x4", "bfloat16 2x8", "bfloat16 1x16",
                        "float32 1x16 gc", "bfloat16 1x16 gc"]),
    ("bfloat16", False, ["bfloat16 4x4", "bfloat16 2x8", "bfloat16 1x16", "bfloat16 1x16 gc"]),
    ("bfloat16", True, ["bfloat16 4x4", "bfloat16 2x8", "bfloat16 1x16", "nf4 4x4", "nf4 2x8", "nf4 1x16",
                        "bfloat16 1x16 gc", "nf4 1x16 gc"]),
])
def test_ladder_order_is_estimated_speed(precision, quantize, expected):
    """The ladder lists every rung once, fastest first by the speed model (layout x halvings x checkpointing)."""
    got = [f"{r.weights} {r.micro_batch_size}x{r.grad_accum_steps}" + (" gc" if r.gradient_checkpointing else "")
           for r in _rungs(precision, quantize=quantize)]
    assert got == expected
    speeds = [r.speed for r in _rungs(precision, quantize=quantize)]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] == 1.0


def test_layouts_offer_only_exact_ones_unless_quantizing():
    """bf16 weights are offered to an fp32 batch only when the checkpoint is stored in bf16 (no rounding);
    nf4 only when quantization is allowed, last; a pinned layout is the only one."""
    fp32_ckpt = {**BIG, "bf16_checkpoint": 0}
    assert ladder_mod.layouts("float32", BIG) == ["float32", "bfloat16"]
    assert ladder_mod.layouts("float32", fp32_ckpt) == ["float32"]
    assert ladder_mod.layouts("bfloat16", fp32_ckpt, quantize=True) == ["bfloat16", "nf4"]
    assert ladder_mod.layouts("bfloat16", BIG, "unquantized", quantize=True) == ["bfloat16"]
    assert ladder_mod.layouts("float32", BIG, "nf4") == ["nf4"]
    assert not ladder_mod.quantization_available("cpu")


@pytest.mark.parametrize("precision, limit_gib, chosen, fits, never", [
    ("float32", 8.0, ("float32", 4, 4, False), True, False),       # room: the configured settings
    ("float32", 5.6, ("float32", 1, 16, False), True, False),      # fp32 weights only at micro-batch 1
    ("float32", 5.3, ("bfloat16", 4, 4, False), True, False),      # the bf16 checkpoint as stored, computed in fp32
    ("float32", 3.35, ("bfloat16", 1, 16, True), True, False),     # under its fp32 size (3.43 GiB): the slowest trains
    ("float32", 1.5, ("bfloat16", 1, 16, True), False, True),      # nothing fits: fail before loading
    ("bfloat16", 3.1, ("bfloat16", 1, 16, False), True, False),    # micro-batch 1 without recomputation
    ("bfloat16", 3.0, ("bfloat16", 1, 16, True), True, False),     # issue 19's case: 0.92 B under 3 GiB trains
])
def test_plan_picks_the_fastest_rung_that_fits(precision, limit_gib, chosen, fits, never):
    """From a table: the plan is the first rung (in speed order) under soft x limit; none fitting the guard's own
    limit is never_fits, on the smallest rung; the estimate of the choice is under the budget exactly when it fits."""
    rungs = _rungs(precision)
    limit = int(limit_gib * GiB)
    p = ladder_mod.plan(rungs, limit_bytes=limit, guard_limit_bytes=limit, baseline_bytes=0, soft=0.85)
    assert (p.rung.key, p.fits, p.never_fits) == (chosen, fits, never)
    assert (p.estimate_bytes <= p.budget_bytes) == fits
    assert all(r.estimate_bytes > p.budget_bytes for r in rungs[:rungs.index(p.rung)]) if fits else True
    if never:
        assert p.rung.estimate_bytes == min(r.estimate_bytes for r in rungs)


def test_plan_that_fits_the_guard_but_not_the_host_now_starts_small():
    """When only the host's momentary headroom is short (MemAvailable), the batch starts on the smallest rung
    instead of failing: memory may come back, and the guard protects the attempt."""
    rungs = _rungs("float32")
    p = ladder_mod.plan(rungs, limit_bytes=1 * GiB, guard_limit_bytes=8 * GiB, baseline_bytes=0, soft=0.85)
    assert not p.fits and not p.never_fits and p.rung is p.smallest


def test_next_rung_needs_less_memory_and_is_the_fastest_such():
    """After a memory stop the back-off moves to the fastest rung whose estimate is below the stopped one's,
    keeping the effective batch; from the smallest there is nowhere left."""
    rungs = _rungs("float32")
    cur = rungs[0]
    seen = [cur.key]
    while (nxt := ladder_mod.next_rung(rungs, cur.key)) is not None:
        assert nxt.estimate_bytes < cur.estimate_bytes
        assert nxt.micro_batch_size * nxt.grad_accum_steps == 16
        faster_smaller = [r for r in rungs[:rungs.index(nxt)] if r.estimate_bytes < cur.estimate_bytes and r != cur]
        assert not faster_smaller
        cur = nxt
        seen.append(cur.key)
    assert cur.estimate_bytes == min(r.estimate_bytes for r in rungs)
    assert seen[0] == ("float32", 4, 4, False) and seen[-1] == ("bfloat16", 1, 16, True)
    assert ladder_mod.next_rung(rungs, ("nf4", 3, 3, False)) is None  # not on the ladder, no estimate: no guess


def test_estimate_weights_follow_the_layout():
    """bf16 weights as stored hold half the fp32 bytes; a converting fp32 load of a bf16 checkpoint peaks at
    5 bytes a parameter; nf4 holds ~0.56 bytes per projection parameter."""
    load32, held32 = planning.weight_bytes(BIG, "float32", "float32")
    load16, held16 = planning.weight_bytes(BIG, "bfloat16", "float32")
    _, held4 = planning.weight_bytes(BIG, "nf4", "bfloat16")
    assert (load32, held32) == (BIG["params"] * 5, BIG["params"] * 4)
    assert load16 == BIG["params"] * 2 and held16 < BIG["params"] * 2 + 100_000 * 4
    assert held4 < 0.35 * held32
    with pytest.raises(ValueError, match="layout"):
        planning.weight_bytes(BIG, "int3", "float32")


def _header_file(path, tensors: dict) -> None:
    import json
    import struct

    body = json.dumps({**{k: {"dtype": d, "shape": s, "data_offsets": [0, 0]} for k, (d, s) in tensors.items()},
                       "__metadata__": {"format": "pt"}}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)


def test_read_model_shape_reads_dtypes_and_roles_from_the_headers(tmp_path):
    """read_model_shape counts parameters by role from the safetensors headers alone (tensor data may be absent)
    and calls a checkpoint bf16 only when every floating tensor is (one fp32 norm would be rounded by a bf16 load)."""
    import json
    import time

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
                                                      "num_attention_heads": 4, "intermediate_size": 128}))
    _header_file(tmp_path / "model-00001.safetensors", {"model.embed_tokens.weight": ("BF16", [100, 64]),
                                                        "model.layers.0.mlp.up_proj.weight": ("BF16", [128, 64])})
    _header_file(tmp_path / "model-00002.safetensors", {"model.layers.0.input_layernorm.weight": ("BF16", [64])})
    t0 = time.perf_counter()
    s = planning.read_model_shape(tmp_path)
    assert time.perf_counter() - t0 < 0.5
    assert (s["params"], s["embed_params"], s["linear_params"], s["max_linear"]) == (6400 + 8192 + 64, 6400, 8192, 8192)
    assert s["bf16_checkpoint"] == 1 and s["stored_bytes"] == 2 * s["params"]
    _header_file(tmp_path / "model-00002.safetensors", {"model.layers.0.input_layernorm.weight": ("F32", [64])})
    assert planning.read_model_shape(tmp_path)["bf16_checkpoint"] == 0
