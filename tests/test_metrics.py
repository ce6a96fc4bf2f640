"""Prometheus metrics: the textfile parsed with prometheus_client's own parser and checked against
the ledger after a real daemon run (and again after a restart); the folder's group and mode; the
guard's actions counted once each; restart reasons kept to a bounded set of labels."""

from __future__ import annotations

import grp
import json
import os
import time
import sys
import stat
from pathlib import Path

import pytest
from support.log import ListLog
from workerutil import sample_lines

from trainerd.core.config import from_dict
from trainerd.core.contract import RootLayout
from trainerd.supervisor.ledger import Ledger
from trainerd.memguard import MemoryGuard
from trainerd.supervisor.metrics import Metrics, textfile_path
from trainerd.supervisor.prometheus import parse, restart_reason


def _value(m: dict, name: str, **labels: str) -> float | None:
    return m.get(name, {}).get(tuple(sorted(labels.items())))


def _read(path: Path) -> dict:
    return parse(path.read_text())


class _FakeDaemon:
    """What Metrics reads of a Supervisor: settings, ledger, layout, guard, running, paused, stopping."""

    def __init__(self, tmp: Path, **metrics: object):
        self.settings = from_dict({"root": str(tmp / "root"), "metrics": metrics})
        self.layout = RootLayout(self.settings.root)
        self.layout.make()
        self.ledger = Ledger(self.layout.db)
        self.guard = MemoryGuard(self.settings.memory)
        self.running = None
        self.stopping = False

    @property
    def paused(self) -> bool:
        return os.path.lexists(self.layout.stop)


def test_restart_reasons_are_a_bounded_set():
    """Stops keep their reason, crashes (free text) become ``crash``, unknown stop texts ``other``."""
    assert restart_reason("stopped", "memory") == "memory"
    assert restart_reason("stopped", "kernel_oom_kill") == "kernel_oom_kill"
    assert restart_reason("stopped", "an operator's own words") == "other"
    assert restart_reason("crashed", "exit 1: ValueError: boom") == "crash"
    assert restart_reason("lost", "supervisor_restart") == "lost"


def test_group_and_modes_of_the_folder_and_file(tmp_path):
    """With metrics.group the folder gets that group and 0750, the file that group and 0640."""
    if os.geteuid() != 0:
        pytest.skip("chgrp to another group needs root here")
    group = grp.getgrgid(1).gr_name  # "daemon" on Debian: any group other than ours
    d = _FakeDaemon(tmp_path, group=group)
    m = Metrics(ListLog())
    m.tick(1000.0, d)
    path = d.layout.root / "metrics" / "trainerd.prom"
    folder, f = os.stat(path.parent), os.stat(path)
    assert (folder.st_gid, stat.S_IMODE(folder.st_mode)) == (1, 0o750)
    assert (f.st_gid, stat.S_IMODE(f.st_mode)) == (1, 0o640)
    assert [p.name for p in path.parent.iterdir()] == ["trainerd.prom"]  # no temporary left
    d.ledger.close()


def test_unknown_group_warns_once_and_still_writes(tmp_path):
    """A group that does not exist is logged once (metrics_group_not_set) and the file is written anyway."""
    d = _FakeDaemon(tmp_path, group="no-such-group-here", interval_s=1)
    log = ListLog()
    m = Metrics(log)
    for t in (1000.0, 1001.5, 1003.0):
        m.tick(t, d)
    assert len(log.find("metrics_group_not_set")) == 1
    assert m.writes == 3
    assert _value(_read(d.layout.root / "metrics" / "trainerd.prom"), "trainerd_paused") == 0
    d.ledger.close()


def test_an_attempt_begun_and_ended_between_two_writes_still_gives_its_checkpoint(tmp_path):
    """Writes at most once a second, so a fast attempt can start and end between two: its last
    checkpoint still reaches the next write (the daemon tells the metrics as it reaps; an attempt
    noticed only by being seen running was missed). Each attempt is let end before the next tick."""
    import sys

    from test_supervisor import FAKE, drive, drop, make_settings
    from trainerd.supervisor.daemon import Supervisor

    s = Supervisor(make_settings(tmp_path, metrics={"interval_s": 3600}), worker_cmd=[sys.executable, str(FAKE)],
                   log=ListLog())
    s.open()
    try:
        path = textfile_path(s.settings)
        for i, name in enumerate(("a.jsonl", "b.jsonl"), 1):
            drop(s, name, ["stop:memory", "done"])
            drive(s, lambda i=i: s.ledger.counts().get("done") == i, settle=True)
            at = json.loads((s.layout.batch_dir(i) / "progress.json").read_text())["checkpoint"]["at"]
            s.metrics.tick(time.time(), s, force=True)
            assert _value(_read(path), "trainerd_last_checkpoint_timestamp_seconds") == at, i
    finally:
        s.close()


