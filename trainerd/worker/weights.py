"""How the frozen base is held: the worker's side of a memory rung's layout (trainerd/core/ladder.py).

- :func:`resolve_layout`: the layout this attempt uses: the one the supervisor's plan wrote into
  settings.json (``model.base_weights``), or, where it left ``auto`` (a GPU may take the step,
  or the worker runs alone), the fastest one that fits the device;
- :func:`load_kwargs`: what ``from_pretrained`` gets for it: ``dtype=`` the stored dtype where
  the layout keeps it (memory-mapped, never an fp32 copy of a bf16 checkpoint), or a
  bitsandbytes 4-bit config;
- :func:`shape_base`: after loading: norms in fp32, a bf16 embedding's output upcast to fp32
  (the residual stream stays fp32, as it was), and, in an fp32 batch, bf16 projections computed
  in fp32 (:class:`UpcastLinear`): the same numbers the float32 layout gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainerd.core.ladder import LAYOUTS, ladder, plan, quantization_available
from trainerd.core.planning import default_weights, read_model_shape

__all__ = ["ConfigProblem", "UpcastLinear", "load_kwargs", "numerics_changes", "quantized", "resolve_layout",
           "shape_base"]


class ConfigProblem(Exception):
    """The settings cannot work (exit 78)."""


def resolve_layout(settings: Any, precision: str, device: torch.device, log: Any) -> str:
    """The base-weight layout of this attempt (see the module docstring)."""
    want = settings.model.base_weights
    if want in LAYOUTS:
        if want == "nf4" and not _bitsandbytes():
            raise ConfigProblem("model.base_weights: nf4 needs bitsandbytes (pip install 'trainerd[quantize]')")
        return want
    if device.type != "cuda":
        return default_weights(precision)
    # A GPU: plan its memory as the supervisor plans the host's, against what the device has.
    shape = read_model_shape(Path(settings.model.path))
    rungs = ladder(shape, settings.train, settings.lora, precision=precision, base_weights=want,
                   quantize=want == "auto" and quantization_available("cuda"))
    # the step's micro-batch is the supervisor's; only the layout is chosen here
    rungs = [r for r in rungs if r.micro_batch_size == settings.train.micro_batch_size] or rungs
    free, total = torch.cuda.mem_get_info(device)
    chosen = plan(rungs, limit_bytes=total, guard_limit_bytes=total, baseline_bytes=total - free,
                  soft=settings.memory.soft)
    log.info("memory_plan_device", device=str(device), weights=chosen.rung.weights, estimate_bytes=chosen.estimate_bytes,
             budget_bytes=chosen.budget_bytes, device_total_bytes=total, fits=chosen.fits, why=chosen.why,
             rungs=[r.as_dict() for r in chosen.rungs])
    return chosen.rung.weights


def _bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def load_kwargs(layout: str, precision: str, model_dir: Path, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``layout`` (the dtype it loads in, memory-mapped
    where that is the stored one)."""
    shape = read_model_shape(model_dir)
    stored_bf16 = bool(shape.get("bf16_checkpoint"))
    if layout == "float32":
        return {"dtype": torch.float32}
    if layout == "bfloat16":
        # A checkpoint stored wider is loaded as stored and its projections narrowed afterwards
        # (a bf16 batch only: ladder.layouts never offers this to an fp32 batch).
        return {"dtype": torch.bfloat16 if stored_bf16 else torch.float32}
    if layout == "nf4":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bfloat16" else torch.float32
        return {"dtype": torch.bfloat16 if stored_bf16 else torch.float32, "device_map": {"": device},
                "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=compute,
                                                          bnb_4bit_use_double_quant=False)}
    raise ConfigProblem(f"model.base_weights: unknown layout {layout!r}")


