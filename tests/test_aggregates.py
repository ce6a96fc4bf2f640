"""The ledger's running totals (trainerd/supervisor/ledger/aggregates.py): after any sequence of real ledger writes
they equal what a full scan of the rows says; an older ledger gets them filled once at its schema
step; pruning attempt rows never lowers the trained tokens."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainerd.supervisor.ledger import aggregates
from trainerd.core.contract import RootLayout
from trainerd.supervisor.ledger import AttemptRecord, Ledger
from trainerd.supervisor.ledger.states import BatchState


def _scan(led: Ledger) -> dict[str, int]:
    """Every total as a full scan of the rows computes it (what the triggers must keep)."""
    out = aggregates.row_counts(led.db)
    best: dict[int, tuple[int, int]] = {}
    for a in led.db.execute("SELECT batch_id, result_json, outcome, reason FROM attempts"):
        if a["result_json"]:
            r = json.loads(a["result_json"])
            t, s = best.get(a["batch_id"], (0, 0))
            best[a["batch_id"]] = (max(t, r.get("tokens") or 0), max(s, r.get("step") or 0))
        if a["outcome"] in ("stopped", "crashed", "lost"):
            key = "restarts:" + a["outcome"] + (f":{a['reason'] or ''}" if a["outcome"] == "stopped" else "")
            out[key] = out.get(key, 0) + 1
    out["trained_tokens"] = sum(t for t, _ in best.values())
    out["training_steps"] = sum(s for _, s in best.values())
    return {k: v for k, v in out.items() if v}


OPS = st.lists(st.tuples(st.sampled_from(["claim", "start", "stop", "crash", "publish", "fail", "restore",
                                          "remove", "rollback", "reject", "promote"]), st.integers(0, 50), st.integers(1, 400)),
               max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_totals_equal_a_scan_after_any_sequence_of_writes(tmp_path_factory, ops):
    """Claims, starts, stops with cumulative tokens, crashes, publishes (blessed or ungated),
    refusals, a promote, failures, a manifest put back, a version marked removed, a rollback: the
    totals (the decisions' among them) always equal the rows' full scan."""
    layout = RootLayout(tmp_path_factory.mktemp("agg"))
    led = Ledger(layout.root / "state.db")
    now = time.time()
    try:
        for op, pick, tokens in ops:
            live = [b for b in led.batches() if b.finished_at is None]
            b = live[pick % len(live)] if live else None
            if op == "claim" or b is None:
                bid = led.begin_claim(f"f{pick}.jsonl", 1, now).id
                led.finish_claim(bid, f"{pick}-{bid}", 1, now)
            elif op == "start" and b.state is BatchState.QUEUED:
                led.start_attempt(b.id, now, None)
            elif b.state is BatchState.RUNNING and op in ("stop", "crash"):
                outcome, why = ("stopped", "memory") if op == "stop" else ("crashed", "exit 1")
                led.requeue(b.id, now, reason=why, attempt=AttemptRecord(
                    b.attempts, outcome, why, result={"tokens": tokens, "step": tokens // 10} if op == "stop" else None))
            elif b.state is BatchState.RUNNING and op == "publish":
                d = led.decide_done(b.id, layout.adapter_dir, now, attempt=AttemptRecord(
                    b.attempts, "done", "done", result={"tokens": tokens, "step": tokens // 10}),
                    decision="ungated" if tokens % 2 else "blessed")
                led.finish(d, now)
            elif b.state is BatchState.RUNNING and op == "reject":
                led.finish(led.decide_rejected(b.id, "worse", "{}", now), now)
            elif op == "promote" and (r := led.batches(BatchState.REJECTED)) and r[0].adapter_version is None:
                led.decide_promote(r[0].id, layout.adapter_dir, now)
            elif op == "fail" and b.state in (BatchState.QUEUED, BatchState.RUNNING):
                led.finish(led.decide_failed(b.id, b.state, "bad", now), now)
            elif op == "restore":
                row = {**led.batch(b.id).__dict__, "state": "failed", "finished_at": now}
                led.restore_batch(row)
            elif op == "remove" and (v := led.latest_version()) is not None:
                led.mark_removed([v.n], now)
            elif op == "rollback" and (v := led.latest_version()) is not None:
                led.add_rollback(v.n, layout.adapter_dir, now)
            assert led.totals() == _scan(led)
    finally:
        led.close()


def test_an_older_ledger_gets_its_totals_once_at_the_schema_step(tmp_path):
    """A schema-3 ledger with batches, attempts and versions opens with totals equal to the scan."""
    led = Ledger(tmp_path / "state.db")
    now = time.time()
    for i in range(3):
        bid = led.begin_claim(f"{i}.jsonl", 1, now).id
        led.finish_claim(bid, str(i), 1, now)
        led.start_attempt(bid, now, None)
        led.requeue(bid, now, reason="memory", attempt=AttemptRecord(1, "stopped", "memory", result={"tokens": 5}))
        led.start_attempt(bid, now, None)
        led.finish(led.decide_done(bid, lambda n: tmp_path / str(n), now,
                                   attempt=AttemptRecord(2, "done", "done", result={"tokens": 9, "step": 2})), now)
    expected = _scan(led)
    for t in [r[0] for r in led.db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]:
        led.db.execute(f"DROP TRIGGER {t}")
    # Back to schema 3: without the totals, their index and the other columns schema 4 adds.
    led.db.executescript("DROP TABLE aggregates; DROP INDEX batches_finished; DROP INDEX attempts_ended;"
                         " ALTER TABLE attempts DROP COLUMN account_json;"
                         + "".join(f" ALTER TABLE batches DROP COLUMN {c};" for c in
                                   ("heals", "faults_survived", "crash_streak", "reached_step", "goodput_json",
                                    "base_weights"))
                         + " PRAGMA user_version=3;")
    led.close()
    led = Ledger(tmp_path / "state.db")
    try:
        assert led.schema_version() == 4
        assert led.totals() == expected
        assert expected["trained_tokens"] == 27 and expected["restarts:stopped:memory"] == 3
        assert led.counts() == {"done": 3}
    finally:
        led.close()


def test_pruned_attempt_rows_keep_the_totals_and_counts_can_be_recounted(tmp_path):
    """Deleting old attempt rows leaves tokens and restarts as they were (history); a count damaged
    by hand is put right by recount_rows (fsck --repair)."""
    led = Ledger(tmp_path / "state.db")
    now = time.time()
    bid = led.begin_claim("a.jsonl", 1, now).id
    led.finish_claim(bid, "a", 1, now)
    led.start_attempt(bid, now, None)
    led.finish(led.decide_done(bid, lambda n: tmp_path / str(n), now,
                               attempt=AttemptRecord(1, "done", "done", result={"tokens": 40, "step": 4})), now)
    with led.transaction() as db:
        db.execute("DELETE FROM attempts")
        db.execute("UPDATE aggregates SET value = 7 WHERE name = 'batches:done'")
    assert led.totals("trained_tokens") == {"": 40}
    assert led.counts() == {"done": 7}
    with led.transaction() as db:
        aggregates.recount_rows(db)
    assert led.counts() == {"done": 1} and led.totals("trained_tokens") == {"": 40}
    led.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(0, 5),
                          st.one_of(st.none(), st.floats(0, 1e4, allow_nan=False))), min_size=1, max_size=12))
def test_fault_and_goodput_totals_follow_every_rewrite_of_a_batch(tmp_path_factory, writes):
    """Crashes, faults survived and a batch's goodput account, rewritten in any order: the running
    totals equal the sum over the rows (status and the metrics read them instead of a scan)."""
    led = Ledger(tmp_path_factory.mktemp("agg") / "state.db")
    try:
        now = time.time()
        ids = []
        for i in range(3):
            b = led.begin_claim(f"{i}.jsonl", 1, now)
            led.finish_claim(b.id, str(i), 1, now)
            ids.append(b.id)
        for which, crashes, survived, useful in writes:
            account = None if useful is None else json.dumps(
                {k: useful * (j + 1) for j, k in enumerate(aggregates.GOODPUT_FIGURES)})
            with led.transaction() as db:
                db.execute("UPDATE batches SET crashes=?, faults_survived=?, goodput_json=? WHERE id=?",
                           (crashes, min(survived, crashes), account, ids[which]))
        got = led.goodput_totals()
        rows = led.db.execute("SELECT crashes, faults_survived, goodput_json FROM batches").fetchall()
        assert got["crashes"] == sum(r[0] for r in rows) and got["faults_survived"] == sum(r[1] for r in rows)
        for j, k in enumerate(aggregates.GOODPUT_FIGURES):
            want = sum(json.loads(r[2])[k] for r in rows if r[2])
            assert abs(got[k] - want) <= 0.001 * len(writes) + 1e-9, (k, got[k], want)
    finally:
        led.close()
