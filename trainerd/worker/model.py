"""The model side of a worker: device, precision, the base model and tokenizer, the LoRA
adapter on top, and the optimizer with its schedule.

Precision is decided once per batch (:func:`resolve_precision`) and recorded by the trainer in
the batch's ``precision.json`` and every checkpoint; see :class:`Precision` for what each means.

Everything here runs once per attempt (seconds); the step loop is in :mod:`.train`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainerd.core.settings import Settings
from trainerd.core.fsutil import atomic_write_json, read_json
from trainerd.core.modelref import hub_cache, is_hub_id, local_dir
from trainerd.core.planning import CPU_BF16_FLAGS, PRECISIONS, cpu_flags
from trainerd.worker import weights as wt
from trainerd.worker.weights import ConfigProblem

__all__ = ["BFLOAT16", "FLOAT32", "ConfigProblem", "Loaded", "Precision", "auto_precision", "batch_precision", "build_peft",
           "cpu_features", "load", "make_optimizer", "pick_device", "resolve_precision"]


def pick_device(settings: Settings) -> torch.device:
    want = settings.model.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigProblem("model.device: cuda requested but torch sees no CUDA device")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# --- precision ------------------------------------------------------------------------

FLOAT32, BFLOAT16 = PRECISIONS


def cpu_features() -> dict[str, Any]:
    """What this CPU offers for bf16: its /proc/cpuinfo flags and torch's own capability query."""
    flags = cpu_flags()
    found = {"cpuinfo_flags": sorted(flags & {*CPU_BF16_FLAGS, "amx_tile", "avx512f", "avx2"})}
    # Private but long-standing helpers (torch >= 2.2); guarded, so an older or newer torch that
    # lacks one only loses that line of evidence.
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        if fn is not None:
            try:
                found[name.strip("_").removeprefix("is_").removesuffix("_supported")] = bool(fn())
            except Exception:
                pass
    cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if cap is not None:
        found["torch_capability"] = cap()
    found["native_bf16"] = bool(flags & set(CPU_BF16_FLAGS)) or bool(found.get("avx512_bf16")) \
        or bool(found.get("amx_tile"))
    return found


def auto_precision(device: torch.device) -> tuple[str, dict[str, Any]]:
    """``model.dtype: auto``: bf16 where the hardware computes it natively, else fp32; and why."""
    if device.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported())
        return (BFLOAT16 if ok else FLOAT32), {"cuda_bf16": ok, "gpu": torch.cuda.get_device_name(device)}
    feats = cpu_features()
    return (BFLOAT16 if feats["native_bf16"] else FLOAT32), feats


@dataclass(frozen=True)
class Precision:
    """How a batch computes: ``float32``, or ``bfloat16`` = bf16 autocast around forward and
    loss, LoRA weights, their gradients and AdamW state in fp32, and the frozen Linear weights of
    the base held in bf16 (autocast would cast them to exactly these values for every matmul
    anyway; embeddings, norms and the tied lm-head stay fp32)."""

    name: str
    source: str  # "settings" | "auto" | "checkpoint" | "batch" (precision.json)

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == BFLOAT16 else None


def resolve_precision(settings: Settings, device: torch.device, kept: str | None, kept_from: str,
                      log: Any) -> Precision:
    """The batch's precision, decided once: what the batch already used (``kept``: its newest
    checkpoint, else its precision.json) wins over the settings and over what this machine would
    pick, so an upgrade or a move to another CPU never changes precision mid-batch."""
    want = settings.model.dtype
    if kept is not None:
        if kept not in PRECISIONS:
            raise ConfigProblem(f"{kept_from}: unknown precision {kept!r}")
        differs = want != "auto" and want != kept
        (log.warning if differs else log.info)("precision_kept", precision=kept, settings_dtype=want,
                                                 source=kept_from, reason="a batch keeps the precision it started with")
        return Precision(kept, kept_from)
    if want in PRECISIONS:
        log.info("precision_resolved", precision=want, source="settings", device=str(device))
        return Precision(want, "settings")
    name, found = auto_precision(device)
    log.info("precision_resolved", precision=name, source="auto", device=str(device), **found)
    return Precision(name, "auto")



def batch_precision(files: Any, settings: Settings, device: torch.device, state: dict[str, Any] | None, *,
                    record: bool, log: Any) -> Precision:
    """The batch's precision: its checkpoint's (``state``), else its precision.json's, else resolved
    now from the settings and this machine, and then (``record``: rank 0) recorded in
    precision.json before the first step, so that even a batch stopped before its first
    checkpoint keeps it."""
    kept, kept_from = None, ""
    if state is not None:
        # Checkpoints from before precision was recorded: the old rule was bf16 on CUDA or
        # when bfloat16 was forced, fp32 otherwise.
        legacy = BFLOAT16 if (device.type == "cuda" or settings.model.dtype == BFLOAT16) else FLOAT32
        kept = state.get("precision") or legacy
        kept_from = "checkpoint"
    else:
        try:
            kept, kept_from = read_json(files.precision)["precision"], "batch"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    precision = resolve_precision(settings, device, kept, kept_from, log)
    if kept_from != "batch" and record:
        atomic_write_json(files.precision, {
            "precision": precision.name, "source": precision.source, "settings_dtype": settings.model.dtype,
            "device": str(device), "decided_at": time.time()})
    return precision

