"""Healing's pieces without processes: when the exit policy heals instead of rejecting, how a
healing try's folder is made ready (once), what tries.json keeps, and how the final rejection
names the batch it conflicts with. The real daemon and worker: tests/test_heal_e2e.py."""

from __future__ import annotations

import json

import pytest

from support.log import ListLog
from test_gate import LEARNED, memory, s
from trainerd.supervisor.child import ExitStatus
from trainerd.core.config import from_dict
from trainerd.core.contract import BatchFiles
from trainerd.supervisor.ledger import Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor import heal
from trainerd.supervisor.gate import judge
from trainerd.supervisor.policy import Action, AttemptEnd, decide

SETTINGS = from_dict({"root": "/r"})  # gate.heal_attempts 2
FORGOT = judge({"sets": [LEARNED, memory({**{b: [0.0] for b in range(1, 20)}, 3: [1.4]})]}, SETTINGS.gate)
NOT_LEARNED = judge({"sets": [s("new", [2.0] * 10, [2.6] * 10), memory({1: [1.4], 2: [0.0]})]}, SETTINGS.gate)


def batch(**kw) -> Batch:
    return Batch(**{"id": 7, "name": "a.jsonl", "state": BatchState.RUNNING, "created_at": 0.0, "updated_at": 0.0,
                    **kw})


@pytest.mark.parametrize("gate,heals,attempts,action", [
    (FORGOT, 0, 2, Action.HEAL), (FORGOT, 1, 2, Action.HEAL), (FORGOT, 2, 2, Action.REJECT),
    (FORGOT, 0, 0, Action.REJECT), (NOT_LEARNED, 0, 2, Action.REJECT)])
def test_the_policy_heals_forgetting_while_tries_are_left(gate, heals, attempts, action):
    """Refused on history alone: healed (heals + 1) while fewer than gate.heal_attempts tries were
    made; a candidate that did not learn its own set, or one out of tries, is rejected."""
    settings = from_dict({"root": "/r", "gate": {"heal_attempts": attempts}})
    v = decide(AttemptEnd(ExitStatus(0, None), {}, adapter_staged=True, gate=gate), batch(heals=heals), settings, 0.0)
    assert v.action is action
    if action is Action.HEAL:
        assert v.updates == {"heals": heals + 1} and v.events == ("batch_healing",)
        assert "batch 000003" in v.batch_reason and v.next_attempt_at == 0.0


def _folder(tmp_path) -> BatchFiles:
    files = BatchFiles(tmp_path / "000007")
    (files.checkpoints / "step-00000004").mkdir(parents=True)
    files.published.mkdir()
    for f in (files.scan, files.eval_result, files.replay, files.progress, files.split):
        f.write_text("{}")
    return files


def test_a_healing_try_starts_from_the_champion_once(tmp_path):
    """prepare removes the refused try's checkpoints, adapter, scan, figures and replay draw, then
    writes heal.json with the batches to rehearse; called again for the same try it does nothing
    (a resume of the try keeps its own checkpoints), and a batch not healing is left alone."""
    files = _folder(tmp_path)
    heal.record_try(files, 0, FORGOT, {"step": 12})
    assert not heal.prepare(files, batch(heals=0), 0.25, ListLog())
    log = ListLog()
    assert heal.prepare(files, batch(heals=1), 0.25, log)
    assert not files.checkpoints.exists() and not files.published.exists()
    assert not any(f.exists() for f in (files.scan, files.eval_result, files.replay, files.progress))
    assert files.split.exists()  # what is held out and excluded does not change
    assert json.loads(files.heal.read_text()) == {"try": 1, "targets": [3], "fraction": 0.25}
    assert log.find("healing_try_started")[0]["targets"] == [3]
    (files.checkpoints / "step-00000002").mkdir(parents=True)  # the try's own progress
    assert not heal.prepare(files, batch(heals=1), 0.25, ListLog())
    assert (files.checkpoints / "step-00000002").is_dir()


