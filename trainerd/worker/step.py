"""One optimizer step: micro-batches, gradient accumulation, clipping, and the CUDA OOM back-off.

The loss of a micro-batch is its summed token loss divided by the label tokens of the whole
step (``num_items_in_batch``), so the gradient of a step does not depend on how it is split
into micro-batches: the memory back-off (half the micro-batch, twice the accumulation) keeps
the optimizer step the same, up to float summation order. The loss itself is
:func:`trainerd.worker.loss.token_loss` (no full-vocabulary logits), in the batch's precision.

Under torchrun a rank trains its share of the step's blocks, still divided by the label tokens
of the whole step, then sums gradients, loss and tokens with the others in one all-reduce that
also carries its stop reason (dist.py): the back-off and the stop between micro-batches stay a
rank's own business until that one collective.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from trainerd.core import faults
from trainerd.core.contract import StopReason
from trainerd.worker import checkpoint as ckpt
from trainerd.worker import dist
from trainerd.worker.loss import IGNORE_INDEX, loss_path, token_loss
from trainerd.worker.stopper import StopRequested

__all__ = ["Stepper"]


class Stepper:
    def __init__(self, model: Any, optimizer: Any, scheduler: Any, loaded: Any, stopper: Any, progress: Any,
                 log: Any, *, micro: int, max_grad_norm: float, precision: Any, ranks: dist.Ranks = dist.Ranks()):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device = loaded.device
        self.autocast = precision.autocast  # torch.bfloat16 or None
        self.loss_path = loss_path(model)
        self.params = [p for p in model.parameters() if p.requires_grad]  # what clipping walks
        log.info("loss_path", path=self.loss_path.kind, reason=self.loss_path.reason)
        self.stopper, self.progress, self.log = stopper, progress, log
        self.micro = micro
        self.ranks = ranks
        self.max_grad_norm = max_grad_norm
        self.last_tokens = 0  # real (unpadded) tokens of the last step
        self.last_lr: float | None = None  # the learning rate the last step used (before the scheduler moved it)
        self._oom_above = faults.number("oom_above_micro")
        # Called right before the weights change (worker/saver.py: a background checkpoint's copy).
        self.before_update: Any = lambda: None

    def step(self, blocks: list, step_rng: dict[str, Any], number: int) -> float:
        """Train on ``blocks`` (lists of ids, labels, mask) as one optimizer step; returns its loss.

        Raises StopRequested (gradients discarded, parameters untouched) when a stop arrives
        between micro-batches.
        """
        # HF shifts labels inside the loss: position 0 of each block predicts nothing. Counted
        # over the whole step (every rank's share), so summed gradients are the step's.
        n_items = sum(sum(1 for y in b[1][1:] if y != IGNORE_INDEX) for b in blocks)
        mine = self.ranks.share(blocks)
        t0 = time.monotonic()
        loss_sum, reason = 0.0, None
        try:
            if mine:
                loss_sum = self._own_share(mine, max(n_items, 1), step_rng, number)
        except StopRequested as stop:
            if not self.ranks.on:
                raise
            reason = stop.reason  # told to the others in the collective, then raised on every rank
        tokens = sum(sum(b[2]) for b in mine)
        loss_sum, tokens, agreed = dist.reduce_step(self.params, loss_sum, tokens, reason, self.device)
        if agreed is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise StopRequested(agreed)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.before_update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()  # cheap after gc.freeze(); keeps cyclic garbage from piling up per step
        self.last_tokens = tokens
        self.progress.add_step(self.last_tokens, time.monotonic() - t0)
        return loss_sum

    def _own_share(self, blocks: list, n_items: int, step_rng: dict[str, Any], number: int) -> float:
        """This rank's blocks, micro-batch by micro-batch, backing off on a CUDA OOM."""
        ids = torch.tensor([b[0] for b in blocks], dtype=torch.long)
        labels = torch.tensor([b[1] for b in blocks], dtype=torch.long)
        mask = torch.tensor([b[2] for b in blocks], dtype=torch.long)
        while True:
            try:
                return self._accumulate(ids, labels, mask, n_items)
            except torch.OutOfMemoryError:
                pass
            # Backed off outside the except block: inside it the exception's traceback still
            # holds the failed forward's frames and their activations, which empty_cache()
            # could then not give back, and the smaller micro-batch would run out too.
            self._back_off(number, len(blocks), step_rng)

    def _back_off(self, number: int, n_blocks: int, step_rng: dict[str, Any]) -> None:
        """A CUDA out-of-memory error inside the step: free, halve the micro-batch, redo the step
        with the same tokens and dropout; at micro-batch 1 give up (a memory stop)."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.micro <= 1:
            self.log.error("cuda_oom_at_micro_batch_1", step=number)
            raise StopRequested(StopReason.MEMORY)
        old = self.micro
        self.micro = max(1, self.micro // 2)
        ckpt.set_rng_state(step_rng)
        self.log.warning("cuda_oom_backoff", step=number, micro_batch_size_was=old,
                         micro_batch_size=self.micro, grad_accum_steps=-(-n_blocks // self.micro))

    def _accumulate(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, n_items: int) -> float:
        total = 0.0
        for start in range(0, ids.shape[0], self.micro):
            if start:  # a stop never waits for the rest of a long step
                reason = self.stopper.check()
                if reason:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise StopRequested(reason)
            if self._oom_above is not None and self.micro > self._oom_above:
                # Fault injection (TRAINERD_FAULT=oom_above_micro:K): the CPU has no CUDA OOM to
                # provoke, so the back-off path is exercised by raising the very same error.
                raise torch.OutOfMemoryError(f"injected: micro-batch {self.micro} > {self._oom_above}")
            sl = slice(start, start + self.micro)
            x, y, m = ids[sl].to(self.device), labels[sl].to(self.device), mask[sl].to(self.device)
            loss, _ = token_loss(self.model, x, m, y, divide_by=n_items, autocast_dtype=self.autocast,
                                 path=self.loss_path)
            loss.backward()
            total += loss.item()  # a CPU-GPU sync point on CUDA, once per micro-batch
            del loss, x, y, m
        return total