# One fp32 buffer per projection size, reused by every layer's matmul, forward and backward.
# A fresh copy per matmul would be freed at once, but glibc keeps freed chunks under its dynamic
# mmap threshold (up to 32 MiB) in its arenas: measured on the 0.92 B model (seq 32, micro 1), the
# peak RSS was 244 MiB higher than with the threshold pinned, 5% over the plan's estimate. The
# buffers are used one at a time (autograd runs a CPU backward on the calling thread; on CUDA
# the stream orders them), so sharing them is safe.
_BUFFERS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _upcast(w: torch.Tensor, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """``w`` in ``dtype``, written into the shared buffer of its size (``shared``) or a new tensor."""
    if not shared:
        return w.to(dtype)
    key = (w.numel(), dtype, w.device)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.empty(w.numel(), dtype=dtype, device=w.device)
    return buf.view(w.shape).copy_(w)


class _UpcastMatmul(torch.autograd.Function):
    """``x @ w.float().T + b``, keeping only the bf16 ``w`` for backward (autograd's own linear
    would keep the fp32 copy of every layer's weight alive until backward: the fp32 layout's
    memory again)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, shared: bool) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.shared = shared
        return F.linear(x, _upcast(w, x.dtype, shared), None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return grad @ _upcast(w, grad.dtype, ctx.shared), None, None, None


class UpcastLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in bf16 and computed in the input's dtype (fp32),
    through the shared buffer of its size (the decoder's projections: a few sizes, each tens of MB;
    not the lm-head, whose fp32 copy would be hundreds of MB held for good)."""

    plain_linear = True  # the fused loss may read its weight as it reads a Linear's (worker/loss.py)
    shared_buffer = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return _UpcastMatmul.apply(x, self.weight, self.bias, self.shared_buffer)


def _upcast_output(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float() if output.is_floating_point() and output.dtype != torch.float32 else output


def shape_base(model: Any, precision: str, log: Any) -> dict[str, int]:
    """After loading (and after the adapter is attached): norms and other small frozen tensors in
    fp32, a non-fp32 input embedding's output upcast to fp32, and in an fp32 batch every frozen
    bf16 Linear computed in fp32. Returns what changed, for the log."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    counts = {"upcast_params": 0, "upcast_linears": 0, "embedding_bf16": 0}
    for mod in base.modules():
        if isinstance(mod, torch.nn.Embedding) or _is_linear(mod):
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            if not p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                setattr(mod, name, torch.nn.Parameter(p.detach().float(), requires_grad=False))
                counts["upcast_params"] += p.numel()
    if emb is not None and emb.weight.dtype != torch.float32:
        emb.register_forward_hook(_upcast_output)
        counts["embedding_bf16"] = emb.weight.numel()
    if precision == "float32":
        head = base.get_output_embeddings()
        for mod in base.modules():
            if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.bfloat16 and not mod.weight.requires_grad:
                mod.__class__ = UpcastLinear
                mod.shared_buffer = mod is not head
                counts["upcast_linears"] += 1
    log.info("base_weights_shaped", **counts)
    return counts


def _is_linear(mod: Any) -> bool:
    """A Linear of any kind (torch's, peft's LoRA wrapper, bitsandbytes'): its weight is the layout's."""
    return isinstance(mod, torch.nn.Linear) or hasattr(mod, "base_layer") or type(mod).__name__.startswith("Linear")


def numerics_changes(state: dict[str, Any] | None, layout: str, precision: str, log: Any) -> list[dict[str, Any]]:
    """The batch's record of inexact layout changes, with this attempt's added when it is one.

    The layout is part of the batch's numerics: a resumed batch whose layout changed (a memory
    back-off) says so; a change to or from nf4 is inexact and is kept in every later checkpoint,
    result.json and the adapter's metadata (its lineage)."""
    state = state or {}
    changes = list(state.get("numerics_changes") or [])
    was = state.get("base_weights")
    if state and was is None:
        was = default_weights(precision)  # a checkpoint from before layouts existed
    if was is None or was == layout:
        return changes
    exact = "nf4" not in (was, layout)
    if not exact:
        changes.append({"step": state.get("step", 0), "from": was, "to": layout})
    (log.info if exact else log.warning)(
        "base_weights_changed", step=state.get("step", 0), was=was, now=layout, exact=exact,
        reason="memory back-off" if exact else
        "memory back-off to quantized base weights: the numbers change from this step on (recorded in the lineage)")
    return changes


def quantized(layout: str, changes: list[dict[str, Any]]) -> bool:
    """Whether any step of the batch trained on a quantized base."""
    return layout == "nf4" or any("nf4" in (c.get("from"), c.get("to")) for c in changes)
