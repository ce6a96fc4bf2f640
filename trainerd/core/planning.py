"""Memory planning without torch: what a model is made of, and how much a LoRA step needs.

Stdlib only (the supervisor and the worker may both use it), all of it in milliseconds:

- :func:`read_model_shape`: config.json and the safetensors headers (every tensor's shape and
  dtype; no tensor is read): the sizes the estimate needs, and how the checkpoint is stored;
- :func:`estimate_training_bytes`: the peak resident bytes of one setting (layout of the base
  weights, micro-batch, checkpointing) in the precision the batch computes in
  (:func:`expected_precision`: the worker's own rule, read from /proc/cpuinfo);
- :func:`back_off`: the micro-batch walk (halve, keep the effective batch, then checkpointing).

The ladder of settings and the choice among them are :mod:`trainerd.core.ladder`'s.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings classes; importing trainerd.core.config would bring in yaml
    from trainerd.core.settings import LoraSettings

__all__ = [
    "ESTIMATE_MARGIN",
    "FUSED_LOSS_BYTES",
    "LOGIT_COPIES",
    "RUNTIME_BYTES",
    "back_off",
    "cpu_flags",
    "estimate_training_bytes",
    "expected_precision",
    "gpu_may_train",
    "read_model_shape",
    "weight_bytes",
]

# Worker runtime before any model: python + torch + transformers + peft + tokenizers
# (measured 340-345 MiB for the imports alone on CPU), the tokenizer, the data pipeline, the
# evaluation memory's SQLite and the background checkpoint writer. 400 MiB left the fp32-layout
# estimate of tests/test_fit.py's second shape 0.6 % under its measured peak (1156 vs 1162 MiB)
# once those last two joined the worker; 432 MiB puts it back above.
RUNTIME_BYTES = 432 << 20
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
    if gpu_may_train(device, gpus):
        return "float32"
    return "bfloat16" if cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS) else "float32"


def gpu_may_train(device: str, gpus: str | Path = "/proc/driver/nvidia/gpus") -> bool:
    """Whether the worker may put the step on a GPU: ``device`` is not ``cpu`` and the NVIDIA
    driver lists one (then host memory is not where the weights live during training)."""
    if device == "cpu":
        return False
    try:
        return any(Path(gpus).iterdir())
    except OSError:
        return False


def back_off(micro_batch_size: int, grad_accum_steps: int, gradient_checkpointing: bool
             ) -> tuple[int, int, bool] | None:
    """The next smaller micro-batch setting, or None when there is none left.

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


# --- what the model is made of -------------------------------------------------------------

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "lm_head.weight",
                    "embed_out.weight", "tok_embeddings.weight", "output.weight")
# A 4-bit NF4 weight: half a byte, plus one fp32 absmax per block of 64 (double quantization,
# which the worker does not use, would shave that further).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's header (8-byte length + JSON), without reading any tensor."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: implausible safetensors header size {n}")
        return json.loads(f.read(n))


def _tensor_census(paths: list[Path]) -> dict[str, int] | None:
    """Parameter counts by role (embedding/head, 2-D projections, the rest) and how they are
    stored, from the headers; None when a header cannot be read."""
    out = {"params": 0, "embed_params": 0, "linear_params": 0, "max_linear": 0, "bf16_params": 0,
           "float_params": 0, "stored_bytes": 0}
    for p in paths:
        try:
            header = _safetensors_header(p)
        except (OSError, ValueError, struct.error):
            return None
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            n = math.prod(meta.get("shape") or [1])
            dtype = str(meta.get("dtype", "F32"))
            out["params"] += n
            out["stored_bytes"] += n * _DTYPE_BYTES.get(dtype, 4)
            if dtype in ("F32", "F16", "BF16", "F64"):
                out["float_params"] += n
                out["bf16_params"] += n if dtype == "BF16" else 0
            if name.endswith(_EMBEDDING_NAMES):
                out["embed_params"] += n
            elif len(meta.get("shape") or []) == 2:
                out["linear_params"] += n
                out["max_linear"] = max(out["max_linear"], n)
    return out


def read_model_shape(model_dir: Path) -> dict[str, int]:
    """The numbers the estimate needs, from config.json and the weight files' headers (shapes,
    dtypes, bytes); the config's dimensions where there are no safetensors files."""
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
    tied = bool(cfg.get("tie_word_embeddings", True))
    shape = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
             "intermediate": inter, "vocab": vocab, "tied": int(tied)}
    census = _tensor_census(sorted(model_dir.glob("*.safetensors")))
    if census and census["params"]:
        # bf16_checkpoint: every floating tensor is stored in bf16, so loading with dtype=bf16
        # changes no value (one fp32 norm in it would be rounded).
        shape.update(params=census["params"], embed_params=census["embed_params"],
                     linear_params=census["linear_params"], max_linear=census["max_linear"],
                     stored_bytes=census["stored_bytes"],
                     bf16_checkpoint=int(census["float_params"] > 0 and census["bf16_params"] == census["float_params"]))
        return shape
    size = sum(p.stat().st_size for p in model_dir.glob("*.bin")) + sum(
        p.stat().st_size for p in model_dir.glob("*.gguf"))
    linear = linear_params(shape)
    embed = vocab * hidden * (1 if tied else 2)
    shape.update(params=size // 4 if size else embed + linear, embed_params=embed, linear_params=linear,
                 max_linear=hidden * max(inter, heads * head_dim), stored_bytes=size, bf16_checkpoint=0)
    return shape


