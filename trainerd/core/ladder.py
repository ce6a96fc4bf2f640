"""The memory ladder: every way a batch can train, fastest first, and the one that fits.

Stdlib only (the supervisor plans with it before a start; the worker plans the GPU with it).
A :class:`Rung` is one complete memory setting: how the frozen base weights are held
(:data:`LAYOUTS`), the micro-batch and accumulation (their product, the effective batch, never
changes), and gradient checkpointing. :func:`ladder` lists the rungs a batch may use, in order
of estimated speed; :func:`plan` picks the first whose estimate fits the budget (or says that
none ever can); :func:`next_rung` is the memory back-off after a stop: the fastest rung that
needs less memory than the one that was stopped.

Base-weight layouts (what the worker loads; :mod:`trainerd.worker.weights` carries them out):

- ``float32``: every frozen weight in fp32 (an fp32 batch's fastest layout).
- ``bfloat16``: the checkpoint's bf16 weights loaded as they are (``dtype=`` at from_pretrained,
  memory-mapped; never an fp32 copy first), norms in fp32. A bf16 batch computes them under
  autocast, as before; an fp32 batch upcasts each one for its matmul. Both give the numbers the
  float32 layout gives, exactly, which is why an fp32 batch may use it only when the checkpoint
  itself is stored in bf16 (else it would round the weights).
- ``nf4``: the decoder's projections quantized to 4-bit NormalFloat (bitsandbytes; QLoRA),
  the rest as in ``bfloat16``. Changes the numbers: the last resort, recorded in the lineage.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from trainerd.core.planning import PRECISIONS, back_off, estimate_training_bytes

if TYPE_CHECKING:
    from trainerd.core.settings import LoraSettings, TrainSettings

__all__ = ["LAYOUTS", "Plan", "Rung", "estimated_tokens_per_s", "ladder", "layouts", "next_rung", "plan",
           "quantization_available"]

LAYOUTS = ("float32", "bfloat16", "nf4")
EXACT_LAYOUTS = ("float32", "bfloat16")
# Relative speed of each choice, multiplied together: the ladder's order, and the "how much
# slower" a plan reports. Gradient checkpointing recomputes each layer's forward in backward:
# a LoRA step costs ~4N FLOPs a token (the frozen base's weight gradients are never computed),
# 6N with checkpointing, so 0.67 in FLOPs; measured 0.70-0.80 (benchmarks/fit.py). Each
# halving of the micro-batch costs little once a micro-batch holds a few hundred tokens.
# NF4: torchtune's Llama-3.1-8B on one RTX 4090, QLoRA 2,413 vs LoRA 3,083 tokens/s.
SPEED_CHECKPOINTING = 0.75
SPEED_HALVING = 0.97
SPEED_LAYOUT = {("float32", "float32"): 1.0, ("bfloat16", "bfloat16"): 1.0,
                ("bfloat16", "float32"): 0.93,   # one bf16 -> fp32 cast of the weight per matmul
                ("nf4", "bfloat16"): 0.78, ("nf4", "float32"): 0.78}
# Model FLOP/s a worker reaches, for the tokens/s a plan announces (an estimate, said so):
# measured on 2-core CPUs (FACTS.md: 0.17-0.3 TFLOP/s in bf16 with native bf16, ~0.05-0.1 in
# fp32) and a conservative H100/H200 figure.
FLOPS = {("cpu", "bfloat16"): 0.15e12, ("cpu", "float32"): 0.05e12, ("cuda", "bfloat16"): 200e12,
         ("cuda", "float32"): 50e12}


def quantization_available(device: str) -> bool:
    """Whether the nf4 layout can be offered: bitsandbytes is installed (found without importing
    it) and the device is CUDA. On CPU it is not offered: measured on a 2-core EPYC (bitsandbytes
    0.50.2, torch 2.13), a 4-bit load held more memory than the bf16 layout and a step was ~6x
    slower than fp32 (docs/memory.md, "A model that does not fit")."""
    return device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def layouts(precision: str, shape: dict[str, int], base_weights: str = "auto", *,
            quantize: bool = False) -> list[str]:
    """The layouts a batch in ``precision`` may use, fastest first. ``base_weights`` (the setting):
    ``auto`` (all that are exact, then nf4 where ``quantize``), ``unquantized``, or one layout."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if base_weights in LAYOUTS:
        return [base_weights]
    out = ["float32", "bfloat16"] if precision == "float32" else ["bfloat16"]
    if precision == "float32" and not shape.get("bf16_checkpoint", 0):
        out.remove("bfloat16")  # an fp32 checkpoint held in bf16 would be rounded: not exact
    if quantize and base_weights == "auto":
        out.append("nf4")
    return out


@dataclass(frozen=True)
class Rung:
    """One memory setting; ``estimate_bytes`` and ``speed`` (relative to the ladder's fastest) as planned."""

    weights: str
    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    estimate_bytes: int = 0
    speed: float = 1.0

    @property
    def key(self) -> tuple[str, int, int, bool]:
        return self.weights, self.micro_batch_size, self.grad_accum_steps, self.gradient_checkpointing

    @property
    def exact(self) -> bool:
        """Whether it computes the numbers the float32 layout would (nf4 does not)."""
        return self.weights in EXACT_LAYOUTS

    def describe(self) -> str:
        gc = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return (f"{self.weights} weights, micro-batch {self.micro_batch_size} x {self.grad_accum_steps}{gc}")

    def as_dict(self) -> dict[str, object]:
        return {"weights": self.weights, "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps, "gradient_checkpointing": self.gradient_checkpointing,
                "estimate_bytes": self.estimate_bytes, "speed": round(self.speed, 3)}


