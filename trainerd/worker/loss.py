"""The causal-LM loss without full-vocabulary logits: lm-head and cross-entropy fused over chunks.

``model(input_ids, labels=...)`` in transformers materialises the logits of every position
(micro x seq x vocab: 4 x 256 x 49k floats = 200 MB for SmolLM2 in fp32), upcasts them to fp32
for the loss, and keeps logits, their log-softmax and their gradient alive around backward():
about four copies at the step's peak. Here the decoder runs alone; only the positions that have
a label go through the lm-head, ``chunk`` rows at a time, and each chunk's loss *and* its
gradient with respect to the hidden state are computed at once, in the forward pass (the idea of
Liger-kernel's fused linear cross-entropy). So no chunk of logits outlives its iteration, the
lm-head matmul is never recomputed in backward, and backward only scales the stored gradient.

Numerics follow transformers' ``ForCausalLMLoss`` under the same precision: logits in the
compute dtype (bf16 under autocast, the weight cast the same way autocast casts it), upcast to
fp32 for log-softmax and the loss; the gradient of the scaled loss cast back to the compute dtype
before the matmul with the weight. Only the summation order differs (chunks), so the value is
the same within float tolerance.

:func:`token_loss` is the one loss function of the worker: the training step uses it with
``divide_by`` = the label tokens of the whole optimizer step (``num_items_in_batch``), and an
evaluation pass can use it under ``torch.no_grad()`` (no gradient work is done then) for a
mean loss per token: sum the returned losses with ``divide_by=1`` and divide by the counts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "LossPath", "chunk_rows", "linear_cross_entropy", "loss_path", "row_losses", "token_loss"]

IGNORE_INDEX = -100
# Bytes of fp32 logits one chunk may hold (plus its compute-dtype copy): large enough that the
# lm-head matmuls run at full speed, small enough to stay well under the full logits. Measured
# on the 2-core AMX Xeon (lm-head + loss, forward and backward, 1024 rows of SmolLM2, paired
# with transformers' loss): 128 rows 1.08-1.12x its time in fp32 and up to 1.39x in bf16 (the
# backward matmul's output is then too small to keep both cores busy); 512 rows 0.96-0.97x in
# fp32 and 0.87x in bf16. 96 MiB = 512 rows at SmolLM2's 49k vocabulary.
CHUNK_LOGIT_BYTES = 96 << 20
# Config attributes of causal LMs whose forward does more than ``lm_head(hidden)`` to the
# logits (Gemma 2 soft-capping, Cohere's scale, Granite's divisor...): those keep the full path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_rows(vocab: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """Rows of logits per chunk: the budget in fp32, a multiple of 64, at least 64."""
    return max(64, (budget_bytes // (4 * max(1, vocab))) // 64 * 64)


class LossPath:
    """How the loss is computed for one model: ``fused`` (decoder + chunked lm-head/CE) or
    ``full`` (the model's own forward and all logits), with the reason."""

    def __init__(self, kind: str, reason: str, decoder: Any = None, head: Any = None):
        self.kind, self.reason, self.decoder, self.head = kind, reason, decoder, head

    def __repr__(self) -> str:
        return f"LossPath({self.kind!r}, {self.reason!r})"


def loss_path(model: Any, *, fused: bool = True) -> LossPath:
    """Decide once whether ``model`` (a peft-wrapped or plain HF causal LM) can use the fused path."""
    if not fused:
        return LossPath("full", "fused loss turned off")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        v = getattr(cfg, attr, None)
        if v not in (None, 0, 0.0, 1, 1.0):
            return LossPath("full", f"config.{attr}={v} transforms the logits")
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError) as e:
        return LossPath("full", f"no decoder/lm-head split: {e}")
    if decoder is None or (type(head) is not torch.nn.Linear and not getattr(type(head), "plain_linear", False)):
        # e.g. a LoRA-wrapped lm_head: its own module must run, so the full path is used
        return LossPath("full", f"lm-head is {type(head).__name__}, not a plain Linear")
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return LossPath("full", "the lm-head is trained")
    return LossPath("fused", "decoder + chunked lm-head/cross-entropy", decoder, head)


