"""The gate as a table: evaluation figures + thresholds -> blessed or the rule that failed.
No processes, no files (the real worker and daemon are in tests/test_gate_e2e.py)."""

from __future__ import annotations

import math

import pytest

from trainerd.config import GateSettings
from trainerd.supervisor.gate import judge

GATE = GateSettings(new_tolerance=0.02, max_regression=0.05)


def s(kind: str, champion: float, candidate: float, *, per_champ=None, per_cand=None, name=None) -> dict:
    """One set's figures; per-example losses default to 3 examples of 10 tokens at the set mean."""
    def per(mean, given):
        vals = given or [mean] * 3
        return [{"hash": f"h{i}", "loss_sum": v * 10, "tokens": 10} for i, v in enumerate(vals)]

    return {"name": name or f"{kind} set", "kind": kind, "used": len(per_cand or [0] * 3),
            "candidate": {"mean_loss": candidate, "per_example": per(candidate, per_cand)},
            "champion": {"mean_loss": champion, "per_example": per(champion, per_champ)}}


TABLE = [
    ("better everywhere", [s("new", 2.0, 1.5), s("earlier", 1.8, 1.79)], True, None),
    ("new set within tolerance", [s("new", 2.0, 2.019)], True, None),
    ("new set worse than tolerance", [s("new", 2.0, 2.03)], False, "worse on its own new set by 0.0300"),
    ("earlier set within max_regression", [s("new", 2.0, 1.0), s("earlier", 1.0, 1.049)], True, None),
    ("earlier set regressed", [s("new", 2.0, 1.0), s("earlier", 1.0, 1.30, name="batch 000001")], False,
     "worse on earlier set batch 000001 by 0.3000 nats/token (allowed 0.0500)"),
    ("a suite counts like an earlier set", [s("new", 2.0, 1.0), s("suite", 1.0, 1.2, name="suite facts.jsonl")],
     False, "worse on suite set suite facts.jsonl"),
    # A noisy set: the paired differences vary a lot, so 2 standard errors (> 0.05) allow 0.1.
    ("noise widens the allowance", [s("new", 2.0, 1.0), s("earlier", 1.0, 1.1, per_champ=[1.0, 1.0, 1.0, 1.0],
                                                          per_cand=[0.7, 1.5, 0.8, 1.4])], True, None),
    ("NaN candidate", [s("new", 2.0, float("nan"))], False, "loss is not finite"),
    ("inf champion", [s("new", float("inf"), 1.0)], False, "loss is not finite"),
    ("no set at all: only NaN/inf", [], True, None),
]


@pytest.mark.parametrize("name,sets,blessed,rule", TABLE, ids=[r[0] for r in TABLE])
def test_gate(name, sets, blessed, rule):
    """Each row: blessed or not, and the rule that failed named with its numbers."""
    d = judge({"sets": sets}, GATE)
    assert d.blessed is blessed and d.would_bless is blessed
    if rule is None:
        assert d.rule is None
    else:
        assert rule in d.rule


def test_noisy_allowance_is_two_standard_errors():
    """The allowance on an earlier set is max(max_regression, 2 x SE of the paired differences)."""
    d = judge({"sets": [s("earlier", 1.0, 1.1, per_champ=[1.0] * 4, per_cand=[0.7, 1.5, 0.8, 1.4])]}, GATE)
    diffs = [-0.3, 0.5, -0.2, 0.4]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3 / 4)
    assert d.sets[0].stderr == pytest.approx(se) and d.sets[0].allowed == pytest.approx(2 * se)


def test_no_set_says_so():
    """With nothing to evaluate on the decision says only NaN/inf was checked."""
    assert "only the NaN/inf rule" in judge(None, GATE).note


def test_non_finite_training_loss_is_refused_even_without_sets():
    """A training loss of NaN/inf is refused whatever the sets say."""
    d = judge({"sets": []}, GATE, last_loss=float("nan"))
    assert not d.blessed and "training loss is nan" in d.rule


def test_gate_off_blesses_but_says_what_it_would_have_done():
    """gate.enabled false: blessed, with the rule that would have failed kept for the record."""
    d = judge({"sets": [s("new", 2.0, 3.0)]}, GateSettings(enabled=False))
    assert d.blessed and not d.would_bless and "own new set" in d.rule


def test_thresholds_are_read_at_each_decision():
    """A reloaded threshold decides the next candidate (nothing is remembered between calls)."""
    figures = {"sets": [s("new", 2.0, 1.0), s("earlier", 1.0, 1.08)]}
    assert not judge(figures, GATE).blessed
    assert judge(figures, GateSettings(max_regression=0.1)).blessed