def ladder(shape: dict[str, int], train: TrainSettings, lora: LoraSettings | None = None, *,
           precision: str, base_weights: str = "auto", quantize: bool = False, ranks: int = 1) -> list[Rung]:
    """Every rung the batch may use, fastest first (ties: the smaller estimate first). The
    micro-batch walk is :func:`trainerd.core.planning.back_off`'s (halve, keep micro x accum, then
    checkpointing at micro-batch 1), under each layout."""
    walk = [(train.micro_batch_size, train.grad_accum_steps, train.gradient_checkpointing)]
    while (nxt := back_off(*walk[-1])) is not None:
        walk.append(nxt)
    rungs = []
    for w in layouts(precision, shape, base_weights, quantize=quantize):
        for mb, accum, gc in walk:
            halvings = max(0, (train.micro_batch_size // mb).bit_length() - 1)
            speed = (SPEED_LAYOUT.get((w, precision), 1.0) * SPEED_HALVING ** halvings
                     * (SPEED_CHECKPOINTING if gc and not train.gradient_checkpointing else 1.0))
            est = ranks * estimate_training_bytes(shape, mb, train.seq_len, gradient_checkpointing=gc, lora=lora,
                                                  precision=precision, weights=w)
            rungs.append(Rung(w, mb, accum, gc, est, speed))
    rungs.sort(key=lambda r: (-r.speed, r.estimate_bytes))
    return rungs


@dataclass(frozen=True)
class Plan:
    """The rung a batch starts on, and why. ``fits``: its estimate is under ``budget_bytes`` (soft x
    limit minus what the cgroup already holds, now); ``never_fits``: not even the smallest rung is
    under soft x the guard's limit itself, whatever else the host is doing: the batch must fail
    before anything is loaded."""

    rung: Rung
    rungs: tuple[Rung, ...]
    limit_bytes: int
    budget_bytes: int
    guard_budget_bytes: int
    fits: bool
    never_fits: bool = False
    why: str = ""
    guard_limit_bytes: int = 0
    baseline_bytes: int = 0

    @property
    def smallest(self) -> Rung:
        return min(self.rungs, key=lambda r: r.estimate_bytes)

    # the fields the older Plan had (tests and callers read them)
    micro_batch_size = property(lambda self: self.rung.micro_batch_size)
    grad_accum_steps = property(lambda self: self.rung.grad_accum_steps)
    gradient_checkpointing = property(lambda self: self.rung.gradient_checkpointing)
    estimate_bytes = property(lambda self: self.rung.estimate_bytes)
    weights = property(lambda self: self.rung.weights)


def plan(rungs: Sequence[Rung], *, limit_bytes: int, guard_limit_bytes: int, baseline_bytes: int,
         soft: float) -> Plan:
    """The first rung (the fastest) whose estimate fits soft x ``limit_bytes`` minus the baseline.

    ``limit_bytes`` is what the host can give now (the guard's limit, or less when MemAvailable
    says so); ``guard_limit_bytes`` the guard's own. When nothing fits now, the smallest rung (the
    guard and the back-off protect the attempt; memory may come back); when nothing fits even
    the guard's limit, ``never_fits``.
    """
    if not rungs:
        raise ValueError("a ladder needs at least one rung")
    budget = int(limit_bytes * soft) - baseline_bytes
    guard_budget = int(guard_limit_bytes * soft) - baseline_bytes
    fastest = rungs[0]
    for r in rungs:
        if r.estimate_bytes <= budget:
            why = ("the configured settings fit" if r is fastest else
                   f"faster rungs need more than the budget (the fastest, {fastest.describe()}, "
                   f"an estimated {fastest.estimate_bytes} bytes)")
            return Plan(r, tuple(rungs), limit_bytes, budget, guard_budget, True, why=why,
                        guard_limit_bytes=guard_limit_bytes, baseline_bytes=baseline_bytes)
    small = min(rungs, key=lambda r: r.estimate_bytes)
    never = small.estimate_bytes > guard_budget
    why = ("no rung fits soft x the memory limit, not even the smallest" if never else
           "no rung fits what the host can give now: starting on the smallest")
    return Plan(small, tuple(rungs), limit_bytes, budget, guard_budget, False, never_fits=never, why=why,
                guard_limit_bytes=guard_limit_bytes, baseline_bytes=baseline_bytes)


def next_rung(rungs: Sequence[Rung], current: tuple[str, int, int, bool], current_bytes: int | None = None
              ) -> Rung | None:
    """After a memory stop on ``current`` (a :attr:`Rung.key`): the fastest rung that needs less
    memory than it, or None. ``current_bytes``: its estimate when it is not on the ladder (a
    batch planned by an older release)."""
    at = next((r for r in rungs if r.key == current), None)
    ceiling = at.estimate_bytes if at is not None else current_bytes
    if ceiling is None:
        return None
    return next((r for r in rungs if r.key != current and r.estimate_bytes < ceiling), None)


def estimated_tokens_per_s(shape: dict[str, int], rung: Rung, precision: str, device: str = "cpu") -> float:
    """A rough tokens/s for ``rung``: model FLOPs per trained token (4 x params, 6 x with
    checkpointing) against :data:`FLOPS` for the device, times the layout's speed."""
    flops = (6 if rung.gradient_checkpointing else 4) * shape["params"]
    rate = FLOPS.get((device, precision), FLOPS[("cpu", "float32")])
    return rate / max(1, flops) * SPEED_LAYOUT.get((rung.weights, precision), 1.0)