def hold_frozen_linears_in_bf16(model: Any) -> int:
    """Cast the frozen ``nn.Linear`` weights inside the decoder to bf16 (not the lm-head, which is
    tied to the input embeddings); returns how many parameters changed. Under bf16 autocast every
    matmul sees the same bf16 values as before, and the fp32 copies (plus autocast's bf16 copy of
    each, kept for backward) are gone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    n = 0
    for mod in base.modules():
        if type(mod) is not torch.nn.Linear or mod is head:
            continue
        w = mod.weight
        if w.requires_grad or w.dtype != torch.float32:
            continue
        mod.weight = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
        if mod.bias is not None and not mod.bias.requires_grad:
            mod.bias = torch.nn.Parameter(mod.bias.detach().to(torch.bfloat16), requires_grad=False)
        n += w.numel()
    return n


@dataclass
class Loaded:
    """The base model and its tokenizer, where they live, and how its weights are held."""

    tokenizer: Any
    base: Any
    device: torch.device
    load_s: float
    weights: str = "float32"  # the base-weight layout (trainerd/core/ladder.py)


def load(settings: Settings, log: Any, *, precision: Precision | None = None,
         device: torch.device | None = None) -> Loaded:
    """Load the tokenizer and the base model of ``model.path`` (ConfigProblem when it cannot),
    its weights held in the attempt's layout (:func:`trainerd.worker.weights.resolve_layout`):
    loaded in the dtype that layout keeps, never an fp32 copy of a bf16 checkpoint first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mp = local_dir(settings.model.path)
    if is_hub_id(settings.model.path) and mp is None:  # not fetched by `trainerd run`: a worker never downloads
        raise ConfigProblem(f"model.path: {settings.model.path} is not in the Hugging Face cache at {hub_cache()} "
                            "(`trainerd run` fetches it at its start)")
    if mp is None or not (mp / "config.json").is_file():
        raise ConfigProblem(f"model.path: no model folder at {settings.model.path} (run scripts/fetch-model?)")
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    device = device or pick_device(settings)
    name = precision.name if precision is not None else FLOAT32
    layout = wt.resolve_layout(settings, name, device, log)
    t0 = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(mp))
    except Exception as e:
        raise ConfigProblem(f"model.path: cannot load the tokenizer from {mp}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer_s = time.monotonic() - t0
    kwargs = wt.load_kwargs(layout, name, mp, device)
    try:
        base = AutoModelForCausalLM.from_pretrained(str(mp), **kwargs)
    except Exception as e:
        raise ConfigProblem(f"model.path: cannot load the model from {mp} ({layout} weights): {e}") from e
    loaded = Loaded(tokenizer, base, device, time.monotonic() - t0, layout)
    log.info("model_loaded", path=str(mp), device=str(device), threads=torch.get_num_threads(),
             load_s=round(loaded.load_s, 2), tokenizer_s=round(tokenizer_s, 2), base_weights=layout,
             load_dtype=str(kwargs["dtype"]).removeprefix("torch."))
    return loaded


def build_peft(loaded: Loaded, settings: Settings, adapter_dir: Path | None, precision: Precision,
               log: Any) -> Any:
    """The trainable LoRA model: continued from ``adapter_dir`` (an adapter or a checkpoint),
    or new with the configured shape; its frozen Linear weights in bf16 for a bf16 batch."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = settings.lora
    torch.manual_seed(settings.train.seed)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(loaded.base, str(adapter_dir), is_trainable=True)
        cfg = model.peft_config["default"]
        want = (lora.r, float(lora.alpha), sorted(lora.target_modules))
        have = (cfg.r, float(cfg.lora_alpha), sorted(cfg.target_modules or []))
        if want != have:
            log.warning("adapter_config_differs", adapter=str(adapter_dir),
                        settings=list(map(str, want)), adapter_has=list(map(str, have)),
                        hint="the adapter's own LoRA shape is kept; start a new lineage to change it")
    else:
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        try:
            model = get_peft_model(loaded.base, cfg)
        except ValueError as e:
            raise ConfigProblem(f"lora.target_modules: {e}") from e
    if settings.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if precision.name == BFLOAT16:
        narrowed = hold_frozen_linears_in_bf16(model)
        log.info("base_linears_in_bf16", params=narrowed)
    wt.shape_base(model, precision.name, log)
    if settings.train.compile:
        compile_layers(model, settings, log)
    bad = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:  # the adapter, its gradients and AdamW state are fp32 in every precision
        raise ConfigProblem(f"trainable parameters not in fp32: {bad[:3]}")
    if loaded.weights != "nf4":  # a quantized model is placed by from_pretrained and cannot be moved
        model.to(loaded.device)
    model.train()
    return model


def compile_layers(model: Any, settings: Settings, log: Any) -> int:
    """``train.compile``: torch.compile every decoder layer in place (regional compilation: the
    layers share one compiled graph, so it compiles once, at the first step, not 30 times).
    Not with gradient checkpointing (its recompute wrapper sits inside the layer call). A layer
    dynamo cannot compile runs eagerly (suppress_errors): slower, never wrong."""
    if settings.train.gradient_checkpointing:
        log.info("compile_skipped", reason="gradient checkpointing is on")
        return 0
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in kinds]
    for layer in layers:
        layer.compile()
    log.info("compile_enabled", layers=len(layers), kind=sorted(kinds), torch=torch.__version__,
             note="compiles at the first step")
    return len(layers)


def make_optimizer(model: Any, settings: Settings, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters; linear warm-up, then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    t = settings.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = min(t.warmup_steps, total_steps // 2)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
