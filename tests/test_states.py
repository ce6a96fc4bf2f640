"""Batch states and their transition table."""

import pytest

from trainerd.supervisor.ledger.states import FINAL_STATES, TRANSITIONS, BatchState, InvalidTransition, check_transition


def test_states_are_lowercase_str_enums():
    """Every state is a str whose value is its lowercase name (stored as-is in SQLite)."""
    for s in BatchState:
        assert isinstance(s, str) and s.value == s.name.lower() and str(s) == s.value


def test_final_states_have_no_exits():
    """done, failed and skipped are final: nothing leaves them."""
    for s in (BatchState.DONE, BatchState.FAILED, BatchState.SKIPPED):
        assert s in FINAL_STATES
        assert TRANSITIONS[s] == ()
        with pytest.raises(InvalidTransition, match="final state"):
            check_transition(s, BatchState.QUEUED)


def test_rejected_is_final_unless_promoted():
    """A rejected batch never runs again; only an operator's promote takes it to done."""
    assert BatchState.REJECTED in FINAL_STATES
    assert TRANSITIONS[BatchState.REJECTED] == (BatchState.DONE,)
    for s in (BatchState.QUEUED, BatchState.RUNNING, BatchState.FAILED):
        with pytest.raises(InvalidTransition, match="rejected -> "):
            check_transition(BatchState.REJECTED, s)


def test_invalid_transition_names_current_and_allowed():
    """A forbidden transition raises with the current state and the allowed ones in the message."""
    with pytest.raises(InvalidTransition) as e:
        check_transition(BatchState.QUEUED, BatchState.DONE)
    assert "queued -> done" in str(e.value) and "running, failed" in str(e.value)


def test_allowed_transitions_pass():
    """Every pair in the table is accepted, including from plain strings read from the ledger."""
    for cur, nexts in TRANSITIONS.items():
        for nxt in nexts:
            check_transition(cur.value, nxt.value)
