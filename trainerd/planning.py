"""Memory planning (placeholder until the memguard split lands): the one back-off rule."""

from __future__ import annotations


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
