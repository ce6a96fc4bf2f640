"""The gate, pure: a candidate's evaluation figures and the ``gate`` settings -> blessed or not.

Blessed when all hold:

- no loss is NaN or infinite (candidate or champion, on any set);
- on the batch's new set the candidate is not worse than the champion by more than
  ``gate.new_tolerance`` nats/token;
- on every earlier set and standing suite the increase is at most
  max(``gate.max_regression``, 2 standard errors of the paired per-example differences).

With no set at all only the NaN/inf rule applies (and the decision says so). With
``gate.enabled: false`` every candidate is blessed; the figures and what the gate would have
said are still recorded. A reload of the thresholds applies to the next decision: nothing here
is remembered between calls. Table-tested in tests/test_gate.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainerd.config import GateSettings

__all__ = ["GateDecision", "SetJudgement", "judge"]


@dataclass(frozen=True)
class SetJudgement:
    name: str
    kind: str                  # new | earlier | suite
    champion: float
    candidate: float
    change: float              # candidate - champion (nats/token; positive = worse)
    allowed: float             # the largest change this set allows
    stderr: float | None       # of the paired per-example differences
    examples: int
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "champion": self.champion, "candidate": self.candidate,
                "change": self.change, "allowed": self.allowed, "stderr": self.stderr,
                "examples": self.examples, "ok": self.ok}


@dataclass(frozen=True)
class GateDecision:
    blessed: bool
    rule: str | None                      # the first rule that failed, in words; None when blessed
    sets: tuple[SetJudgement, ...] = ()
    enabled: bool = True
    would_bless: bool = True              # the verdict with the gate on (differs when it is off)
    note: str | None = None               # e.g. "no evaluation set: only NaN/inf was checked"
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def new_set(self) -> SetJudgement | None:
        return next((s for s in self.sets if s.kind == "new"), None)

    @property
    def worst_earlier(self) -> SetJudgement | None:
        older = [s for s in self.sets if s.kind != "new"]
        return max(older, key=lambda s: s.change) if older else None

    def as_dict(self) -> dict[str, Any]:
        return {"blessed": self.blessed, "rule": self.rule, "enabled": self.enabled, "would_bless": self.would_bless,
                "note": self.note, "thresholds": self.thresholds, "sets": [s.as_dict() for s in self.sets]}


def _paired_stderr(cand: list[dict[str, Any]], champ: list[dict[str, Any]]) -> float | None:
    """Standard error of the mean of per-example (candidate - champion) mean losses."""
    diffs = []
    for a, b in zip(cand, champ):
        if a["tokens"] and b["tokens"]:
            diffs.append(a["loss_sum"] / a["tokens"] - b["loss_sum"] / b["tokens"])
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return math.sqrt(var / n)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def judge(eval_result: dict[str, Any] | None, gate: GateSettings, *, last_loss: float | None = None) -> GateDecision:
    """The gate's verdict on one candidate (``eval_result`` is the worker's eval.json)."""
    thresholds = {"new_tolerance": gate.new_tolerance, "max_regression": gate.max_regression}
    sets = (eval_result or {}).get("sets") or []
    judged: list[SetJudgement] = []
    failed: str | None = None
    if last_loss is not None and not _finite(last_loss):
        failed = f"training loss is {last_loss}"
    for s in sets:
        cand, champ = s["candidate"], s["champion"]
        c, h = cand.get("mean_loss"), champ.get("mean_loss")
        if not (_finite(c) and _finite(h)):
            judged.append(SetJudgement(s["name"], s["kind"], h, c, float("nan"), 0.0, None, s.get("used", 0), False))
            failed = failed or f"{s['name']}: loss is not finite (candidate {c}, champion {h})"
            continue
        change = c - h
        if s["kind"] == "new":
            allowed, se = gate.new_tolerance, None
        else:
            se = _paired_stderr(cand.get("per_example") or [], champ.get("per_example") or [])
            allowed = max(gate.max_regression, 2 * se) if se is not None else gate.max_regression
        ok = change <= allowed
        judged.append(SetJudgement(s["name"], s["kind"], h, c, change, allowed, se, s.get("used", 0), ok))
        if not ok and failed is None:
            what = "its own new set" if s["kind"] == "new" else f"{s['kind']} set {s['name']}"
            failed = (f"worse on {what} by {change:.4f} nats/token (allowed {allowed:.4f}): "
                      f"champion {h:.4f} -> candidate {c:.4f}")
    note = None if sets else "no evaluation set: only the NaN/inf rule was checked"
    would = failed is None
    return GateDecision(blessed=would or not gate.enabled, rule=failed, sets=tuple(judged), enabled=gate.enabled,
                        would_bless=would, note=note, thresholds=thresholds)
