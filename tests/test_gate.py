"""The gate as tables: evaluation figures + thresholds -> blessed, ungated or refused, and the rule.
No processes, no files (the real worker and daemon are in tests/test_gate_e2e.py and
tests/test_heal_e2e.py). The error rates of the history tests are measured here on simulated
chains of 1,000 batches, the figures the README quotes."""

from __future__ import annotations

import math
import random

import pytest

from trainerd.core.settings import GateSettings
from trainerd.supervisor.evidence import holm, t_quantile, t_sf
from trainerd.supervisor.gate import judge

GATE = GateSettings()  # new_tolerance 0.02, max_regression 0.05, confidence 0.95, min_examples 8, noise_floor 0.05


def per(losses: list[float], batch: int | None = None, start: int = 0) -> list[dict]:
    return [{"hash": f"h{start + i}", "loss_sum": v * 10, "tokens": 10, **({"batch": batch} if batch else {})}
            for i, v in enumerate(losses)]


def s(kind: str, champion: list[float], candidate: list[float], *, name: str | None = None, batches=None) -> dict:
    """One set: per-example mean losses of champion and candidate (10 tokens each); ``batches``
    tags each example of a memory with its batch."""
    def fig(vals):
        p = per(vals)
        if batches:
            for x, b in zip(p, batches):
                x["batch"] = b
        return {"mean_loss": sum(vals) / len(vals) if vals else float("nan"), "per_example": p}

    return {"name": name or kind, "kind": kind, "used": len(candidate), "candidate": fig(candidate),
            "champion": fig(champion)}


def memory(changes: dict[int, list[float]], base: float = 2.0) -> dict:
    """A memory whose batch b's examples change by ``changes[b]``."""
    champ, cand, tags = [], [], []
    for b, ds in changes.items():
        for d in ds:
            champ.append(base)
            cand.append(base + d)
            tags.append(b)
    return s("memory", champ, cand, batches=tags)


LEARNED = s("new", [3.0] * 10, [2.0 + 0.01 * i for i in range(10)])      # clearly learned
BENIGN = memory({b: [0.01 * ((b * 7) % 5 - 2)] for b in range(1, 41)})    # 40 batches, tiny changes


TABLE = [
    ("learned, history kept", [LEARNED, BENIGN], "blessed", None),
    ("learned, no history yet", [LEARNED], "blessed", None),
    ("its own new set clearly worse", [s("new", [2.0] * 10, [2.3 + 0.01 * i for i in range(10)]), BENIGN],
     "refused", "worse on its own new set by +0.3450"),
    ("two examples, 0.006 worse (issue 21): cannot tell", [s("new", [3.122, 3.122], [3.128, 3.128])],
     "ungated", "too little held-out data to judge"),
    ("one contradicted batch among forty", [LEARNED, memory({**{b: [0.0] for b in range(1, 41)}, 7: [1.5]})],
     "refused", "forgot batch 000007: worse by +1.5000"),
    ("a little forgetting everywhere", [LEARNED, memory({b: [0.12, 0.08] for b in range(1, 41)})],
     "refused", "worse on history by +0.1000"),
    ("a suite regressed", [LEARNED, BENIGN, s("suite", [1.0] * 12, [1.5] * 12, name="suite facts.jsonl")],
     "refused", "forgot suite facts.jsonl"),
    ("NaN candidate", [s("new", [2.0] * 3, [float("nan")] * 3)], "refused", "loss is not finite"),
    ("no set at all", [], "ungated", "too little held-out data to judge"),
    ("one seen content, learned", [s("seen", [3.0], [0.5])], "blessed", "one distinct content"),
]


@pytest.mark.parametrize("name,sets,verdict,words", TABLE, ids=[r[0] for r in TABLE])
def test_gate(name, sets, verdict, words):
    """Each row: the verdict, and the rule (or the note) naming what decided it with its numbers."""
    d = judge({"sets": sets}, GATE)
    assert d.verdict == verdict, (d.rule, d.note)
    assert d.blessed is (verdict != "refused")
    if words:
        assert words in ((d.rule or "") + (d.note or "")), (d.rule, d.note)
    if verdict != "refused":
        assert d.rule is None