def linear_params(shape: dict[str, int]) -> int:
    """Weights of the decoder's projections (attention and MLP), from the config's dimensions."""
    h, inter, heads, kvh, hd = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    return shape["layers"] * (h * hd * (heads + 2 * kvh) + heads * hd * h + 3 * h * inter)


# --- the estimate ----------------------------------------------------------------------


def default_weights(precision: str) -> str:
    """The layout a batch uses when nothing smaller is needed: what it computes in."""
    return "bfloat16" if precision == "bfloat16" else "float32"


def weight_bytes(shape: dict[str, int], weights: str, precision: str) -> tuple[int, int]:
    """(peak while loading, held while training) bytes of the frozen base in layout ``weights``
    (see :mod:`trainerd.core.ladder`). A load in the stored dtype is memory-mapped (no copy); a load
    that converts (a bf16 checkpoint read as fp32) holds the converted copy and the mapped file
    at once: 5 bytes a parameter (measured: a 0.16 B model's fp32 load of its bf16 weights
    raised ru_maxrss by 813 MB, 4.9 bytes a parameter)."""
    params = shape["params"]
    linear = min(shape.get("linear_params", linear_params(shape)), params)
    embed = min(shape.get("embed_params", 0), params - linear)
    other = params - linear - embed
    bf16_ckpt = bool(shape.get("bf16_checkpoint", 0))
    if weights == "float32":
        return params * (5 if bf16_ckpt else 4), params * 4
    if weights == "bfloat16":
        if bf16_ckpt:  # loaded as stored; norms upcast to fp32 afterwards
            return params * 2, (linear + embed) * 2 + other * 4
        # stored wider: loaded in fp32 (mapped), then the projections narrowed (a bf16 batch only)
        return params * 4, linear * 2 + (embed + other) * 4
    if weights == "nf4":
        rest = (embed * 2 + other * 4) if bf16_ckpt else (embed + other) * 4
        held = int(linear * NF4_BYTES_PER_PARAM) + rest
        # quantized tensor by tensor while loading: one projection at its loaded width on top
        return held + shape.get("max_linear", 0) * (2 if bf16_ckpt else 4), held
    raise ValueError(f"unknown base-weight layout {weights!r}")


def estimate_training_bytes(shape: dict[str, int], micro_batch_size: int, seq_len: int, *,
                            gradient_checkpointing: bool = False, lora: LoraSettings | None = None,
                            precision: str = "float32", fused_loss: bool = True, weights: str | None = None) -> int:
    """Peak resident bytes of a LoRA training run on CPU in ``precision`` with the base held as
    ``weights`` (default: :func:`default_weights`): the larger of the load's peak and a step's.

    A step holds: runtime + the base (:func:`weight_bytes`) + adapter (weights, grads, two AdamW
    moments, always fp32) + activations saved for backward + the loss's logits (the fused loss:
    one chunk; else LOGIT_COPIES x all of them) + the lm-head cast to the compute dtype when it
    is stored otherwise (the fused loss casts it once per call) + the fp32 buffers of an fp32
    batch on bf16 weights (one per projection size, shared by every layer: worker/weights.py). The base's bytes are known exactly; everything else is
    padded by ESTIMATE_MARGIN (SDPA attention: no seq x seq matrix). Per token and layer a Llama
    block keeps ~11 x hidden + 4 x intermediate floats for backward (x BF16_ACTIVATION_FACTOR under
    bf16); with gradient checkpointing only the layer inputs are kept and one layer is
    recomputed at a time. Stdlib only: the caller names the precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if lora is None:
        from trainerd.core.settings import LoraSettings  # the defaults live there (said once)

        lora = LoraSettings()
    weights = weights or default_weights(precision)
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
    logits = min(FUSED_LOSS_BYTES, tokens * vocab * 4 * 3) if fused_loss else tokens * vocab * 4 * LOGIT_COPIES
    # No seq x seq attention matrix: transformers uses SDPA, whose CPU and GPU kernels do not
    # materialize it (measured on the tiny model: seq 4096 x micro 4 peaked at 709 MiB, where a
    # materialized matrix alone would be 1 GiB per layer).
    load, held = weight_bytes(shape, weights, precision)
    head_stored = 2 if (weights != "float32" and shape.get("bf16_checkpoint", 0)) else 4
    head_compute = 2 if precision == "bfloat16" else 4
    head_copy = vocab * h * head_compute if head_stored != head_compute else 0
    upcast = 0
    if precision == "float32" and weights != "float32":
        upcast = 4 * max(shape.get("max_linear", 0), sum({h * heads * hd, h * kvh * hd, h * inter}))
    step = RUNTIME_BYTES + adapter * 4 * 4 + act + logits + head_copy + upcast
    return int(max(load + RUNTIME_BYTES * ESTIMATE_MARGIN, held + step * ESTIMATE_MARGIN))
