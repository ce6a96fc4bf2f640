"""The one test config: a trainerd config dict for a root and a model, fast on the tiny model.

Every test that needs a config builds it here, as a daemon's YAML (``Daemon`` writes it),
as in-process ``Settings`` (``trainerd.core.config.from_dict(config_dict(...))``) or as a worker's
settings.json (tests/workerutil.py). Overrides are deep-merged section by section; an
override of ``None`` drops the key, so the product's default applies (the fake-worker tests
keep the real ``train`` defaults, whose back-off ladder they check).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["FAST", "config_dict", "merge"]

# Why each value: the tiny model trains a step in well under a second at seq 32 x micro 2,
# and a checkpoint every 2 optimizer steps (and never by time: where it lands is then the
# same in every run, on a loaded machine too) leaves something to resume from whenever a test
# interrupts; a file settles in 0.3 s and a missed event is found within 1 s; a retry waits
# 0.5-2 s, not the production 5-600 s; and a tmp file system that happens to be nearly full
# must not hold every batch back (the disk tests set their own minimum).
FAST: Mapping[str, Mapping[str, Any]] = {
    "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 2,
              "checkpoint_every_s": 0, "threads": 1, "warmup_steps": 2},
    "data": {"chunk_lines": 16},
    "supervisor": {"settle_s": 0.3, "rescan_s": 1.0, "stop_grace_s": 60},
    "retry": {"backoff_s": 0.5, "backoff_max_s": 2},
    "disk": {"min_free_bytes": 0},
}


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` deep-merged into it (neither is changed); a ``None`` in ``over``
    removes that key."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            out[key] = merge(out[key] if isinstance(out.get(key), Mapping) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_dict(root: str | os.PathLike[str], model_dir: str | os.PathLike[str], *layers: Mapping[str, Any],
                **overrides: Any) -> dict[str, Any]:
    """The config for ``root`` and ``model_dir``: ``FAST``, then each of ``layers``, then
    ``overrides`` (``section={...}``) merged in that order."""
    cfg = merge({"root": str(root), "model": {"path": str(model_dir)}}, FAST)
    for layer in (*layers, overrides):
        cfg = merge(cfg, layer)
    return cfg