def test_a_refusal_on_history_alone_is_healable_and_names_the_batches():
    """Forgetting is healable (the regressed batches are the ones to rehearse); not learning is not."""
    forgot = judge({"sets": [LEARNED, memory({**{b: [0.0] for b in range(1, 30)}, 4: [1.2], 9: [0.9]})]}, GATE)
    assert forgot.healable and set(forgot.targets) == {4, 9}
    assert [r["batch"] for r in forgot.history["regressed"]] == [4, 9]
    both = judge({"sets": [s("new", [2.0] * 10, [2.5] * 10), memory({1: [1.5], 2: [0.0]})]}, GATE)
    assert not both.healable and both.targets == (1,)  # named (the rejection says so), not healed


def test_a_single_held_out_fact_is_enough_to_refuse_a_contradiction():
    """The first fact batch held out one paraphrase; the batch contradicting it is refused on that
    one example (the spread it cannot measure is taken as gate.noise_floor), and healable."""
    d = judge({"sets": [s("new", [3.0], [0.4]), memory({1: [2.1]})]}, GATE)
    assert d.verdict == "refused" and "batch 000001" in d.rule and d.targets == (1,)


def test_a_small_real_change_on_few_examples_is_not_called_noise_nor_certain():
    """A change the evidence cannot size is neither refused nor blessed: published ungated, saying so."""
    d = judge({"sets": [s("new", [3.0, 3.0, 3.0], [2.98, 3.01, 3.0]), memory({1: [0.04], 2: [0.06]})]}, GATE)
    assert d.verdict == "ungated" and "too little held-out data" in d.note and not d.gated


def test_gate_off_publishes_ungated_but_says_what_it_would_have_done():
    """gate.enabled false: published, ungated, with the rule that would have refused it."""
    d = judge({"sets": [s("new", [2.0] * 10, [3.0] * 10)]}, GateSettings(enabled=False))
    assert d.blessed and d.verdict == "ungated" and not d.would_bless and "own new set" in d.rule
    assert "would have refused" in d.note


def test_non_finite_training_loss_is_refused_even_without_sets():
    """A training loss of NaN/inf is refused whatever the sets say."""
    d = judge({"sets": []}, GATE, last_loss=float("nan"))
    assert not d.blessed and "training loss is nan" in d.rule and not d.healable


def test_thresholds_are_read_at_each_decision():
    """A reloaded threshold decides the next candidate (nothing is remembered between calls)."""
    figures = {"sets": [LEARNED, memory({b: [0.08, 0.1, 0.09] for b in range(1, 20)})]}
    assert judge(figures, GATE).verdict == "refused"
    assert judge(figures, GateSettings(max_regression=0.2)).verdict == "blessed"


@pytest.mark.parametrize("p,df,expected", [(0.975, 7, 2.364624), (0.95, 10, 1.812461), (0.75, 3, 0.764892),
                                           (0.975, 1000, 1.962339), (0.95, 30, 1.697261)])
def test_student_t_quantiles_match_the_tables(p, df, expected):
    """The t quantiles the bounds use equal the published tables (and the survival function inverts them)."""
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-5)
    assert t_sf(t_quantile(p, df), df) == pytest.approx(1 - p, abs=1e-6)


def test_holm_steps_down():
    """Holm rejects the smallest p-values while each is below alpha / (m - rank), then stops."""
    assert holm([0.001, 0.04, 0.012, 0.5], 0.05) == [0, 2]
    assert holm([0.02, 0.03], 0.05) == [0, 1]
    assert holm([0.03, 0.03, 0.03], 0.05) == []


# --- error rates over simulated chains of 1,000 batches ------------------------------------------


def _noise(rng: random.Random, kind: str, scale: float) -> float:
    """A per-example change's noise with standard deviation ``scale``."""
    if kind == "normal":
        return rng.gauss(0, scale)
    if kind == "laplace":
        return (rng.expovariate(1) - rng.expovariate(1)) * scale / math.sqrt(2)
    z, chi = rng.gauss(0, 1), sum(rng.gauss(0, 1) ** 2 for _ in range(5))  # Student t, 5 df
    return z / math.sqrt(chi / 5) * scale * math.sqrt(3 / 5)


