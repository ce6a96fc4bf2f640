"""The gate, pure: a candidate's evaluation figures and the ``gate`` settings -> a verdict.

Every figure is a paired per-example change, candidate minus champion (nats/token; the worker's
eval.json). Two questions, each answered *pass*, *fail* or *thin* (the evidence cannot tell) by
:mod:`.evidence`, at ``gate.confidence`` (0.95; α = 0.05):

- **Did it learn its own batch?** On the new set (the batch's held-out slice or its eval file;
  "seen" when the file had one distinct content and is judged on its own lines): refused when
  the change is beyond ``gate.new_tolerance`` at the confidence (one-sided, α).
- **Did it forget history?** On the evaluation memory (a bounded, stratified sample of every
  published batch's held-out contents) and the standing suites, two tests sharing α (α/2 each,
  so together they refuse a candidate that harmed no batch with probability at most α, whatever
  the chain's length):
  1. *pooled*: the mean change over every history example, refused when its lower bound is above
     ``gate.max_regression`` (broad forgetting, a little everywhere);
  2. *per batch*: each earlier batch (and each suite) on its own, and each of their examples on
     what the model knew (the champion gave each token at least even odds): the probability it
     gives each token, exp(-loss per token), may fall by at most ``gate.max_forgetting``;
     Holm–Bonferroni over all of these hypotheses (one contradicted fact among thousands of
     unharmed batches). The second measure finds a fact forgotten (p 0.97 -> 0.4 a token) among
     general text the model never could predict, whose loss wobbles by tenths of a nat from one
     version to the next while its probability stays near 0: in nats/token the two look alike
     (benchmarks/README.md, "the chain").

The verdict: *refused* when a question fails (or a loss is NaN/inf); *blessed* when none fails and
at least one passes; *ungated* when neither can tell — "too little held-out data to judge" is
published, and says so, never a plain "blessed" on noise. A refusal on history alone is
*healable* (supervisor/heal.py): the batches to rehearse are named. With ``gate.enabled: false``
every candidate is published ungated, with what the gate would have said. Nothing is remembered
between calls: a reload applies to the next decision. Table-tested in tests/test_gate.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainerd.core.settings import GateSettings
from trainerd.supervisor.evidence import Bound, bound_check, group_pvalue, holm, robust_scale

__all__ = ["GateDecision", "SetJudgement", "judge"]

HISTORY_KINDS = ("memory", "earlier", "suite")  # "earlier": a whole set, from eval.json version 1
NEW_KINDS = ("new", "seen")
KNEW = 0.5  # an example the champion gave each token at least even odds (exp(-loss/token)): what it knew
MAX_LISTED = 16  # regressed groups listed in a decision (and healed at once); the count is always given
SEEN_NOTE = "its new set is its own trained lines (the file has one distinct content: nothing to hold out)"


@dataclass(frozen=True)
class SetJudgement:
    """One evaluated set's summary (the memory is one set here; its batches are in ``history``)."""

    name: str
    kind: str                  # new | seen | memory | earlier | suite
    champion: float
    candidate: float
    change: float              # candidate - champion (nats/token; positive = worse)
    allowed: float
    examples: int
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "champion": self.champion, "candidate": self.candidate,
                "change": self.change, "allowed": self.allowed, "examples": self.examples, "ok": self.ok}


