"""The memory plan of a batch's start, and the ladder its memory back-off walks (issue 19).

Made before anything is loaded, from config.json and the safetensors headers (milliseconds,
no torch): the fastest rung that fits (trainerd/core/ladder.py), recorded in the ledger and written
into the attempt's settings.json; or, when not even the smallest rung fits the memory limit,
a reason to fail the batch at once, with the figures, instead of a worker killed mid-load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainerd.core import planning
from trainerd.core.settings import Settings
from trainerd.core.contract import BatchFiles
from trainerd.core.fsutil import fmt_bytes, read_json_or_none
from trainerd.core.ladder import Plan, Rung
from trainerd.core.modelref import local_dir
from trainerd.supervisor.ledger.rows import Batch

__all__ = ["batch_ladder", "never_fits_reason", "plan_batch", "planned_weights"]


def _precision(files: BatchFiles, settings: Settings) -> str:
    recorded = (read_json_or_none(files.precision) or {}).get("precision")
    return planning.expected_precision(settings.model.dtype, settings.model.device, recorded)


def _model_dir(settings: Settings) -> Path:
    """model.path's folder: itself, or a hub id's cached snapshot."""
    return local_dir(settings.model.path) or Path(settings.model.path)


def _on_gpu(settings: Settings) -> bool:
    """On a GPU the worker plans the device's memory itself (worker/weights.py): the host plan
    then chooses the micro-batch only and leaves model.base_weights as configured."""
    return planning.gpu_may_train(settings.model.device)


def plan_batch(files: BatchFiles, settings: Settings, guard: Any) -> Plan:
    """The plan of a batch's first start (logged by the guard as ``memory_plan``)."""
    want = "unquantized" if _on_gpu(settings) and settings.model.base_weights == "auto" else settings.model.base_weights
    return guard.plan(_model_dir(settings), settings.train, settings.lora, precision=_precision(files, settings),
                      base_weights=want, device="cpu")


def planned_weights(p: Plan, settings: Settings) -> str | None:
    """What the ledger records as the batch's layout (None: the worker decides on its GPU)."""
    return None if _on_gpu(settings) else p.rung.weights


def never_fits_reason(p: Plan, soft: float) -> str:
    """Why a batch fails before loading: the smallest rung's estimate against the limit."""
    small = p.smallest
    return (f"does not fit in memory on any setting: the smallest ({small.describe()}) needs an estimated "
            f"{fmt_bytes(small.estimate_bytes)}, over the {fmt_bytes(p.guard_budget_bytes)} it may use "
            f"({soft:g} x the memory limit of {fmt_bytes(p.guard_limit_bytes)}, less "
            f"{fmt_bytes(p.baseline_bytes)} already in use); nothing was loaded "
            f"(docs/memory.md: \"A model that does not fit\")")


def batch_ladder(batch: Batch, files: BatchFiles, settings: Settings, guard: Any) -> tuple[Rung, ...] | None:
    """The rungs a memory back-off of ``batch`` walks (the plan's ladder, from the configured
    settings); None for a batch without a recorded layout (planned before layouts, or on a GPU):
    the micro-batch walk alone applies then."""
    if batch.base_weights is None or not hasattr(guard, "ladder"):
        return None
    try:
        shape = planning.read_model_shape(_model_dir(settings))
    except OSError:
        return None
    return tuple(guard.ladder(shape, settings.train, settings.lora, precision=_precision(files, settings),
                              base_weights=settings.model.base_weights, device="cpu"))
