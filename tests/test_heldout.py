"""The held-out figures a version's proof shows (trainerd/supervisor/views/heldout.py): the change of the token-weighted
loss and its standard error, the verdict, the question picked from a held-out set, and the
fallback to a batch's eval.json for versions whose lineage predates the figures."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainerd.supervisor.views import heldout
from trainerd.core.contract import RootLayout
from trainerd.core.lines import content_hash, parse_line, RawLine


def _per_example(rows):
    return [{"hash": str(i), "loss_sum": s, "tokens": t} for i, (s, t) in enumerate(rows)]


def _set(cand, champ, kind="new"):
    def fig(rows):
        total, tokens = sum(s for s, _ in rows), sum(t for _, t in rows)
        return {"mean_loss": total / tokens, "tokens": tokens, "examples": len(rows), "per_example": _per_example(rows)}
    return {"name": "000001:holdout.jsonl", "kind": kind, "candidate": fig(cand), "champion": fig(champ)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50), st.integers(1, 40)), min_size=2, max_size=30))
def test_stderr_is_the_ratio_estimators(rows):
    """The standard error is the delta-method one of sum(d)/sum(t) over independent examples:
    sqrt(n/(n-1) * sum((d_i - r t_i)^2)) / sum(t), computed here independently."""
    cand = [(a, t) for a, _, t in rows]
    champ = [(b, t) for _, b, t in rows]
    got = heldout.change_stderr(_per_example(cand), _per_example(champ))
    n, T = len(rows), sum(t for *_, t in rows)
    r = sum(a - b for a, b, _ in rows) / T
    want = math.sqrt(n / (n - 1) * sum(((a - b) - r * t) ** 2 for a, b, t in rows)) / T
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_stderr_shrinks_with_more_examples_of_the_same_spread():
    """Four times the examples from the same distribution: about half the standard error."""
    rng = random.Random(3)
    def draw(n):
        rows = [(rng.gauss(1.0, 0.3) * 10, 10) for _ in range(n)]
        return heldout.change_stderr(_per_example(rows), _per_example([(20.0, 10)] * n))
    assert 0.35 < draw(400) / draw(100) < 0.65


def test_figures_and_verdicts():
    """Before/after/change from a new set; 'learned' only for a fall beyond t standard errors;
    one example has no standard error; no set says so."""
    fell = heldout.of_eval({"sets": [_set([(5, 10), (6, 10), (4, 10)], [(30, 10), (31, 10), (29, 10)]),
                                     _set([(1, 10), (1, 10)], [(1, 10), (1, 10)], kind="earlier")]})
    assert fell["before"] == pytest.approx(3.0) and fell["after"] == pytest.approx(0.5)
    assert fell["change"] == pytest.approx(-2.5) and fell["examples"] == 3 and fell["tokens"] == 30
    assert heldout.fell_clearly(fell) and heldout.describe(fell).startswith("fell by 2.500 nats/token")
    noisy = heldout.of_eval({"sets": [_set([(10, 10), (30, 10)], [(25, 10), (20, 10)])]})
    assert noisy["change"] == pytest.approx(-0.25) and not heldout.fell_clearly(noisy)
    assert "within noise" in heldout.describe(noisy)
    worse = heldout.of_eval({"sets": [_set([(30, 10), (32, 10)], [(20, 10), (21, 10)])]})
    assert not heldout.fell_clearly(worse) and heldout.describe(worse).startswith("rose by")
    one = heldout.of_eval({"sets": [_set([(1, 10)], [(9, 10)])]})
    assert one["stderr"] is None and not heldout.fell_clearly(one) and "too few examples" in heldout.describe(one)
    assert heldout.of_eval({"sets": []}) is None and heldout.describe(None).startswith("no held-out figures")


@pytest.mark.parametrize("examples, bound", [(2, 12.706), (3, 4.303), (8, 2.365), (31, 2.042), (32, 2.0), (500, 2.0)])
def test_the_bound_is_students_t_for_the_examples_there_are(examples, bound):
    """Few examples need a larger multiple of the standard error (t at 97.5 %, n - 1 degrees of freedom)."""
    assert heldout.t_bound(examples) == bound


def test_a_small_fall_on_three_examples_is_not_called_learned():
    """The production defaults on the quickstart's sample (measured): 0.009 nats/token, 2.9 standard
    errors, but 3 examples: within noise; the quickstart's own 1.568 at 5.1 on 8 examples: learned."""
    tiny = {"change": -0.009, "stderr": 0.0031, "examples": 3}
    assert not heldout.fell_clearly(tiny) and heldout.describe(tiny).endswith("within noise")
    real = {"change": -1.568, "stderr": 0.309, "examples": 8}
    assert heldout.fell_clearly(real) and heldout.describe(real).endswith("learned, not noise")


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_question_is_the_first_askable_example_in_hash_order(tmp_path):
    """Plain text is skipped; a chat gives its last user turn, its system turn and the final
    answer; a prompt/completion its prompt; the pick is the smallest content hash among them."""
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
                         {"role": "assistant", "content": "Lunhaven."}]}
    comp = {"prompt": "Q: Currency?\nA:", "completion": " The brass mark."}
    text = {"text": "Kestovia is a made-up country."}
    path = tmp_path / "holdout.jsonl"
    path.write_bytes(_line(text) + _line(chat) + _line(comp))
    h = {k: int(content_hash(parse_line(RawLine(1, 0, 0, _line(o)))[0]), 16) for k, o in
         (("chat", chat), ("comp", comp))}
    q = heldout.question(path)
    if h["chat"] < h["comp"]:
        assert q == {"question": "Capital?", "system": "Be brief.", "expected": "Lunhaven."}
    else:
        assert q == {"question": "Q: Currency?\nA:", "system": None, "expected": "The brass mark."}
    path.write_bytes(_line(text))
    assert heldout.question(path) is None and heldout.question(tmp_path / "missing.jsonl") is None