def test_written_on_change_and_on_interval_only(tmp_path):
    """Nothing new and not due: no write; a pause: written at once; then again after interval_s."""
    d = _FakeDaemon(tmp_path, interval_s=5)
    m = Metrics(ListLog())
    assert m.tick(1000.0, d) == 1005.0 and m.writes == 1
    m.tick(1001.0, d)
    assert m.writes == 1
    d.layout.stop.touch()
    m.tick(1002.0, d)
    path = d.layout.root / "metrics" / "trainerd.prom"
    got = _read(path)
    assert m.writes == 2 and _value(got, "trainerd_paused") == 1
    assert abs(_value(got, "trainerd_paused_since_timestamp_seconds") - os.stat(d.layout.stop).st_mtime) < 1e-3
    m.tick(1006.9, d)
    assert m.writes == 2
    m.tick(1007.0, d)
    assert m.writes == 3
    d.settings.metrics.textfile = ""  # a reload that turns metrics off
    assert m.tick(1020.0, d) == float("inf") and m.writes == 3
    d.ledger.close()


def test_guard_actions_are_counted_by_the_daemon_and_kept_in_the_ledger(tmp_path):
    """The daemon counts each guard action it carries out (here a scripted SIGTERM at the second
    poll) in the ledger's counters; the metrics file reports them, also from a new Metrics (a
    restarted daemon)."""
    from test_supervisor import FAKE, ScriptedGuard, drive, drop, make_settings
    from trainerd.supervisor.daemon import Supervisor

    s = Supervisor(make_settings(tmp_path), worker_cmd=[sys.executable, str(FAKE)], log=ListLog())
    s.open()
    try:
        s.guard = ScriptedGuard(s.guard, ["none", "term"])
        drop(s, "a.jsonl", ["wait", "done"])
        drive(s, lambda: s.ledger.batches() and s.ledger.batch(1).state == "done")
        assert [s.ledger.counter(f"guard_actions:{a}") for a in ("stop", "recycle", "term", "kill")] == [0, 0, 1, 0]
        Metrics(ListLog()).tick(time.time(), s)
        got = _read(s.layout.root / "metrics" / "trainerd.prom")
        assert [_value(got, "trainerd_guard_actions_total", action=a) for a in ("stop", "recycle", "term", "kill")] \
            == [0, 0, 1, 0]
    finally:
        s.close()


def _expected_from_ledger(root: Path) -> dict:
    led = Ledger.open_readonly(root / "state.db")
    try:
        counts = led.counts()
        tokens = steps = 0
        for b in led.batches():
            results = [a.result for a in led.attempts(b.id) if a.result]
            tokens += max((r.get("tokens") or 0 for r in results), default=0)
            steps += max((r.get("step") or 0 for r in results), default=0)
        latest = led.latest_version()
        return {"counts": counts, "tokens": tokens, "steps": steps, "publish_at": latest.created_at,
                "version": latest.n, "oom": led.counter("kernel_oom_kills")}
    finally:
        led.close()


@pytest.mark.slow
def test_metrics_match_the_ledger_after_a_real_run_and_a_restart(daemon_factory):
    """After a real run (one batch published, one bad file failed) every figure in the textfile
    agrees with the ledger and the current version's lineage; a pause shows at once; after a
    restart the counters carry on from the ledger, not from zero."""
    d = daemon_factory(metrics={"interval_s": 0.5}).start()
    path = d.root / "metrics" / "trainerd.prom"
    d.drop("good.jsonl", sample_lines(40))
    d.drop("bad.jsonl", ["not json"] * 5)
    d.wait_for(lambda: d.state_of("good.jsonl") == "done" and d.state_of("bad.jsonl") == "failed", 300)
    exp = _expected_from_ledger(d.root)
    assert exp["tokens"] > 0 and exp["steps"] > 0

    def settled() -> dict | None:
        got = _read(path) if path.exists() else {}
        return got if _value(got, "trainerd_batches", state="done") == 1 and \
            _value(got, "trainerd_worker_running") == 0 else None

    got = d.wait_for(settled, 30)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    for state, n in exp["counts"].items():
        assert _value(got, "trainerd_batches", state=state) == n
    assert _value(got, "trainerd_batches", state="running") == 0
    assert _value(got, "trainerd_trained_tokens_total") == exp["tokens"]
    assert _value(got, "trainerd_training_steps_total") == exp["steps"]
    assert _value(got, "trainerd_adapter_version") == exp["version"] == 1
    lineage = json.loads((d.root / "adapters" / "1" / "lineage.json").read_text())
    assert _value(got, "trainerd_adapter_info", base_model=lineage["base_model"]) == 1
    assert lineage["eval"], "the tiny run has a held-out set"
    new = next(e for e in lineage["eval"] if e["kind"] == "new")
    for model in ("candidate", "champion"):
        assert _value(got, "trainerd_current_eval_loss", set="new", kind="new", model=model) == new[model]
    assert _value(got, "trainerd_last_publish_timestamp_seconds") == exp["publish_at"]
    assert _value(got, "trainerd_kernel_oom_kills_total") == exp["oom"] == 0
    assert _value(got, "trainerd_last_checkpoint_duration_seconds") > 0
    # By name: two files dropped together may share an mtime (kernels before fine-grained
    # timestamps), and then the inbox's order is by name — bad.jsonl first.
    good = d.batch("good.jsonl")["id"]
    ck = json.loads((d.root / "batches" / f"{good:06d}" / "progress.json").read_text())["checkpoint"]
    assert _value(got, "trainerd_last_checkpoint_timestamp_seconds") == ck["at"]
    assert _value(got, "trainerd_memory_limit_bytes") > 0
    assert _value(got, "trainerd_paused") == 0 and _value(got, "trainerd_inbox_files") == 0
    assert next(iter(got["trainerd_build_info"]))
    assert _value(got, "trainerd_supervisor_process_resident_memory_bytes") > 0
    assert got.get("trainerd_worker_restarts_total", {}) == {}  # a bad file fails; nothing restarted

    d.root.joinpath(".stop").touch()
    d.wait_for(lambda: _value(_read(path), "trainerd_paused") == 1, 10)
    assert d.terminate() == 0
    assert _value(_read(path), "trainerd_worker_running") == 0
    path.unlink()
    d.start()
    after = d.wait_for(lambda: _read(path) if path.exists() else None, 30)
    for name in ("trainerd_trained_tokens_total", "trainerd_training_steps_total", "trainerd_adapter_version",
                 "trainerd_last_publish_timestamp_seconds", "trainerd_last_checkpoint_timestamp_seconds"):
        assert _value(after, name) == _value(got, name), name
    assert _value(after, "trainerd_paused") == 1


