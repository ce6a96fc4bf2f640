"""The model side of a worker: device, precision, the base model and tokenizer, the LoRA
adapter on top, and the optimizer with its schedule.

Everything here runs once per attempt (seconds); the step loop is in :mod:`.train`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainerd.config import Settings

__all__ = ["ConfigProblem", "Loaded", "build_peft", "load", "make_optimizer", "pick_device", "pick_dtype"]


class ConfigProblem(Exception):
    """The settings cannot work (exit 78)."""


def pick_device(settings: Settings) -> torch.device:
    want = settings.model.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigProblem("model.device: cuda requested but torch sees no CUDA device")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_dtype(settings: Settings, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weights dtype, bf16 autocast on?)."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if settings.model.dtype == "bfloat16":
        return torch.bfloat16, device.type == "cuda"
    if settings.model.dtype == "float32":
        return torch.float32, bf16_ok
    return (torch.bfloat16 if bf16_ok else torch.float32), bf16_ok


@dataclass
class Loaded:
    """The base model and its tokenizer, where they live and in which precision."""

    tokenizer: Any
    base: Any
    device: torch.device
    dtype: torch.dtype
    autocast: bool          # bf16 autocast around forward passes
    load_s: float


def load(settings: Settings, log: Any) -> Loaded:
    """Load the tokenizer and the base model of ``model.path`` (ConfigProblem when it cannot)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mp = Path(settings.model.path)
    if not (mp / "config.json").is_file():
        raise ConfigProblem(f"model.path: no model folder at {mp} (run scripts/fetch-model?)")
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    device = pick_device(settings)
    dtype, autocast = pick_dtype(settings, device)
    t0 = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(mp))
    except Exception as e:
        raise ConfigProblem(f"model.path: cannot load the tokenizer from {mp}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        base = AutoModelForCausalLM.from_pretrained(str(mp), dtype=dtype)
    except Exception as e:
        raise ConfigProblem(f"model.path: cannot load the model from {mp}: {e}") from e
    loaded = Loaded(tokenizer, base, device, dtype, autocast, time.monotonic() - t0)
    log.info("model_loaded", path=str(mp), dtype=str(dtype).removeprefix("torch."),
             device=str(device), autocast_bf16=autocast, load_s=round(loaded.load_s, 2))
    return loaded


def build_peft(loaded: Loaded, settings: Settings, adapter_dir: Path | None, log: Any) -> Any:
    """The trainable LoRA model: continued from ``adapter_dir`` (an adapter or a checkpoint),
    or new with the configured shape."""
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
    model.to(loaded.device)
    model.train()
    return model


def make_optimizer(model: Any, settings: Settings, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters; linear warm-up, then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    t = settings.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = min(t.warmup_steps, total_steps // 2)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