def test_a_version_without_figures_in_its_lineage_reads_its_batch_eval(tmp_path):
    """Lineages written before the figures existed: the batch folder's eval.json gives them, while
    it is kept; without it there are none."""
    layout = RootLayout(tmp_path)
    ev = {"sets": [_set([(5, 10), (6, 10)], [(30, 10), (31, 10)])]}
    assert heldout.of_version(layout, {"heldout": {"change": -1.0}}, 1) == {"change": -1.0}
    assert heldout.of_version(layout, {}, 1) is None
    layout.batch(1).dir.mkdir(parents=True)
    layout.batch(1).eval_result.write_text(json.dumps(ev))
    assert heldout.of_version(layout, {}, 1) == heldout.of_eval(ev)


def test_learned_follows_rollbacks_and_names_the_champion(tmp_path):
    """`trainerd learned`'s data: a rollback shows the figures of the version it copies; a later
    version's 'before' is its champion (the parent version), the first one's the base model; the
    held-out question comes from the kept evaluation set, else from the batch folder."""
    from trainerd.cli.ask import NoSuchVersion, learned

    layout = RootLayout(tmp_path)
    chat = {"messages": [{"role": "user", "content": "Capital of Kestovia?"},
                         {"role": "assistant", "content": "The capital of Kestovia is Lunhaven."}]}
    fig = heldout.of_eval({"sets": [_set([(5, 10), (6, 10)], [(30, 10), (31, 10)])]})
    lineages = {1: {"kind": "blessed", "batch": 1, "file": "a.jsonl", "champion": None, "heldout": fig},
                2: {"kind": "blessed", "batch": 2, "parent": 1, "champion": str(layout.adapter_dir(1)), "heldout": fig},
                3: {"kind": "rollback", "rollback_of": 1, "parent": 2}}
    for n, lin in lineages.items():
        layout.adapter_dir(n).mkdir(parents=True)
        (layout.adapter_dir(n) / "lineage.json").write_text(json.dumps(lin))
    (layout.evalsets / "batches").mkdir(parents=True)
    (layout.evalsets / "batches" / f"{layout.batch_name(1)}.jsonl").write_bytes(_line(chat))
    layout.batch(2).dir.mkdir(parents=True)
    (layout.batch(2).dir / "holdout.jsonl").write_bytes(_line(chat))
    one, two, three = (learned(layout, n) for n in (1, 2, 3))
    assert one["before"] == "base" and one["learned"] and one["question"]["question"] == "Capital of Kestovia?"
    assert two["before"] == "version 1" and two["question"] == one["question"]  # from batches/000002/holdout.jsonl
    assert three["rollback_of"] == 1 and three["batch"] == 1 and three["heldout"] == fig and three["before"] == "base"
    with pytest.raises(NoSuchVersion):
        learned(layout, 9)
