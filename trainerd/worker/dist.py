"""Several ranks under torchrun: what a rank does differently, and the few collectives it needs.

torchrun (``python -m torch.distributed.run``, started by the supervisor: launch.py) gives every
rank RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous; ``torch.distributed`` does the rest. A step
is the same optimizer step as on one process:

- every rank reads the same stream from the same cursor and takes its share of the step's
  blocks (``blocks[rank::world]``), so the cursor in rank 0's checkpoint is every rank's, and a
  batch may resume on another number of ranks;
- the loss is divided by the label tokens of the *whole* step on every rank, so the gradients,
  summed across ranks, are exactly the single-process gradient of that step;
- after its micro-batches a rank all-reduces its gradients (one flat SUM of the LoRA weights'
  gradients, a few MB) together with the step's loss, tokens and stop reason; then every rank
  clips and steps identically.

Why not DistributedDataParallel: its reducer all-reduces buckets *during* the last backward and
assumes every rank runs the same backward passes. A trainerd rank may back off alone after a
CUDA OOM (more, smaller micro-batches) or stop between micro-batches; with DDP the others would
sit in a half-finished all-reduce. Here a rank's step is local until its one collective, so an
OOM or a stop never leaves a collective half done, and for LoRA the overlap DDP buys is a few MB.

Stops: every rank folds its reason into the same all-reduce (MAX over a fixed order, so the
strongest one wins: a memory stop on any rank is a memory stop of the attempt, and the planner
backs off). Collectives time out after ``train.dist_timeout_s``: a rank that died or froze
turns into a crash of the others within that time, not a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from trainerd.core.contract import StopReason

__all__ = ["Ranks", "agree", "backend_for", "close", "gather_objects", "init", "lead_writes", "reduce_step",
           "restore_rng", "same_start"]

# MAX over these indexes picks the reason every rank adopts: the strongest first from the end.
# memory > disk_full > parent_gone > shutdown > recycle > paused > peer_stopped.
ORDER: tuple[StopReason | None, ...] = (None, StopReason.PEER_STOPPED, StopReason.PAUSED, StopReason.RECYCLE,
                                        StopReason.SHUTDOWN, StopReason.PARENT_GONE, StopReason.DISK_FULL,
                                        StopReason.MEMORY)


def _index(reason: Any) -> int:
    if reason is None:
        return 0
    try:
        return ORDER.index(StopReason(reason))
    except ValueError:
        return ORDER.index(StopReason.PEER_STOPPED)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Ranks":
        env = os.environ if env is None else env
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def on(self) -> bool:
        """More than one rank: the collectives below are real."""
        return self.world > 1

    @property
    def lead(self) -> bool:
        """Rank 0 writes (checkpoints, the adapter, eval.json, result.json) and scans."""
        return self.rank == 0

    def share(self, blocks: list) -> list:
        """This rank's blocks of a step: every world-th one from its rank on (may be empty)."""
        return blocks[self.rank::self.world] if self.on else blocks


def backend_for(setting: str, device: torch.device) -> str:
    """``auto``: NCCL between GPUs, gloo on CPUs; an explicit NCCL without a GPU is refused."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if setting == "nccl" and device.type != "cuda":
        raise ValueError("train.dist_backend: nccl needs a CUDA device; this rank has none (use gloo or auto)")
    return setting


def init(ranks: Ranks, backend: str, timeout_s: float, device: torch.device) -> None:
    """Join the process group torchrun's rendezvous prepared (env:// from its variables)."""
    if not ranks.on or torch.distributed.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU at once
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                         rank=ranks.rank, world_size=ranks.world, **kwargs)


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def same_start(params: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's trainable weights (a fresh LoRA's random A matrices are
    drawn by each process; from a checkpoint they are equal already, and this costs a few MB)."""
    if not _active():
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def agree(reason: Any, *flags: bool, device: torch.device | None = None) -> tuple[StopReason | None, list[bool]]:
    """One MAX all-reduce: the strongest stop reason of all ranks, and each flag if any rank set it."""
    if not _active():
        return (StopReason(reason) if reason else None), [bool(f) for f in flags]
    t = torch.tensor([_index(reason), *[1 if f else 0 for f in flags]], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    values = t.tolist()
    return ORDER[values[0]], [bool(v) for v in values[1:]]


def reduce_step(params: list[torch.Tensor], loss_sum: float, tokens: int, reason: Any,
                device: torch.device) -> tuple[float, int, StopReason | None]:
    """End of a rank's micro-batches: the step's loss and tokens over all ranks, the stop reason
    every rank adopts, and (when no rank stops) the gradients summed into every rank's ``.grad``.

    Each rank divided its loss by the label tokens of the whole step, so the sum is the gradient
    of the step. A rank without blocks (the last, short step) adds zeros."""
    if not _active():
        return loss_sum, tokens, (StopReason(reason) if reason else None)
    # One SUM carries everything: loss, tokens, and a count per stop reason (the strongest
    # reason any rank gave is the last index with a count).
    head = torch.zeros(2 + len(ORDER), dtype=torch.float64, device=device)
    head[0], head[1], head[2 + _index(reason)] = loss_sum, float(tokens), 1.0
    torch.distributed.all_reduce(head, op=torch.distributed.ReduceOp.SUM)
    values = head.tolist()
    agreed = ORDER[max(i for i, n in enumerate(values[2:]) if n > 0)]
    loss, total = values[0], int(values[1])
    if agreed is not None:
        return loss, total, agreed  # the step is dropped on every rank: no gradients to sum
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([grads[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for i in idx:
            n = grads[i].numel()
            params[i].grad = flat[offset:offset + n].view_as(params[i]).clone()
            offset += n
    return loss, total, None


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (on every rank, in rank order); ``[obj]`` on one process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def lead_writes(ranks: Ranks, rng: dict[str, Any], write: Any, device: torch.device | None) -> None:
    """A checkpoint under torchrun: every rank calls this at the same step; rank 0 writes it (with
    every rank's RNG state, ``write(rng)``) and every rank learns whether that failed for want of
    space (then all stop: DiskFull, exit 75 disk_full)."""
    from trainerd.worker.checkpoint import DiskFull

    rngs = gather_objects(rng)
    full: DiskFull | None = None
    if ranks.lead:
        try:
            write({**rng, "ranks": rngs})
        except DiskFull as e:
            full = e
    reason, _ = agree(StopReason.DISK_FULL if full else None, device=device)
    if full is not None:
        raise full
    if reason == StopReason.DISK_FULL:
        raise DiskFull("rank 0 could not write the checkpoint")


def restore_rng(ranks: Ranks, rng: dict[str, Any], seed: int, log: Any) -> None:
    """This rank's RNG from a checkpoint: its own where the checkpoint has every rank's (the same
    number of ranks), else rank 0's, and for other ranks a seed of their own (``seed + rank``)."""
    from trainerd.worker.checkpoint import set_rng_state

    saved = rng.get("ranks")
    if ranks.on and saved and len(saved) == ranks.world:
        set_rng_state(saved[ranks.rank])
        return
    set_rng_state(rng)
    if ranks.rank:
        torch.manual_seed(seed + ranks.rank)
        log.warning("rng_reseeded", rank=ranks.rank, checkpoint_ranks=len(saved or [None]), world_size=ranks.world,
                    reason="the checkpoint has no RNG state for this rank")