@dataclass(frozen=True)
class GateDecision:
    blessed: bool                         # published (blessed or ungated)
    rule: str | None                      # why refused, in words; None when not refused
    sets: tuple[SetJudgement, ...] = ()
    enabled: bool = True
    would_bless: bool = True              # the verdict with the gate on (differs when it is off)
    note: str | None = None               # what could not be judged, and why
    thresholds: dict[str, float] = field(default_factory=dict)
    verdict: str = "blessed"              # blessed | ungated | refused
    new: dict[str, Any] | None = None     # the new set's check (evidence.Bound + name, kind)
    history: dict[str, Any] | None = None  # pooled check, groups, regressed groups, worst group
    targets: tuple[int, ...] = ()         # the batches history regressed on (worst first): what a healing try rehearses
    healable: bool = False

    @property
    def new_set(self) -> SetJudgement | None:
        return next((s for s in self.sets if s.kind in NEW_KINDS), None)

    @property
    def worst_earlier(self) -> dict[str, Any] | None:
        """The history group with the largest change: {set, change, allowed, examples}."""
        return (self.history or {}).get("worst")

    @property
    def gated(self) -> bool:
        return self.verdict != "ungated"

    def log_fields(self) -> dict[str, Any]:
        """The decision for a log line: the verdict, the new set's losses, the worst history group."""
        new, worst = self.new_set, self.worst_earlier
        return {"gate_enabled": self.enabled, "verdict": self.verdict, "would_bless": self.would_bless,
                "gate_note": self.note, "new_set_loss": None if new is None else [new.champion, new.candidate],
                "worst_regression": None if worst is None else {k: worst[k] for k in ("set", "change", "allowed")}}

    def as_dict(self) -> dict[str, Any]:
        return {"blessed": self.blessed, "verdict": self.verdict, "rule": self.rule, "enabled": self.enabled,
                "would_bless": self.would_bless, "note": self.note, "thresholds": self.thresholds,
                "new": self.new, "history": self.history, "healable": self.healable, "targets": list(self.targets),
                "sets": [s.as_dict() for s in self.sets]}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _changes(s: dict[str, Any]) -> list[tuple[float, Any]]:
    """(per-example change, its batch) of one set, candidate and champion paired by position."""
    return [(d, b) for d, _lost, b in _pairs(s)]


def _pairs(s: dict[str, Any]) -> list[tuple[float, tuple[float, float], Any]]:
    """(loss change in nats/token, (champion's, candidate's) probability, its batch) per example
    of one set. The probability is exp(-loss per token): the geometric mean of what the model
    gives each answer token."""
    out = []
    for a, b in zip((s.get("candidate") or {}).get("per_example") or [], (s.get("champion") or {}).get("per_example") or []):
        if a.get("tokens") and b.get("tokens"):
            cand, champ = a["loss_sum"] / a["tokens"], b["loss_sum"] / b["tokens"]
            d = cand - champ
            if _finite(d):
                out.append((d, (math.exp(-champ), math.exp(-cand)), a.get("batch")))
    return out


Group = tuple[Any, list[float], list[tuple[float, float]]]  # (its batch, loss changes, probabilities)


def _groups(sets: list[dict[str, Any]]) -> dict[str, Group]:
    """History groups: each earlier batch of the memory, each whole earlier set, each suite."""
    groups: dict[str, Group] = {}
    for s in sets:
        if s["kind"] == "memory":
            for d, pr, b in _pairs(s):
                g = groups.setdefault(f"batch {int(b):06d}" if b is not None else "memory", (b, [], []))
                g[1].append(d)
                g[2].append(pr)
        elif s["kind"] in ("earlier", "suite"):
            pairs = _pairs(s)
            groups[s["name"]] = (s.get("batch"), [d for d, _, _ in pairs], [pr for _, pr, _ in pairs])
    return groups


