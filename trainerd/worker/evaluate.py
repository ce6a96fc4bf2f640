"""Evaluation: the candidate against the champion, on every set, before anything is published.

Teacher-forced loss on the same tokens training would learn (completion / assistant tokens
only, through the same Encoder), forward only, ``no_grad``, in eval mode (no dropout), with a
fixed batch size (``eval.batch_size``, never the backed-off training micro-batch) and a fixed
order: the same candidate gives the same figures, bit for bit on CPU.

Sets: the batch's new set (its held-out slice or the eval file that came with it), every
earlier batch's set and the standing suites (``evalsets.json``, fixed at the batch's first
attempt; a set whose bytes no longer match its sha256 is skipped with a warning). Each set's
distinct contents are taken once, in content-hash order; when the budget (``eval.max_tokens``
and ``eval.max_fraction`` of the batch's training tokens, both passes together) cannot hold
them all, the sets share it round-robin (the new set twice per round), so a subsample is a
prefix of the hash order: fixed, and the same prefix the next batch takes.

The champion's figures are reused from its lineage (``adapters/<n>/lineage.json``) when every
example it needs was measured there with the same seq_len and precision.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from trainerd import faults
from trainerd.contract import BatchFiles
from trainerd.fsutil import open_regular, read_json_or_none
from trainerd.lines import content_hash, iter_lines, parse_line
from trainerd.worker.data import IGNORE_INDEX, Encoder
from trainerd.worker.loss import loss_path, row_losses
from trainerd.worker import heartbeat
from trainerd.worker.split import EvalSetRef, read_evalsets
from trainerd.worker.stopper import StopRequested

__all__ = ["EvalSet", "Evaluator", "load_sets"]

EVAL_VERSION = 1


@dataclass
class Example:
    hash: str
    ids: list[int]
    labels: list[int]   # -100 where no loss

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class EvalSet:
    ref: EvalSetRef
    sha256: str
    examples: list[Example]                 # distinct contents, hash order
    chosen: list[Example] = field(default_factory=list)


def _sha256(path: Path) -> str:
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _encode(path: Path, encoder: Encoder, seq_len: int, max_line_bytes: int) -> list[Example]:
    """The distinct good contents of a set file, tokenized, in content-hash order. A content
    longer than seq_len keeps its last seq_len tokens (the answer is at the end)."""
    items: dict[str, tuple] = {}
    with open_regular(path) as f:
        for raw in iter_lines(f, max_line_bytes):
            ex, _err = parse_line(raw)
            if ex is not None:
                items.setdefault(content_hash(ex), (raw, ex))
    order = sorted(items, key=lambda h: int(h, 16))
    encoded, _errors = encoder.encode([(*items[h], None, None, h) for h in order])
    out = []
    for enc in encoded:
        ids, keep = enc.ids[-seq_len:], enc.labels[-seq_len:]
        labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
        if any(k for k in keep[1:]):  # position 0 predicts nothing
            out.append(Example(enc.tag, ids, labels))
    return out


def load_sets(files: BatchFiles, new_set: str | None, encoder: Encoder, seq_len: int, max_line_bytes: int,
              log: Any) -> list[EvalSet]:
    """The new set first, then the sets of evalsets.json (damaged ones skipped with a warning)."""
    refs = []
    if new_set:
        refs.append(EvalSetRef(name=f"{files.dir.name}:{new_set}", kind="new", path=str(files.dir / new_set)))
    refs += read_evalsets(files)
    sets = []
    for ref in refs:
        path = Path(ref.path)
        try:
            sha = _sha256(path)
        except OSError as e:
            log.warning("eval_set_unreadable", set=ref.name, path=ref.path, error=str(e))
            continue
        if ref.sha256 and sha != ref.sha256:
            log.warning("eval_set_damaged", set=ref.name, path=ref.path, expected_sha256=ref.sha256, sha256=sha,
                        action="skipped: its bytes are not the ones it was judged with")
            continue
        sets.append(EvalSet(ref, sha, _encode(path, encoder, seq_len, max_line_bytes)))
    return sets


def allocate(sets: list[EvalSet], budget_tokens: int) -> int:
    """Choose each set's examples within ``budget_tokens`` (one model's share): round-robin in
    hash order, the new set taking two turns per round. Returns the tokens chosen."""
    used = 0
    nxt = [0] * len(sets)
    progress = True
    while progress:
        progress = False
        for i, s in enumerate(sets):
            for _ in range(2 if s.ref.kind == "new" else 1):
                if nxt[i] >= len(s.examples):
                    break
                ex = s.examples[nxt[i]]
                if used + ex.tokens > budget_tokens:
                    nxt[i] = len(s.examples)  # this set is full; later ones may still fit smaller examples
                    break
                s.chosen.append(ex)
                used += ex.tokens
                nxt[i] += 1
                progress = True
    return used


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


def figures(examples: list[Example], losses: list[tuple[float, int]], *, reused: str | None = None) -> dict[str, Any]:
    """A set's figures for one model: token-weighted mean loss, and per example."""
    total = sum(s for s, _ in losses)
    tokens = sum(c for _, c in losses)
    mean = total / tokens if tokens else float("nan")
    return {"mean_loss": mean, "tokens": tokens, "examples": len(losses), "reused_from": reused,
            "per_example": [{"hash": e.hash, "loss_sum": s, "tokens": c} for e, (s, c) in zip(examples, losses)]}