def test_a_healing_try_rehearses_every_batch_an_earlier_try_forgot(tmp_path):
    """Try 1 rehearsed batch 3 and forgot batch 1 instead: try 2 rehearses both, the newest try's
    first (rehearsing batch 1 alone would let batch 3 go again)."""
    files = _folder(tmp_path)
    heal.record_try(files, 0, FORGOT, {})
    assert heal.prepare(files, batch(heals=1), 0.25, ListLog())
    heal.record_try(files, 1, judge({"sets": [LEARNED, memory({**{b: [0.0] for b in range(2, 20)}, 1: [1.4]})]},
                                    SETTINGS.gate), {})
    log = ListLog()
    assert heal.prepare(files, batch(heals=2), 0.25, log)
    assert json.loads(files.heal.read_text())["targets"] == [1, 3] == log.find("healing_try_started")[0]["targets"]


def test_tries_json_keeps_each_try_once_with_its_figures(tmp_path):
    """Recording a try again (reconcile repeats a settle) replaces it; every try keeps its verdict,
    rule, the batches it regressed on and the history figures."""
    files = _folder(tmp_path)
    heal.record_try(files, 0, FORGOT, {"step": 12, "replay": {"lines": 3}})
    heal.record_try(files, 0, FORGOT, {"step": 12, "replay": {"lines": 3}})
    heal.record_try(files, 1, NOT_LEARNED, {"step": 12})
    tries = heal.tries(files)
    assert [(t["try"], t["verdict"], t["targets"]) for t in tries] == [(0, "refused", [3]), (1, "refused", [1])]
    assert tries[0]["history"]["regressed"][0]["set"] == "batch 000003" and tries[0]["replay"] == {"lines": 3}


def test_the_final_rejection_names_the_batch_it_conflicts_with(tmp_path):
    """After healing tries: the count, and the batch the last try regressed on most (or, when it
    failed on something else, the one the tries rehearsed most) unless the reason names it already."""
    files = _folder(tmp_path)
    heal.record_try(files, 0, FORGOT, {})
    heal.record_try(files, 1, FORGOT, {})
    assert heal.rejection_reason(files, "rejected: x", 0) == "rejected: x"
    named = heal.rejection_reason(files, "rejected: worse on its own new set", 2)
    assert "(after 2 healing tries)" in named and "conflicts with batch 000003" in named
    # Batch 3 regressed in every try: it is the conflict, whatever else the last try named first.
    assert "conflicts with batch 000003:" in heal.rejection_reason(files, "rejected: y", 2, (9, 3))
    already = heal.rejection_reason(files, "rejected: forgot batch 000003: worse", 2, (3,))
    assert "conflicts" not in already


def test_the_conflict_is_every_batch_each_try_regressed_on(tmp_path):
    """SmolLM2's chain: the contradiction of batch 2 regressed on 2 and 7 in every try (and on
    others in some); the reason names the strongest (7) and the rejection adds batch 2. With no
    batch common to every try, the last try's worst is named."""
    def forgot(*batches):  # the first forgotten most
        worse = {b: [2.0 - 0.2 * i] for i, b in enumerate(batches)}
        return judge({"sets": [LEARNED, memory({**{b: [0.0] for b in range(1, 12)}, **worse})]}, SETTINGS.gate)

    files = _folder(tmp_path)
    for n, bs in enumerate([(2, 7, 6, 5), (2, 7), (7, 2, 3)]):
        heal.record_try(files, n, forgot(*bs), {})
    last = forgot(7, 2, 3)
    reason = heal.rejection_reason(files, "rejected: " + last.rule, 2, last.targets)
    assert "it conflicts with batch 000002: rehearsing that batch's lines did not keep both" in reason
    assert "batch 000003" not in reason.split("(after 2 healing tries)")[1]
    other = _folder(tmp_path / "other")
    for n, bs in enumerate([(2,), (5,), (9,)]):
        heal.record_try(other, n, forgot(*bs), {})
    assert "it conflicts with batch 000009:" in heal.rejection_reason(other, "rejected: y", 2, (9,))
