"""Memory planning without torch: how much a LoRA training step needs, and which setting fits.

Stdlib only (the supervisor and the worker may both use it). Two questions, both pure:

- :func:`back_off`, the one rule for "the next smaller memory setting": after a memory stop
  (the supervisor) and while planning the first attempt (:func:`plan_micro_batch`);
- :func:`plan_micro_batch`: the first setting on that ladder whose estimate
  (:func:`estimate_training_bytes`) fits under the soft limit, in the precision the batch will
  compute in (:func:`expected_precision`: the worker's own rule, read from /proc/cpuinfo).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings classes; importing trainerd.config would bring in yaml
    from trainerd.config import LoraSettings, TrainSettings

__all__ = [
    "ESTIMATE_MARGIN",
    "FUSED_LOSS_BYTES",
    "LOGIT_COPIES",
    "RUNTIME_BYTES",
    "Plan",
    "back_off",
    "cpu_flags",
    "estimate_training_bytes",
    "expected_precision",
    "plan_micro_batch",
    "read_model_shape",
]

# Worker runtime before any model: python + torch + transformers + peft + tokenizers
# (measured 340 MiB for the imports alone on CPU; rounded up for the data pipeline).
RUNTIME_BYTES = 400 << 20
# Estimates are padded by this much: allocator fragmentation, temporaries we do not model.
ESTIMATE_MARGIN = 1.10
# Copies of the (micro x seq x vocab) fp32 logits alive at the peak when the model computes all
# of them (transformers' own loss; the worker's fallback path): logits, the float upcast /
# log-softmax inside the loss, and their gradients. Calibrated against SmolLM2-135M (seq 256 x
# micro-batch 4 peaked at 3.3-3.4 GiB RSS; this model says 3.5 GiB).
LOGIT_COPIES = 4
# The worker's fused loss (worker/loss.py) holds one chunk of logits at a time (96 MiB of fp32
# rows, its compute-dtype copy, the bf16 copy of the lm-head: ~200 MiB) and leaves the
# allocator's slack visible: calibrated so that SmolLM2-135M's measured peaks
# (benchmarks/loss_memory.py, fp32 micro 4 / 8: 2.68-2.74 / 4.20 GiB) sit under the estimate.
FUSED_LOSS_BYTES = 384 << 20
# Activations kept for backward under bf16 autocast, relative to fp32: the Linear inputs and
# outputs are bf16 copies, while the residual stream, norms and LoRA paths stay fp32.
# Calibrated against SmolLM2-135M (bf16 micro 4: 2.24 GiB) and the tiny model.
BF16_ACTIVATION_FACTOR = 0.8
PRECISIONS = ("float32", "bfloat16")
# /proc/cpuinfo flags that mean native bf16 arithmetic: AVX512-BF16 dot products (Zen 4,
# Cooper Lake and later Xeons) or AMX tiles (Sapphire Rapids and later). oneDNN uses either.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo; empty if unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_precision(dtype: str, device: str, recorded: str | None = None, *,
                       cpuinfo: str | Path = "/proc/cpuinfo", gpus: str | Path = "/proc/driver/nvidia/gpus") -> str:
    """The precision a batch's worker will compute in, decided without torch, for its memory plan.

    The batch's recorded one (precision.json) wins, as it does in the worker; then an explicit
    ``model.dtype``; for ``auto`` the worker's CPU rule (bf16 when the CPU has one of
    :data:`CPU_BF16_FLAGS`). Where the worker may pick a GPU (``device`` not ``cpu`` and an NVIDIA
    driver lists one), float32: host memory is not where that step's tensors live, and float32
    is the larger estimate."""
    if recorded in PRECISIONS:
        return recorded
    if dtype in PRECISIONS:
        return dtype
    if device != "cpu":
        try:
            if any(Path(gpus).iterdir()):
                return "float32"
        except OSError:
            pass
    return "bfloat16" if cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS) else "float32"


@dataclass(frozen=True)
class Plan:
    """Where a worker should start so that it fits under the soft limit."""

    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    estimate_bytes: int
    limit_bytes: int
    budget_bytes: int = 0            # soft x limit minus what the cgroup already holds
    fits: bool = True                # False: even micro-batch 1 + checkpointing is estimated over


def back_off(micro_batch_size: int, grad_accum_steps: int, gradient_checkpointing: bool
             ) -> tuple[int, int, bool] | None:
    """The next smaller memory setting after a memory stop, or None when there is none left.

    Halve the micro-batch and grow accumulation so that micro x accum (the effective batch,
    hence the schedule and the data cursor) stays exactly the same; at micro-batch 1 turn on
    gradient checkpointing; after that nothing is left.
    """
    if micro_batch_size > 1:
        effective = micro_batch_size * grad_accum_steps
        m = micro_batch_size // 2
        while effective % m:  # e.g. 3 -> 1, 6 -> 3; keeps the product exact
            m -= 1
        return m, effective // m, gradient_checkpointing
    if not gradient_checkpointing:
        return 1, grad_accum_steps, True
    return None


def _ladder(micro_batch_size: int, grad_accum_steps: int, gradient_checkpointing: bool
            ) -> list[tuple[int, int, bool]]:
    """The configured setting, then every back_off step from it, largest first."""
    out = [(micro_batch_size, grad_accum_steps, gradient_checkpointing)]
    while (nxt := back_off(*out[-1])) is not None:
        out.append(nxt)
    return out


def plan_micro_batch(shape: dict[str, int], train: TrainSettings, lora: LoraSettings | None = None, *,
                     limit_bytes: int, baseline_bytes: int, available_bytes: int, soft: float,
                     precision: str = "float32", ranks: int = 1) -> Plan:
    """Start at the largest setting on the back-off ladder estimated to fit under the soft limit.

    ``precision`` is the batch's (its precision.json) or the one expected for it; float32, the
    larger estimate, when unknown. ``limit_bytes`` is the guard's effective limit; the host's headroom (``baseline_bytes``,
    what the cgroup already holds, + ``available_bytes``, MemAvailable) lowers it. The budget is
    soft x limit minus the baseline. Each rung halves the micro-batch and grows accumulation by
    the same factor (micro x accum stays exact); at micro-batch 1 gradient checkpointing goes
    on. When nothing fits, the last rung, with ``fits=False``. ``ranks``: the processes of one
    node that train at once (``train.nproc_per_node``), each with its own model and working set at
    the same micro-batch, all under the same limit: the estimate is theirs together.
    """
    limit = min(limit_bytes, baseline_bytes + available_bytes)
    budget = int(limit * soft) - baseline_bytes
    options = _ladder(train.micro_batch_size, train.grad_accum_steps, train.gradient_checkpointing)
    fits = False
    for mb, accum, gc in options:
        est = ranks * estimate_training_bytes(shape, mb, train.seq_len, gradient_checkpointing=gc, lora=lora,
                                              precision=precision)
        if est <= budget:
            fits = True
            break
    return Plan(micro_batch_size=mb, grad_accum_steps=accum, gradient_checkpointing=gc, estimate_bytes=est,
                limit_bytes=limit, budget_bytes=budget, fits=fits)


# --- the estimate ----------------------------------------------------------------------


def _safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (8-byte length + JSON), without reading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: implausible safetensors header size {n}")
        header = json.loads(f.read(n))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        total += math.prod(meta.get("shape", [])) if meta.get("shape") else 1
    return total


def read_model_shape(model_dir: Path) -> dict[str, int]:
    """The numbers the estimate needs, from config.json and the weight files' headers/sizes."""
    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 768)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 12)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or max(1, hidden // 64))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 32000)
    params = 0
    for p in sorted(model_dir.glob("*.safetensors")):
        try:
            params += _safetensors_params(p)
        except (OSError, ValueError, struct.error):
            params += p.stat().st_size // 4
    if params == 0:
        size = sum(p.stat().st_size for p in model_dir.glob("*.bin")) + sum(
            p.stat().st_size for p in model_dir.glob("*.gguf"))
        params = size // 4 if size else (
            vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
            + layers * (hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + 3 * hidden * inter))
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate": inter, "vocab": vocab, "params": params}