def _history(sets: list[dict[str, Any]], gate: GateSettings) -> tuple[dict[str, Any], str | None, tuple[int, ...]]:
    """(the history check, the rule that failed or None, batches to heal from)."""
    alpha = 1.0 - gate.confidence
    groups = _groups(sets)
    everything = [d for _, ds, _ in groups.values() for d in ds]
    pooled = bound_check(everything, gate.max_regression, 1.0 - alpha / 2, min_examples=gate.min_examples,
                         noise_floor=gate.noise_floor)
    enough = len(everything) >= gate.min_examples
    mad = robust_scale(everything) if enough else None
    names = [g for g, (_, ds, _) in groups.items() if ds]
    means = {g: sum(groups[g][1]) / len(groups[g][1]) for g in names}
    # Two families of hypotheses, Holm over all of them at alpha/2: each group's loss rose beyond
    # max_regression (Student's t, or the memory's robust spread); each example lost more than
    # max_forgetting of its probability (the memory's robust spread of that, Laplace tails). The
    # second finds a forgotten fact among text the model never could predict, whose loss wobbles.
    # Only what the champion knew joins it (chosen by the champion alone, so the test stays valid):
    # an example it gave p 0.1 a token cannot lose enough to be told from noise, and would only
    # make the Holm family larger.
    # The spread is every history example's (the floor where that is tiny: text it never knew).
    mad_lost = robust_scale([c - n for g in names for c, n in groups[g][2]]) if enough else None
    examples = [(g, pr) for g in names for pr in groups[g][2] if pr[0] >= KNEW]
    p = [group_pvalue(groups[g][1], gate.max_regression, min_examples=gate.min_examples, pooled_mad=mad,
                      noise_floor=gate.noise_floor) for g in names]
    p += [group_pvalue([c - n], gate.max_forgetting, min_examples=gate.min_examples, pooled_mad=mad_lost,
                       noise_floor=gate.noise_floor) for _, (c, n) in examples]
    found: dict[str, tuple[float, tuple[float, float] | None]] = {}  # group -> (p, the example) by strength
    for i in holm(p, alpha / 2):
        g, pr = (names[i], None) if i < len(names) else examples[i - len(names)]
        found.setdefault(g, (p[i], pr))
    rejected = list(found)
    pv = dict(zip(names, p))
    for (g, _), q in zip(examples, p[len(names):]):
        pv[g] = min(pv[g], q)
    worst = max(means, key=means.__getitem__) if means else None
    check: dict[str, Any] = {
        "pooled": pooled.as_dict(), "groups": len(means), "tests": len(p), "alpha": alpha,
        "regressed": [{"set": g, "batch": groups[g][0], "change": means[g], "examples": len(groups[g][1]),
                       "p": found[g][0], **({"probability": list(found[g][1])} if found[g][1] else {})}
                      for g in rejected[:MAX_LISTED]],
        "regressed_count": len(rejected),
        "worst": None if worst is None else {"set": worst, "change": means[worst], "examples": len(groups[worst][1]),
                                             "allowed": gate.max_regression, "p": pv[worst]},
    }
    rule = None
    if rejected:
        g = rejected[0]
        q, pr = found[g]
        more = f"; {len(rejected) - 1} more batch(es) regressed too" if len(rejected) > 1 else ""
        if pr is None:
            how, allowed = f"worse by {means[g]:+.4f} nats/token over {len(groups[g][1])} example(s)", gate.max_regression
        else:
            how, allowed = (f"an example it was judged on fell from p {pr[0]:.3f} to {pr[1]:.3f} a token",
                            gate.max_forgetting)
        rule = f"forgot {g}: {how} (allowed {allowed}; p = {q:.1e}, Holm over {len(p)} tests at {alpha / 2:.3g}){more}"
        targets = [groups[g][0] for g in rejected if groups[g][0] is not None]
    elif pooled.status == "fail":
        rule = (f"worse on history by {pooled.mean:+.4f} nats/token on average over {pooled.n} examples "
                f"({100 * (1 - alpha / 2):.1f}% lower bound {pooled.lower:+.4f} > allowed {gate.max_regression})")
        targets = [groups[g][0] for g in sorted(means, key=means.__getitem__, reverse=True)
                   if means[g] > gate.max_regression and groups[g][0] is not None]
    else:
        targets = []
    status = "fail" if rule else pooled.status
    check["status"] = status
    return check, rule, tuple(int(t) for t in targets[:MAX_LISTED])


def _summaries(sets: list[dict[str, Any]], gate: GateSettings, failed: set[str]) -> list[SetJudgement]:
    out = []
    for s in sets:
        c, h = (s.get("candidate") or {}).get("mean_loss"), (s.get("champion") or {}).get("mean_loss")
        allowed = gate.new_tolerance if s["kind"] in NEW_KINDS else gate.max_regression
        change = c - h if _finite(c) and _finite(h) else float("nan")
        out.append(SetJudgement(s["name"], s["kind"], h, c, change, allowed, s.get("used", 0),
                                _finite(change) and s["name"] not in failed))
    return out


