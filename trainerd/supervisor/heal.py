"""Healing: a candidate refused for forgetting is trained again before it is rejected.

When the gate refuses a candidate on history alone (supervisor/gate.py: an earlier batch, or
history as a whole, regressed beyond ``gate.max_regression``), the batch is not rejected at
once: while it has had fewer than ``gate.heal_attempts`` healing tries it goes back to the queue
(the policy's HEAL; a healing try is a new attempt of the same batch, never a crash) and is
trained again **from the same champion**, with its replay drawn again: the usual uniform draw
plus ``gate.heal_replay`` x try x its own lines from the batches it regressed on in any try so
far (their training lines in the replay store; worker/draw.py). Only when the last try is still
refused is it rejected, the reason naming the batches it conflicts with (those every try
regressed on). A new set it did not learn, or a NaN, is not healed: replay cannot fix that.

The files (batches/<id>/), each written before the ledger moves on, so that a crash anywhere
repeats a step instead of losing it:

- ``tries.json``: every judged try of a healed batch (0 = the first training), its verdict, rule
  and figures, the batches it regressed on; the lineage keeps it as ``heals``.
- ``heal.json``: the try the worker is asked to run (``try``, ``targets``, ``fraction``). Written
  at the try's start, *after* the previous try's checkpoints, scan, replay draw and figures are
  gone (a try starts from the champion, not from where the refused one ended): its presence at
  the ledger's try number says the folder is ready, and a resume of the try then continues from
  the try's own checkpoints, exactly, like any other attempt.
"""

from __future__ import annotations

import shutil
from typing import Any

from trainerd.core.contract import BatchFiles
from trainerd.core.fsutil import atomic_write_json, read_json_or_none, unlink_quietly
from trainerd.supervisor.ledger import Batch

__all__ = ["prepare", "record_try", "rejection_reason", "tries"]


def tries(files: BatchFiles) -> list[dict[str, Any]]:
    return list((read_json_or_none(files.tries) or {}).get("tries", []))


def record_try(files: BatchFiles, n: int, gate: Any, result: dict[str, Any] | None) -> None:
    """Try ``n``'s verdict and figures into tries.json (idempotent: a repeat replaces it)."""
    g = gate.as_dict()
    history = g.get("history") or {}
    entry = {"try": n, "verdict": g["verdict"], "rule": g["rule"], "note": g["note"], "new": g.get("new"),
             "history": {k: history.get(k) for k in ("status", "pooled", "regressed", "regressed_count", "worst")},
             "targets": g.get("targets", []), "steps": (result or {}).get("step"),
             "replay": (result or {}).get("replay")}
    kept = [t for t in tries(files) if t.get("try") != n]
    atomic_write_json(files.tries, {"tries": sorted([*kept, entry], key=lambda t: t["try"])})


def prepare(files: BatchFiles, batch: Batch, fraction: float, log: Any) -> bool:
    """At the start of an attempt of a batch the ledger says is healing: make its folder a fresh
    try from the champion, once (idempotent). True when it did."""
    if batch.heals <= 0 or (read_json_or_none(files.heal) or {}).get("try") == batch.heals:
        return False
    earlier = sorted((t for t in tries(files) if t.get("try", 0) < batch.heals), key=lambda t: -t.get("try", 0))
    previous = earlier[0] if earlier else {}
    shutil.rmtree(files.checkpoints, ignore_errors=True)
    shutil.rmtree(files.published, ignore_errors=True)
    for stale in (files.scan, files.eval_result, files.replay, files.progress):
        unlink_quietly(stale)
    # Every batch any try so far regressed on, the newest try's first: a try that rehearses one
    # batch can make the candidate forget another (measured on SmolLM2: try 1 kept batches 2-5 and
    # lost batch 1; rehearsing batch 1 alone, try 2 lost 2-5 again). Both are rehearsed next.
    targets: list[int] = []
    for t in earlier:
        targets += [b for b in t.get("targets") or [] if b not in targets]
    atomic_write_json(files.heal, {"try": batch.heals, "targets": targets, "fraction": fraction})
    log.info("healing_try_started", batch=batch.id, heal_try=batch.heals, targets=targets, heal_replay=fraction,
             rule=previous.get("rule"))
    return True


def rejection_reason(files: BatchFiles, reason: str, heals: int, last_targets: tuple[int, ...] = ()) -> str:
    """The final rejection after healing tries: what failed last, and the batches it conflicts
    with — those every refused try regressed on (rehearsing them never kept both), else the last
    try's worst regression, else the one its tries rehearsed most — unless named already."""
    if heals <= 0:
        return reason
    out = f"{reason} (after {heals} healing tr{'y' if heals == 1 else 'ies'})"
    every = tries(files)
    refused = [set(t.get("targets") or []) for t in every if t.get("verdict") == "refused"]
    persistent = set.intersection(*refused) if refused else set()
    if persistent:
        conflicts = [b for b in last_targets if b in persistent] + sorted(persistent - set(last_targets))
    else:
        named = [t for tr in every for t in (tr.get("targets") or [])]
        top = last_targets[0] if last_targets else (max(sorted(set(named)), key=named.count) if named else None)
        conflicts = [] if top is None else [top]
    conflicts = [b for b in conflicts if f"batch {b:06d}" not in reason]
    if conflicts:
        which = ", ".join(f"batch {b:06d}" for b in conflicts)
        whose = "that batch's" if len(conflicts) == 1 else "those batches'"
        out += f"; it conflicts with {which}: rehearsing {whose} lines did not keep both"
    return out
