"""Upgrade in place: a root from before the evaluation memory keeps every adapter, lineage and set.

The ledger's own step (schema 4: a batch's healing tries) runs when it opens. The files follow
here, once, at the daemon's start, before reconcile and before any worker:

- the evaluation memory (trainerd/core/evalmemory.py) is built from ``evalsets/batches/<id>.jsonl``
  (every published batch's set, kept as it was), batch by batch; the batches a rollback left
  behind are marked abandoned as ``trainerd rollback`` would have; token counts come from each
  batch's eval.json where its folder is still there (else they are estimated until the next
  evaluation measures them);
- a batch in progress (started, not ended) froze its inputs the old way (``evalsets.json``
  listing every earlier set): it is judged on the memory's first version instead, with its
  suites, and it keeps its split (the old split.json lists every excluded hash; it still reads).

Nothing is deleted or rewritten in place but those batches' evalsets.json (the old one kept
beside it as ``evalsets.json.v1``). O(N) once; a crash part-way repeats it (every step is
idempotent until the memory is marked migrated).
"""

from __future__ import annotations

import os
from typing import Any

from trainerd.core.settings import Settings
from trainerd.core.contract import RootLayout
from trainerd.core.evalmemory import EvalMemory
from trainerd.core.fsutil import atomic_write_json, read_json_or_none
from trainerd.supervisor.ledger import Ledger
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.lineage import EVALSETS_VERSION, measured_tokens

__all__ = ["rolled_back", "upgrade_root"]


def rolled_back(ledger: Ledger) -> set[int]:
    """The batches whose versions a rollback left behind (their lines are not rehearsed, their
    sets not judged): as supervisor/chain.py marks them at each rollback."""
    versions = ledger.adapter_versions()
    out: set[int] = set()
    for v in versions:
        if v.kind == "rollback" and v.source is not None:
            out |= {av.batch_id for av in versions
                    if v.source < av.n < v.n and av.kind in ("blessed", "forced")}
    return out


def upgrade_root(layout: RootLayout, ledger: Ledger, settings: Settings, log: Any, notifier: Any = None) -> None:
    """Build the evaluation memory from the kept sets, once (module docstring). Before READY: a
    root with 10,000 sets takes a minute or more, so systemd is asked for the time as it goes."""
    with EvalMemory.open(layout.evalsets) as mem:
        if mem.migrated():
            return
        kept = sorted((int(p.stem), p) for p in (layout.evalsets / "batches").glob("*.jsonl") if p.stem.isdigit()) \
            if (layout.evalsets / "batches").is_dir() else []
        examples = 0
        with mem.bulk():
            for i, (b, path) in enumerate(kept):
                if i % 500 == 0 and i:
                    if notifier is not None:
                        notifier.extend_timeout(120)
                    log.info("eval_memory_migrating", sets_done=i, sets=len(kept))
                files = layout.batch(b)
                seen = (read_json_or_none(files.split) or {}).get("new_set_kind") == "seen"
                examples += mem.add_batch(b, seen=seen, tokens=measured_tokens(files), now=os.stat(path).st_mtime)
            mem.abandon(rolled_back(ledger))
        ref = mem.refresh(settings.eval.memory_examples, settings.eval.memory_tokens, log)
        moved = []
        for batch in ledger.batches(BatchState.QUEUED, BatchState.RUNNING):
            files = layout.batch(batch.id)
            frozen = read_json_or_none(files.evalsets)
            if frozen is None or frozen.get("version") == EVALSETS_VERSION:
                continue
            os.replace(files.evalsets, files.evalsets.with_name("evalsets.json.v1"))
            suites = [s for s in frozen.get("sets", []) if s.get("kind") == "suite"]
            atomic_write_json(files.evalsets, {"version": EVALSETS_VERSION, "memory": ref.as_dict() if ref else None,
                                               "sets": suites, "frozen_at": frozen.get("frozen_at"),
                                               "upgraded_from": "evalsets.json.v1"})
            moved.append(batch.id)
        mem.mark_migrated()
    if kept or moved:
        log.warning("eval_memory_migrated", sets=len(kept), examples=examples,
                    memory_version=ref.version if ref else None, memory_examples=ref.examples if ref else 0,
                    batches_refrozen=moved,
                    note="every earlier set is kept in evalsets/batches/; candidates are judged on the memory of them")