def _thin_note(new: Bound | None, history: dict[str, Any]) -> str:
    parts = []
    if new is None or new.status == "none":
        parts.append("no new set")
    elif new.status == "thin":
        parts.append(f"new set: {new.n} example(s), change {new.mean:+.4f}, bounds [{new.lower:+.4f}, "
                     f"{new.upper:+.4f}] around the allowance {new.allowed}")
    p = history["pooled"]
    if history["status"] == "none":
        parts.append("no history yet")
    elif history["status"] == "thin":
        parts.append(f"history: {p['examples']} example(s), change {p['change']:+.4f}, upper bound "
                     f"{p['upper']:+.4f} > allowed {p['allowed']}")
    return "; ".join(parts)


def judge(eval_result: dict[str, Any] | None, gate: GateSettings, *, last_loss: float | None = None) -> GateDecision:
    """The gate's verdict on one candidate (``eval_result`` is the worker's eval.json)."""
    thresholds = {"new_tolerance": gate.new_tolerance, "max_regression": gate.max_regression,
                  "confidence": gate.confidence, "min_examples": gate.min_examples, "noise_floor": gate.noise_floor}
    sets = (eval_result or {}).get("sets") or []
    failed_sets: set[str] = set()
    rule: str | None = None
    if last_loss is not None and not _finite(last_loss):
        rule = f"training loss is {last_loss}"
    for s in sets:
        c, h = (s.get("candidate") or {}).get("mean_loss"), (s.get("champion") or {}).get("mean_loss")
        if not (_finite(c) and _finite(h)):
            failed_sets.add(s["name"])
            rule = rule or f"{s['name']}: loss is not finite (candidate {c}, champion {h})"
    new_set = next((s for s in sets if s["kind"] in NEW_KINDS), None)
    new = None
    if new_set is not None:
        new = bound_check([d for d, _ in _changes(new_set)], gate.new_tolerance, gate.confidence,
                          min_examples=gate.min_examples, noise_floor=gate.noise_floor)
        if new.status == "fail":
            failed_sets.add(new_set["name"])
            rule = rule or (f"worse on its own new set by {new.mean:+.4f} nats/token over {new.n} example(s) "
                            f"({100 * gate.confidence:.0f}% lower bound {new.lower:+.4f} > allowed {gate.new_tolerance})")
    history, history_rule, targets = _history([s for s in sets if s["kind"] in HISTORY_KINDS], gate)
    healable = rule is None and history_rule is not None
    rule = rule or history_rule
    seen = new_set is not None and new_set["kind"] == "seen"
    note = None
    if rule is not None:
        verdict = "refused"
    elif (new is not None and new.status == "pass") or history["status"] == "pass":
        verdict = "blessed"
        if (new is None or new.status != "pass") or history["status"] not in ("pass",):
            note = "judged in part: " + _thin_note(new, history)
    else:
        verdict = "ungated"
        note = "too little held-out data to judge: published ungated (" + _thin_note(new, history) + ")"
    if seen:
        note = (note + "; " if note else "") + SEEN_NOTE
    would = rule is None
    if not gate.enabled:
        note = "gate.enabled is false: published ungated" + (f"; the gate would have refused: {rule}" if rule else
                                                             f"; the gate would have said {verdict}")
    new_dict = None if new is None else {**new.as_dict(), "name": new_set["name"], "kind": new_set["kind"]}
    return GateDecision(blessed=would or not gate.enabled, rule=rule, sets=tuple(_summaries(sets, gate, failed_sets)),
                        enabled=gate.enabled, would_bless=would, note=note, thresholds=thresholds,
                        verdict=verdict if gate.enabled else "ungated", new=new_dict, history=history,
                        targets=targets, healable=healable)