def linear_params(shape: dict[str, int]) -> int:
    """Weights of the decoder's projections (attention and MLP): what a bf16 batch holds in bf16."""
    h, inter, heads, kvh, hd = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    return shape["layers"] * (h * hd * (heads + 2 * kvh) + heads * hd * h + 3 * h * inter)


def estimate_training_bytes(shape: dict[str, int], micro_batch_size: int, seq_len: int, *,
                            gradient_checkpointing: bool = False, lora: LoraSettings | None = None,
                            precision: str = "float32", fused_loss: bool = True) -> int:
    """Peak resident bytes of a LoRA training step on CPU in ``precision`` (float32 | bfloat16).

    runtime + weights (a bf16 batch holds the projections in bf16, the rest fp32) + adapter
    (weights, grads, two AdamW moments, always fp32) + activations saved for backward + the
    loss's logits (the fused loss: one chunk; else LOGIT_COPIES x all of them), padded by
    ESTIMATE_MARGIN (SDPA attention: no seq x seq matrix). Per token and layer a Llama block
    keeps ~11 x hidden + 4 x intermediate floats for backward (x BF16_ACTIVATION_FACTOR under
    bf16); with gradient checkpointing only the layer inputs are kept and one layer is
    recomputed at a time. Stdlib only: the caller names the precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if lora is None:
        from trainerd.config import LoraSettings  # the defaults live there (said once)

        lora = LoraSettings()
    h, L, inter, vocab = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    heads, kvh, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]
    out_dims = {"q_proj": heads * hd, "k_proj": kvh * hd, "v_proj": kvh * hd, "o_proj": h,
                "gate_proj": inter, "up_proj": inter, "down_proj": h}
    in_dims = {"o_proj": heads * hd, "down_proj": inter}
    adapter = sum(lora.r * (in_dims.get(m, h) + out_dims.get(m, h)) for m in lora.target_modules) * L
    tokens = micro_batch_size * seq_len
    per_layer_token = 11 * h + 4 * inter
    if gradient_checkpointing:
        act = tokens * (L * 2 * h + per_layer_token) * 4
    else:
        act = tokens * L * per_layer_token * 4
    if precision == "bfloat16":
        act = int(act * BF16_ACTIVATION_FACTOR)
        weights = shape["params"] * 4 - min(linear_params(shape), shape["params"]) * 2
    else:
        weights = shape["params"] * 4
    logits = min(FUSED_LOSS_BYTES, tokens * vocab * 4 * 3) if fused_loss else tokens * vocab * 4 * LOGIT_COPIES
    # No seq x seq attention matrix: transformers uses SDPA, whose CPU and GPU kernels do not
    # materialize it (measured on the tiny model: seq 4096 x micro 4 peaked at 709 MiB, where a
    # materialized matrix alone would be 1 GiB per layer).
    total = RUNTIME_BYTES + weights + adapter * 4 * 4 + act + logits
    return int(total * ESTIMATE_MARGIN)