def _series(path: Path) -> set[tuple[str, tuple]]:
    """Every (metric, labels) in the textfile, less the supervisor's own process figures."""
    return {(name, labels) for name, by in _read(path).items() if not name.startswith("trainerd_supervisor_process")
            for labels in by}


def test_the_series_stay_the_same_across_50_versions(tmp_path):
    """50 versions published through real ledger transitions, each lineage.json holding one more
    earlier batch's set than the last (and a standing suite), the first batch restarted once: from
    the second version on the textfile holds the same series every time; the earlier sets are one
    averaged series, not one per batch, and the current version is a gauge, not a label."""
    from trainerd.supervisor.ledger import AttemptRecord

    d = _FakeDaemon(tmp_path)
    m = Metrics(ListLog())
    path = d.layout.root / "metrics" / "trainerd.prom"
    led, now, seen = d.ledger, time.time(), []
    for i in range(1, 51):
        bid = led.begin_claim(f"b{i}.jsonl", 10, now).id
        led.finish_claim(bid, f"{i:064x}", 10, now)
        if i == 1:
            led.start_attempt(bid, now, None)
            led.requeue(bid, now, reason="memory", attempt=AttemptRecord(1, "stopped", "memory", result={"tokens": 5}))
        n = led.start_attempt(bid, now, None).attempts
        b = led.decide_done(bid, d.layout.adapter_dir, now, attempt=AttemptRecord(
            n, "done", "done", result={"tokens": 100, "step": 10}))
        led.finish(b, now)
        sets = [{"name": f"{bid:06d}:holdout.jsonl", "kind": "new", "used": 2, "candidate": 1.0, "champion": 1.1},
                {"name": "suite facts.jsonl", "kind": "suite", "used": 4, "candidate": 1.5, "champion": 1.5}]
        sets += [{"name": f"batch {k:06d}", "kind": "earlier", "used": 3, "candidate": 2.0 + k / 1000,
                  "champion": 2.0} for k in range(1, i)]
        folder = d.layout.adapter_dir(b.adapter_version)
        folder.mkdir(parents=True)
        (folder / "lineage.json").write_text(json.dumps({"version": b.adapter_version, "eval": sets,
                                                         "base_model": "tiny"}))
        d.layout.current.unlink(missing_ok=True)
        os.symlink(str(b.adapter_version), d.layout.current)
        m.tick(now + i, d)
        seen.append(_series(path))
    got = _read(path)
    d.ledger.close()
    assert all(series == seen[1] for series in seen[1:]), [len(x) for x in seen]
    assert len(seen[0]) == len(seen[1]) - 2  # version 1 has no earlier sets: their 2 series come with version 2
    assert _value(got, "trainerd_adapter_version") == 50
    assert _value(got, "trainerd_adapter_info", base_model="tiny") == 1
    assert _value(got, "trainerd_current_eval_loss", set="earlier", kind="earlier", model="candidate") == \
        pytest.approx(sum(2.0 + k / 1000 for k in range(1, 50)) / 49)
    assert _value(got, "trainerd_current_eval_loss", set="suite facts.jsonl", kind="suite", model="champion") == 1.5
    assert _value(got, "trainerd_worker_restarts_total", reason="memory") == 1
    assert _value(got, "trainerd_trained_tokens_total") == 5000 and _value(got, "trainerd_batches", state="done") == 50