def token_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
               divide_by: float = 1.0, autocast_dtype: torch.dtype | None = None,
               path: LossPath | None = None, chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the token losses / ``divide_by``, number of label tokens) for one micro-batch.

    Labels are the input positions' own ids (``-100`` = no loss), shifted inside as transformers
    does: position t predicts ``labels[t + 1]``. ``autocast_dtype`` (bf16) runs the forward under
    autocast on the inputs' device. Under ``torch.no_grad()`` nothing is kept for backward.
    """
    path = path or loss_path(model)
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = labels[:, 1:]
    shift = shift.reshape(-1)
    keep = (shift != IGNORE_INDEX).nonzero().squeeze(1)  # a CPU-GPU sync point on CUDA
    n = int(keep.numel())
    dev = input_ids.device.type
    amp = (torch.autocast(device_type=dev, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        if path.kind == "fused":
            # use_cache=False: in training mode the decoder would otherwise fill a KV cache nobody
            # reads (transformers builds one whenever config.use_cache is on).
            hidden = path.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
            weight, bias = path.head.weight, path.head.bias
            loss = linear_cross_entropy(rows, weight, bias, shift.index_select(0, keep), scale=1.0 / divide_by,
                                        compute_dtype=autocast_dtype or rows.dtype,
                                        chunk=chunk or chunk_rows(weight.shape[0]))
            if n == 0 and rows.requires_grad:
                loss = loss + hidden.sum() * 0.0  # keeps backward() valid for a block with no labels
            return loss, n
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / divide_by, n


@torch.no_grad()
def row_losses(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
               autocast_dtype: torch.dtype | None = None, path: LossPath | None = None) -> list[tuple[float, int]]:
    """(summed token loss, label tokens) of every row: an evaluation's figures, one forward for
    the whole batch and, on the fused path, no full-vocabulary logits either."""
    path = path or loss_path(model)
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = labels[:, 1:]
    amp = (torch.autocast(device_type=input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    out: list[tuple[float, int]] = []
    with amp:
        if path.kind == "fused":
            hidden = path.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            weight, bias = path.head.weight, path.head.bias
            for r in range(hidden.shape[0]):
                keep = (shift[r] != IGNORE_INDEX).nonzero().squeeze(1)
                total = linear_cross_entropy(hidden[r].index_select(0, keep), weight, bias, shift[r].index_select(0, keep),
                                             compute_dtype=autocast_dtype or hidden.dtype,
                                             chunk=chunk_rows(weight.shape[0]))
                out.append((float(total), int(keep.numel())))
            return out
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").view(shift.shape)
    counts = (shift != IGNORE_INDEX).sum(dim=1)
    return [(float(s), int(c)) for s, c in zip(per_token.sum(dim=1).tolist(), counts.tolist())]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, *, scale: float = 1.0, compute_dtype: torch.dtype | None = None,
                         chunk: int = 256) -> torch.Tensor:
    """``scale * sum(cross_entropy(hidden @ weight.T + bias, targets))`` over rows, chunk by chunk.

    ``hidden`` (N x H) rows that all have a target; ``weight`` (V x H) frozen. Differentiable in
    ``hidden`` only.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, float(scale),
                                     compute_dtype or hidden.dtype, int(chunk))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, scale: float, compute_dtype: torch.dtype, chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if want_grad else None
        # Casts made once per call, not per chunk (autocast would re-cast the 28M-float weight
        # for every chunk: the weight is frozen, so autocast's cache does not keep it).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(compute_dtype)
                t = targets[s:s + chunk]
                logits = F.linear(h, w, b).float()                     # chunk x V, fp32
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
                if grad is not None:
                    # d(scale * CE)/d logits = scale * (softmax - onehot), in place on the chunk;
                    # the scale folded into the exponent saves a pass over chunk x vocab floats.
                    logits.sub_((lse - math.log(scale)).unsqueeze(1)).exp_()
                    logits.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -scale).unsqueeze(1))
                    grad[s:s + chunk] = (logits.to(compute_dtype) @ w).to(hidden.dtype)
                del logits
        if grad is not None:
            ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # grad_out is 1.0 for loss.backward(): the product is exact then.
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None
