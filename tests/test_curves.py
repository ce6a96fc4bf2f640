"""TensorBoard curves: a real worker writes event files that show its loss per step (read back
through the TFRecord framing and tensorboardX's Event proto); a resumed run purges what the
interrupted one logged after its checkpoint and still ends bit-identical; the step axis continues
along the chain; the versions' gate figures are written once each; a failing writer goes quiet."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
from conftest import subprocess_env
from support.log import ListLog
from workerutil import adapter_bytes, make_batch, run_worker, sample_lines

from trainerd.core.contract import RootLayout
from trainerd.worker.curves import Curves, chain_offset, write_versions


def read_events(run: Path) -> list:
    """Every Event in a run folder, file by file in name order (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted(run.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append((f.name, ev))
            pos += 12 + n + 4
    return out


def scalars(run: Path, tag: str) -> dict[int, float]:
    """{step: value} for ``tag`` as TensorBoard shows it: a START session log at step P in a later
    file hides the earlier files' events at steps >= P."""
    events = read_events(run)
    shown: dict[int, float] = {}
    for name, ev in events:
        if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
            shown = {s: v for s, v in shown.items() if s < ev.step}
        for v in ev.summary.value:
            if v.tag == tag:
                shown[ev.step] = v.simple_value
    return shown


def test_a_worker_run_writes_loss_per_step_and_the_eval_figures(tmp_path, tiny_model_dir):
    """The event file holds train/loss for every step (the same values where the log has the step
    line), the learning rate, tokens/s and memory, and the final evaluation's candidate and
    champion losses."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(60), name="000007")
    rc, _, logs = run_worker(batch)
    assert rc == 0
    run = tmp_path / "root" / "tensorboard" / "000007"
    steps = {e["step"]: e["loss"] for e in logs if e["event"] == "step"}
    assert len(steps) >= 4
    meta = json.loads((batch / "final_adapter" / "trainerd.json").read_text())
    assert meta["chain_steps"] == meta["steps"] == max(steps)  # no init adapter: the chain is this batch
    loss = scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, max(steps) + 1))
    assert all(abs(loss[s] - steps[s]) < 1e-5 for s in steps)
    for tag in ("train/learning_rate", "train/tokens_per_s", "train/rss_bytes"):
        assert sorted(scalars(run, tag)) == sorted(loss), tag
    done = next(e for e in logs if e["event"] == "evaluation_done")
    assert done["sets"]
    for s in done["sets"]:
        kind, name = s["kind"], s["name"].replace(":", "_")
        for model in ("candidate", "champion"):  # simple_value is a float32
            assert scalars(run, f"eval/{kind}/{name}/{model}") == {max(steps): pytest.approx(s[model], rel=1e-6)}


def test_step_lines_carry_the_rate_each_step_used_and_thin_out_while_the_curves_keep_every_step(
        tmp_path, tiny_model_dir):
    """The ``step`` line's lr is the rate that step trained with (0 for the first step of a linear
    warm-up, the last step's small positive rate, never the scheduler's next one); an attempt logs
    its first 10 steps and its last at info (the others at debug, not on stdout), while TensorBoard
    still gets every step with the same learning rates."""
    lr, warmup = 1e-3, 2
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(200), name="000009",
                       train={"learning_rate": lr, "warmup_steps": warmup, "checkpoint_every_steps": 0})
    rc, result, logs = run_worker(batch)
    assert rc == 0
    n = result["total_steps"]
    assert n > 12, "enough steps to see the thinning"
    lines = {e["step"]: e for e in logs if e["event"] == "step"}
    assert sorted(lines) == [*range(1, 11), n]
    assert all(e["level"] == "info" and e["total_steps"] == n and isinstance(e["eta"], str) for e in lines.values())
    assert lines[1]["lr"] == 0.0 and lines[2]["lr"] == pytest.approx(lr / warmup) and lines[3]["lr"] == pytest.approx(lr)
    assert lines[n]["lr"] == pytest.approx(lr / (n - warmup)) and lines[n]["eta_s"] == 0
    shown = scalars(tmp_path / "root" / "tensorboard" / "000009", "train/learning_rate")
    assert sorted(shown) == list(range(1, n + 1))
    assert all(shown[s] == pytest.approx(lines[s]["lr"], rel=1e-6, abs=1e-12) for s in lines)


def test_resume_purges_the_lost_steps_and_stays_exact(tmp_path, tiny_model_dir):
    """Killed after step 5 (checkpoint at 4), then resumed: TensorBoard shows each step once, the
    resumed run's values from step 5 on; the adapter is bit-identical to an uninterrupted run's."""
    lines = sample_lines(60)
    ref = make_batch(tmp_path / "a", tiny_model_dir, lines, name="ref")
    assert run_worker(ref)[0] == 0
    batch = make_batch(tmp_path / "b", tiny_model_dir, lines, name="cut")
    rc, _, _ = run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))
    assert rc == -signal.SIGKILL
    rc, _, logs = run_worker(batch)
    assert rc == 0
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref / "final_adapter")
    run = tmp_path / "b" / "root" / "tensorboard" / "cut"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    resumed = {e["step"]: e["loss"] for e in logs if e["event"] == "step"}
    assert min(resumed) == 5
    shown = scalars(run, "train/loss")
    assert sorted(shown) == list(range(1, max(resumed) + 1))
    assert all(abs(shown[s] - resumed[s]) < 1e-5 for s in resumed)
    assert shown == scalars(tmp_path / "a" / "root" / "tensorboard" / "ref", "train/loss")


def test_chain_offset_follows_init_adapters(tmp_path):
    """The offset is the steps of every adapter up the chain (trainerd.json's steps and init_adapter)."""
    a, b, c = (tmp_path / n for n in "abc")
    for d, steps, parent in ((a, 10, None), (b, 7, a), (c, 5, b)):
        d.mkdir()
        (d / "trainerd.json").write_text(json.dumps({"steps": steps, "init_adapter": str(parent) if parent else None}))
    assert chain_offset(None) == 0
    assert chain_offset(a) == 10
    assert chain_offset(c) == 22
    (a / "trainerd.json").write_text(json.dumps({"steps": 10, "init_adapter": str(c)}))  # a hand-made cycle
    assert chain_offset(c) == 22
    # An adapter with the running total: read alone (its parents are not walked).
    (c / "trainerd.json").write_text(json.dumps({"steps": 5, "chain_steps": 1005, "init_adapter": str(b)}))
    shutil.rmtree(a)
    assert chain_offset(c) == 1005


def test_versions_gate_figures_are_written_once_each(tmp_path):
    """Each adapters/<n>/lineage.json becomes one event at step n in tensorboard/versions, all in one
    appended file; a second call writes nothing; a later version is appended to the same file; a
    version without a lineage (adopted by fsck) is passed over."""
    layout = RootLayout(tmp_path / "root")
    gate = {"sets": [{"name": "000001:holdout.jsonl", "kind": "new", "champion": 3.0, "candidate": 2.5,
                      "change": -0.5, "allowed": 0.02}]}

    def publish(n, kind, lineage=True):
        (layout.adapters / str(n)).mkdir(parents=True)
        if lineage:
            (layout.adapters / str(n) / "lineage.json").write_text(json.dumps(
                {"version": n, "kind": kind, "steps": 4 * n, "tokens": 100 * n, "gate": gate}))
        layout.current.unlink(missing_ok=True)
        os.symlink(str(n), layout.current)

    assert write_versions(layout) == []  # no version yet
    publish(1, "blessed")
    publish(2, "forced")
    publish(3, "blessed", lineage=False)
    assert write_versions(layout) == [1, 2]
    assert write_versions(layout) == []
    publish(4, "blessed")
    assert write_versions(layout) == [4]
    run = layout.tensorboard / "versions"
    assert [p.name for p in run.glob("events.out.tfevents.*")] == ["events.out.tfevents.9999999999.trainerd-versions"]
    assert scalars(run, "gate/new/000001_holdout.jsonl/candidate") == {1: 2.5, 2: 2.5, 4: 2.5}
    assert scalars(run, "version/blessed") == {1: 1.0, 2: 0.0, 4: 1.0}
    assert scalars(run, "version/steps") == {1: 4.0, 2: 8.0, 4: 16.0}


def test_a_failing_writer_logs_once_and_goes_quiet(tmp_path):
    """The run folder cannot be made (a file is in the way): one curves_failed, then silence."""
    (tmp_path / "tensorboard").write_text("in the way")
    log = ListLog()
    c = Curves(tmp_path / "tensorboard" / "000001", 0, log)
    import logging

    for msg in ({"event": "training_started", "step": 0}, {"event": "step", "step": 1, "loss": 2.0},
                {"event": "step", "step": 2, "loss": 1.9}):
        c.emit(logging.LogRecord("trainerd", logging.INFO, __file__, 1, msg, None, None))
    c.close()
    assert log.events() == ["curves_failed"]
