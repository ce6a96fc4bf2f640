"""Priority lanes (inbox/high/, inbox/low/, `trainerd submit --priority`) through the supervisor's loop
with fake workers: higher lanes start first, a started batch is never overtaken, the inbox rules hold
in every lane, and `trainerd status` shows the lane."""

from __future__ import annotations

import json
import os
from pathlib import Path

import test_supervisor
from test_supervisor import drive
from trainerd.cli import main
from trainerd.supervisor.views.status import collect_status, render_status
from trainerd.supervisor.daemon import Supervisor

sup = test_supervisor.sup  # the supervisor fixture with fake workers, shared


def drop(sup: Supervisor, lane: str, name: str, plan: list[str]) -> Path:
    folder = {"high": sup.layout.inbox_high, "low": sup.layout.inbox_low}.get(lane, sup.layout.inbox)
    tmp = folder / f".{name}.part"
    tmp.write_text(json.dumps({"plan": plan, "salt": lane + name}) + "\n")
    os.rename(tmp, folder / name)
    return folder / name


def started_order(sup: Supervisor) -> list[str]:
    return [sup.ledger.batch(v.batch_id).name for v in sup.ledger.adapter_versions()]


def test_lanes_are_made_group_writable_like_the_inbox(sup):
    """inbox/high and inbox/low exist after start, writable by the group like the inbox."""
    for lane in (sup.layout.inbox_high, sup.layout.inbox_low):
        assert lane.is_dir() and os.stat(lane).st_mode & 0o070 == 0o070


def test_higher_lane_starts_first_same_lane_keeps_arrival_order(sup):
    """Queued while paused: high files start before normal ones before low ones, each lane in order."""
    sup.layout.stop.touch()
    drop(sup, "low", "l1.jsonl", ["done"])
    drop(sup, "normal", "n1.jsonl", ["done"])
    drop(sup, "high", "h1.jsonl", ["done"])
    drop(sup, "normal", "n2.jsonl", ["done"])
    drop(sup, "high", "h2.jsonl", ["done"])
    drive(sup, lambda: len(sup.ledger.batches()) == 5 and all(b.state == "queued" for b in sup.ledger.batches()))
    st = collect_status(sup.layout.root)
    assert [(q["file"], q["lane"]) for q in st["queue"]] == [
        ("h1.jsonl", "high"), ("h2.jsonl", "high"), ("n1.jsonl", "normal"), ("n2.jsonl", "normal"),
        ("l1.jsonl", "low")]
    assert "h1.jsonl [high]" in render_status(st) and "l1.jsonl [low]" in render_status(st)
    os.unlink(sup.layout.stop)
    drive(sup, lambda: all(b.state == "done" for b in sup.ledger.batches()), timeout=30)
    assert started_order(sup) == ["h1.jsonl", "h2.jsonl", "n1.jsonl", "n2.jsonl", "l1.jsonl"]
    assert sorted(p.name for p in sup.layout.done.iterdir()) == ["h1.jsonl", "h2.jsonl", "l1.jsonl", "n1.jsonl",
                                                                 "n2.jsonl"]


def test_a_started_batch_is_never_overtaken(sup):
    """A low batch paused mid-way (it has an attempt) resumes before a high one that came meanwhile."""
    drop(sup, "low", "slow.jsonl", ["wait", "done"])
    drive(sup, lambda: sup.running is not None)
    drop(sup, "high", "urgent.jsonl", ["done"])
    drive(sup, lambda: any(b.name == "urgent.jsonl" and b.state == "queued" for b in sup.ledger.batches()))
    sup.layout.stop.touch()  # the worker checkpoints and exits 75 (paused): requeued with attempts 1
    drive(sup, lambda: sup.running is None and sup.ledger.batch(1).state == "queued")
    assert sup.ledger.next_queued().name == "slow.jsonl"
    os.unlink(sup.layout.stop)
    drive(sup, lambda: all(b.state == "done" for b in sup.ledger.batches()), timeout=30)
    assert started_order(sup) == ["slow.jsonl", "urgent.jsonl"]


def test_inbox_rules_hold_in_the_lanes(sup):
    """A symlink in inbox/high and a FIFO in inbox/low go to failed/ unread; dot-files stay."""
    target = sup.layout.root / "secret.jsonl"
    target.write_text('{"text": "never read"}\n')
    os.symlink(target, sup.layout.inbox_high / "link.jsonl")
    os.mkfifo(sup.layout.inbox_low / "pipe.jsonl.gz")
    (sup.layout.inbox_low / ".hidden.jsonl").write_text("{}\n")
    drive(sup, lambda: (sup.layout.failed / "link.jsonl.error.json").exists()
          and (sup.layout.failed / "pipe.jsonl.gz.error.json").exists())
    assert os.path.islink(sup.layout.failed / "link.jsonl") and target.exists()
    assert json.loads((sup.layout.failed / "pipe.jsonl.gz.error.json").read_text())["kind"] == "FIFO"
    assert (sup.layout.inbox_low / ".hidden.jsonl").exists() and sup.ledger.batches() == []


def test_submit_priority_places_into_the_lane(sup, tmp_path, capsys):
    """`trainerd submit --priority high` puts the file into inbox/high; low into inbox/low."""
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "hello"}\n')
    assert main(["submit", "--root", str(sup.layout.root), "--priority", "high", str(f)]) == 0
    assert (sup.layout.inbox_high / "x.jsonl").read_text() == f.read_text()
    assert main(["submit", "--root", str(sup.layout.root), "--priority", "low", str(f)]) == 0
    assert (sup.layout.inbox_low / "x.jsonl").exists()
    drive(sup, lambda: len(sup.ledger.batches()) == 2)
    assert sorted((b.name, b.priority) for b in sup.ledger.batches()) == [("x.jsonl", -1), ("x.jsonl", 1)]