def benign_chain(rng: random.Random, kind: str, scale: float, n: int = 1000, contradicted: float | None = None) -> dict:
    """The memory of a chain of ``n`` batches, one example each (tier 1 at N = 1,000), none harmed
    beyond the allowance: each batch's true change uniform in [-0.05, +0.025] nats/token plus noise;
    ``contradicted``: batch 1 also changes by that much (a contradicted fact)."""
    changes = {b: [rng.uniform(-0.05, 0.025) + _noise(rng, kind, scale)] for b in range(1, n + 1)}
    if contradicted is not None:
        changes[1][0] += contradicted
    return memory(changes)


# Within the README's bound (benchmarks/gate_rates.py measures every family, including where the
# bound is not met: Student-t5 noise of 0.2 nats/token).
RATES = [("normal", 0.05), ("normal", 0.1), ("laplace", 0.05), ("laplace", 0.1), ("t5", 0.05)]


@pytest.mark.parametrize("kind,scale", RATES, ids=[f"{k}-{s}" for k, s in RATES])
def test_benign_chains_of_1000_batches_are_rarely_refused_and_a_contradiction_is_found(kind, scale):
    """False refusals <= 5 % over simulated benign chains of 1,000 batches (normal and Laplace noise
    up to 0.1 nats/token, Student-t5 at 0.05), and a single batch contradicted by +1.5 nats/token
    is found among them in >= 95 % of chains (its batch named)."""
    rng = random.Random(f"{kind}-{scale}")
    refused = sum(judge({"sets": [benign_chain(rng, kind, scale)]}, GATE).verdict == "refused" for _ in range(60))
    found = 0
    for _ in range(20):
        d = judge({"sets": [benign_chain(rng, kind, scale, contradicted=1.5)]}, GATE)
        found += d.verdict == "refused" and 1 in d.targets
    assert refused / 60 <= 0.05 and found / 20 >= 0.95, (refused, found)


# --- facts among text: what the real model's memory looks like (benchmarks/continual.py) ----------


def facts_among_text(rng: random.Random, n: int = 200, forgotten: float | None = None) -> dict:
    """The memory of ``n`` batches as SmolLM2 showed it (benchmarks/README.md, "the chain"): each
    batch held out two lines of general text the model never could predict (5-7 nats/token, each
    wobbling by Student-t5 noise of 0.2 nats/token from one version to the next; measured there:
    0.12 around a drift of -0.1) and one
    paraphrase of its made-up fact, learned (0.01-0.1 nats/token, wobbling by 0.03).
    ``forgotten``: batch 1's fact's loss becomes that much (a fact forgotten or contradicted)."""
    champ, cand, tags = [], [], []
    for b in range(1, n + 1):
        for _ in range(2):
            c = rng.uniform(5.0, 7.0)
            champ.append(c)
            cand.append(c + _noise(rng, "t5", 0.2))
        c = rng.uniform(0.01, 0.1)
        champ.append(c)
        cand.append(forgotten if b == 1 and forgotten is not None else max(0.001, c + rng.gauss(0, 0.03)))
        tags += [b, b, b]
    return s("memory", champ, cand, batches=tags)


def test_a_forgotten_fact_among_unpredictable_text_is_found_by_what_the_model_knew():
    """Batch 1's fact forgotten (0.03 -> 1.0 nats/token: p 0.97 -> 0.37 a token) among 200 batches
    whose text wobbles by tenths of a nat: the loss tests alone cannot tell it from the wobble
    (gate.max_forgetting 1.0 turns the probability test off), the probability test finds it and
    names the batch, >= 95 % of memories; with nothing forgotten <= 5 % are refused."""
    rng = random.Random("facts-among-text")
    loss_only = GateSettings(max_forgetting=1.0)
    found = missed_by_loss = 0
    for _ in range(20):
        sets = {"sets": [LEARNED, facts_among_text(rng, forgotten=1.0)]}
        d = judge(sets, GATE)
        found += d.verdict == "refused" and 1 in d.targets and d.healable
        missed_by_loss += 1 not in judge(sets, loss_only).targets
    refused = sum(judge({"sets": [LEARNED, facts_among_text(rng)]}, GATE).verdict == "refused" for _ in range(60))
    assert found >= 19 and missed_by_loss >= 19 and refused <= 3, (found, missed_by_loss, refused)
    d = judge({"sets": [LEARNED, facts_among_text(rng, forgotten=1.0)]}, GATE)
    assert "forgot batch 000001: an example it was judged on fell from p 0.9" in d.rule and " to 0.368 " in d.rule
