"""Evaluation: the candidate against the champion, before anything is published.

Teacher-forced loss on the same tokens training would learn (completion / assistant tokens
only, through the same Encoder), forward only, ``no_grad``, in eval mode (no dropout), with a
fixed batch size (``eval.batch_size``, never the backed-off training micro-batch) and a fixed
order: the same candidate gives the same figures, bit for bit on CPU.

What it is judged on (worker/evalsets.py): the batch's new set, the evaluation memory (the
version frozen at its first start, whole) and the standing suites — a cost bounded by the
memory's size and ``eval.max_tokens``, never by the length of the chain.

The champion's figures are reused, example by example, from its lineage
(``adapters/<n>/lineage.json``: every example it was measured on as a candidate, with the same
seq_len and precision). Every member of the memory it is judged against was measured so
(trainerd/core/evalmemory.py: the memory only loses members as batches join), so the champion pass
covers only the new set, the suites and whatever a rollback brought back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from trainerd.core import faults
from trainerd.core.contract import BatchFiles
from trainerd.core.fsutil import read_json_or_none
from trainerd.worker.data import IGNORE_INDEX, Encoder
from trainerd.worker.evalsets import EvalSet, Example, allocate, load_new_set, load_sets
from trainerd.worker.loss import loss_path, row_losses
from trainerd.worker import heartbeat
from trainerd.worker.stopper import StopRequested

__all__ = ["EvalSet", "Evaluator", "allocate", "evaluate_candidate", "load_new_set"]

EVAL_VERSION = 2


class Evaluator:
    """Mean loss per token (and per example) of the model's current adapter on chosen examples."""

    def __init__(self, model: Any, loaded: Any, stopper: Any, *, batch_size: int, pad_id: int,
                 autocast: torch.dtype | None = None):
        self.model, self.device, self.autocast = model, loaded.device, autocast
        self.stopper, self.batch_size, self.pad_id = stopper, batch_size, pad_id
        self.path = loss_path(model)

    @torch.no_grad()
    def losses(self, examples: list[Example]) -> list[tuple[float, int]]:
        """(summed loss, label tokens) per example, in order. Stops between batches on request."""
        out: list[tuple[float, int]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(examples), self.batch_size):
                if start and (reason := self.stopper.check()):
                    raise StopRequested(reason)
                out.extend(self._batch(examples[start:start + self.batch_size]))
                heartbeat.beat()
                faults.term_at("term_in_evaluation")
        finally:
            if was_training:
                self.model.train()
        return out

    def _batch(self, batch: list[Example]) -> list[tuple[float, int]]:
        width = max(e.tokens for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, :e.tokens] = torch.tensor(e.ids)
            labels[i, :e.tokens] = torch.tensor(e.labels)
            mask[i, :e.tokens] = 1
        return row_losses(self.model, ids.to(self.device), mask.to(self.device), labels.to(self.device),
                          autocast_dtype=self.autocast, path=self.path)


def figures(examples: list[Example], losses: list[tuple[float, int]], *, paired: bool = False) -> dict[str, Any]:
    """A set's figures for one model: token-weighted mean loss, and per example. ``paired``: the
    champion's, in the candidate's order (what identifies each example is said once, there)."""
    total = sum(s for s, _ in losses)
    tokens = sum(c for _, c in losses)
    mean = total / tokens if tokens else float("nan")
    per = ([{"loss_sum": s, "tokens": c} for s, c in losses] if paired else
           [{"hash": e.hash, "loss_sum": s, "tokens": c, "len": e.tokens, **({"batch": e.batch} if e.batch is not None else {})}
            for e, (s, c) in zip(examples, losses)])
    return {"mean_loss": mean, "tokens": tokens, "examples": len(losses), "per_example": per}


def _measured(lineage: dict[str, Any] | None, seq_len: int, precision: str) -> dict[str, tuple[float, int]]:
    """Every example the champion was measured on as a candidate (same seq_len and precision),
    by content hash; lineages written before the memory kept them per set: flattened."""
    measured = (lineage or {}).get("eval_measurements") or {}
    if measured.get("seq_len") != seq_len or measured.get("precision") != precision:
        return {}
    out: dict[str, tuple[float, int]] = {}
    for per in (measured.get("sets") or {}).values():
        out.update({h: (v[0], v[1]) for h, v in per.items()})
    out.update({h: (v[0], v[1]) for h, v in (measured.get("examples") or {}).items()})
    return out


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def measurements(sets: list[EvalSet], results: list[dict[str, Any]], seq_len: int, precision: str
                 ) -> dict[str, Any]:
    """What a version's lineage keeps of its own figures, for the next batch to reuse: every
    example it was evaluated on (bounded by the memory, the new set and the suites)."""
    out: dict[str, list] = {}
    for r in results:
        out.update({p["hash"]: [p["loss_sum"], p["tokens"]] for p in r["candidate"]["per_example"]})
    return {"seq_len": seq_len, "precision": precision, "examples": out}


def read_lineage(adapter_dir: Path | None) -> dict[str, Any] | None:
    if adapter_dir is None:
        return None
    return read_json_or_none(Path(adapter_dir) / "lineage.json")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# --- the whole evaluation of a candidate ---------------------------------------------------