def reusable(lineage: dict[str, Any] | None, sha: str, examples: list[Example], seq_len: int, precision: str
             ) -> list[tuple[float, int]] | None:
    """The champion's per-example figures for ``examples`` from its lineage, if all were measured
    there on the same set bytes, seq_len and precision; else None."""
    if not lineage:
        return None
    measured = lineage.get("eval_measurements") or {}
    if measured.get("seq_len") != seq_len or measured.get("precision") != precision:
        return None
    per = (measured.get("sets") or {}).get(sha)
    if not per:
        return None
    try:
        return [tuple(per[e.hash]) for e in examples]  # type: ignore[misc]
    except KeyError:
        return None


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def measurements(sets: list[EvalSet], results: list[dict[str, Any]], seq_len: int, precision: str
                 ) -> dict[str, Any]:
    """What a version's lineage keeps of its own figures, for the next batch to reuse."""
    out: dict[str, dict[str, list]] = {}
    for s, r in zip(sets, results):
        out.setdefault(s.sha256, {}).update(
            {p["hash"]: [p["loss_sum"], p["tokens"]] for p in r["candidate"]["per_example"]})
    return {"seq_len": seq_len, "precision": precision, "sets": out}


def read_lineage(adapter_dir: Path | None) -> dict[str, Any] | None:
    if adapter_dir is None:
        return None
    return read_json_or_none(Path(adapter_dir) / "lineage.json")


def iter_chosen(sets: list[EvalSet]) -> Iterator[EvalSet]:
    return (s for s in sets if s.chosen)


def eval_json(sets: list[EvalSet], results: list[dict[str, Any]], *, champion: dict[str, Any], budget: int,
              train_tokens: int, batch_size: int, seconds: float, skipped: list[str]) -> dict[str, Any]:
    return {"version": EVAL_VERSION, "champion": champion, "budget_tokens": budget, "train_tokens": train_tokens,
            "batch_size": batch_size, "seconds": round(seconds, 3), "skipped_sets": skipped,
            "sets": results, "written_at": time.time()}


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# --- the whole evaluation of a candidate ---------------------------------------------------


def evaluate_candidate(model: Any, loaded: Any, stopper: Any, files: BatchFiles, settings: Any, *,
                       new_set: str | None, champion: Path | None, train_tokens: int, encoder: Encoder,
                       precision: Any, log: Any) -> dict[str, Any]:
    """Candidate (the model's current adapter) and champion (``champion``, an adapter folder, or the
    base model when None) on every set within the budget, in the batch's ``precision`` (model.Precision):
    eval.json's content."""
    ev, t0 = settings.eval, time.monotonic()
    seq_len = settings.train.seq_len
    sets = load_sets(files, new_set, encoder, seq_len, settings.data.max_line_bytes, log)
    budget = int(min(ev.max_tokens, ev.max_fraction * train_tokens))
    allocate(sets, budget // 2)
    chosen = [s for s in sets if s.chosen]
    skipped = [s.ref.name for s in sets if not s.chosen]
    subsampled = [s.ref.name for s in chosen if len(s.chosen) < len(s.examples)]
    log.info("evaluation_started", sets=len(chosen), skipped_sets=skipped, subsampled_sets=subsampled,
             budget_tokens=budget, examples=sum(len(s.chosen) for s in chosen), champion=str(champion) if champion else "base")
    if not chosen:
        log.info("evaluation_has_no_set", reason="no held-out slice, no eval file, no earlier set or suite "
                 "(or none fits the budget): the gate can only check for NaN/inf")
    evaluator = Evaluator(model, loaded, stopper, batch_size=ev.batch_size, pad_id=loaded.tokenizer.pad_token_id,
                          autocast=precision.autocast)
    cand = [evaluator.losses(s.chosen) for s in chosen]
    lineage = read_lineage(champion)
    champ: list[tuple[list[tuple[float, int]], str | None]] = []
    missing = []
    for s in chosen:
        got = reusable(lineage, s.sha256, s.chosen, seq_len, precision.name)
        champ.append((got, f"{champion}/lineage.json" if got is not None else None))
        if got is None:
            missing.append(len(champ) - 1)
    if missing:
        with _champion(model, champion):
            for i in missing:
                champ[i] = (evaluator.losses(chosen[i].chosen), None)
    results = []
    for s, c, (h, reused) in zip(chosen, cand, champ):
        results.append({"name": s.ref.name, "kind": s.ref.kind, "batch": s.ref.batch, "path": s.ref.path,
                        "sha256": s.sha256, "distinct": len(s.examples), "used": len(s.chosen),
                        "candidate": figures(s.chosen, c), "champion": figures(s.chosen, h, reused=reused)})
    out = eval_json(chosen, results, champion={"path": str(champion) if champion else None}, budget=budget,
                    train_tokens=train_tokens, batch_size=ev.batch_size, seconds=time.monotonic() - t0,
                    skipped=skipped)
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