def _result(s: EvalSet, cand: list[tuple[float, int]], champ: list[tuple[float, int]], reused: int) -> dict[str, Any]:
    out = {"name": s.ref.name, "kind": s.ref.kind, "batch": s.ref.batch, "path": s.ref.path,
           "sha256": s.sha256, "distinct": len(s.examples), "used": len(s.chosen),
           "candidate": figures(s.chosen, cand), "champion": figures(s.chosen, champ, paired=True),
           "champion_reused": reused}
    if s.memory is not None:
        out["memory"] = {k: s.memory.get(k) for k in ("version", "sha256", "examples", "batches", "tokens")}
        out["batches"] = len({e.batch for e in s.chosen})
    return out


def evaluate_candidate(model: Any, loaded: Any, stopper: Any, files: BatchFiles, settings: Any, *,
                       split: Any, champion: Path | None, train_tokens: int, encoder: Encoder,
                       precision: Any, log: Any) -> dict[str, Any]:
    """Candidate (the model's current adapter) and champion (``champion``, an adapter folder, or the
    base model when None) on every set, in the batch's ``precision`` (model.Precision):
    eval.json's content."""
    ev, t0 = settings.eval, time.monotonic()
    seq_len = settings.train.seq_len
    sets = load_sets(files, settings, split, encoder, log)
    budget = int(min(ev.max_tokens, ev.max_fraction * train_tokens))
    allocate(sets, budget // 2)
    prepare_s = time.monotonic() - t0
    chosen = [s for s in sets if s.chosen]
    memory = next((s for s in chosen if s.ref.kind == "memory"), None)
    log.info("evaluation_started", sets=len(chosen), examples=sum(len(s.chosen) for s in chosen),
             memory_examples=len(memory.chosen) if memory else 0,
             memory_version=memory.memory["version"] if memory else None,
             subsampled_sets=sum(1 for s in chosen if len(s.chosen) < len(s.examples)),
             skipped_sets=sum(1 for s in sets if not s.chosen), budget_tokens=budget,
             champion=str(champion) if champion else "base", prepare_s=round(prepare_s, 3))
    if not chosen:
        log.info("evaluation_has_no_set", reason="no new set, no memory, no suite: the gate can only check for NaN/inf")
    evaluator = Evaluator(model, loaded, stopper, batch_size=ev.batch_size, pad_id=loaded.tokenizer.pad_token_id,
                          autocast=precision.autocast)
    cand = [evaluator.losses(s.chosen) for s in chosen]
    known = _measured(read_lineage(champion), seq_len, precision.name)
    missing = [e for s in chosen for e in s.chosen if e.hash not in known]
    if missing:
        todo = list({e.hash: e for e in missing}.values())
        with _champion(model, champion):
            known.update({e.hash: loss for e, loss in zip(todo, evaluator.losses(todo))})
    reused = {e.hash for s in chosen for e in s.chosen} - {e.hash for e in missing}
    results = [_result(s, c, [known[e.hash] for e in s.chosen], sum(1 for e in s.chosen if e.hash in reused))
               for s, c in zip(chosen, cand)]
    out = {"version": EVAL_VERSION, "champion": {"path": str(champion) if champion else None,
                                                 "reused_examples": len(reused), "measured_examples": len(missing)},
           "budget_tokens": budget, "train_tokens": train_tokens, "batch_size": ev.batch_size,
           "seconds": round(time.monotonic() - t0, 3), "prepare_s": round(prepare_s, 3),
           "skipped_sets": sum(1 for s in sets if not s.chosen),
           "sets": results, "written_at": time.time()}
    out["measurements"] = measurements(chosen, results, seq_len, precision.name)
    out["precision"] = precision.name
    return out


class _champion:
    """Within the block, the model computes with the champion: its adapter loaded beside the
    candidate's (removed after, so it is never saved with it), or no adapter at all (the base)."""

    def __init__(self, model: Any, champion: Path | None):
        self.model, self.champion = model, champion
        self._ctx: Any = None

    def __enter__(self) -> None:
        if self.champion is None:
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
        else:
            self.model.load_adapter(str(self.champion), adapter_name="champion", is_trainable=False)
            self.model.set_adapter("champion")

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            return
        self.model.set_adapter("default")
        self.model.delete_adapter("champion")


# --- early stopping -----------------------------------------------------------------------


class EarlyStopping:
    """The new set's loss every ``every`` optimizer steps; after ``patience`` evaluations without
    improvement, training ends and the best step's weights are the candidate. Its state is part
    of every checkpoint, so a resume continues the count exactly."""

    def __init__(self, every: int, patience: int, state: dict[str, Any] | None = None):
        self.every, self.patience = every, patience
        st = state or {}
        self.best_step: int | None = st.get("best_step")
        self.best_loss: float | None = st.get("best_loss")
        self.bad: int = st.get("bad", 0)
        self.stopped: bool = st.get("stopped", False)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss at ``step``; True when it is the best so far."""
        if self.best_loss is None or (finite(loss) and loss < self.best_loss):
            self.best_step, self.best_loss, self.bad = step, loss, 0
            return True
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.stopped = True
        return False

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_loss": self.best_loss, "bad": self.bad, "stopped": self.stopped}
