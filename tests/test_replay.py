"""Replay: what a batch draws from the store, that the store stays bounded and uniform, that a
damaged store file is never trained, and that training with replay is still exact on resume."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from support.config import config_dict
from support.log import ListLog
from trainerd.core.config import from_dict
from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.lines import content_hash, iter_lines, parse_line
from trainerd.core.replay import Entry, Store, compact, content_fraction
from trainerd.worker.split import first_split, load_split
from workerutil import adapter_bytes, clean_runs, finish, make_batch, run_worker, sample_lines, start_worker, \
    wait_for_event, write_settings


def _line(i: int, word: str) -> str:
    return json.dumps({"prompt": f"Q: what color is item {i}?", "completion": f" {word}"})


def _hashes(path: Path) -> list[str]:
    return [content_hash(parse_line(r)[0]) for r in iter_lines(open(path, "rb"), 1 << 20)]


def put(root: Path, batch_id: int, lines: list[str]) -> None:
    """A published batch's lines, into the store as the supervisor puts them there."""
    store = Store.open(RootLayout(root).replay)
    root.mkdir(parents=True, exist_ok=True)
    contrib = root / f"contrib-{batch_id}.jsonl"
    data = "".join(x + "\n" for x in lines).encode()
    contrib.write_bytes(data)
    store.add(batch_id, contrib, Entry(len(lines), len(data), hashlib.sha256(data).hexdigest()))


def _batch(root: Path, name: str, lines: list[str], evalsets: list[dict] | None = None) -> BatchFiles:
    files = BatchFiles(root / "batches" / name)
    files.dir.mkdir(parents=True)
    files.data.write_text("".join(x + "\n" for x in lines))
    files.evalsets.write_text(json.dumps({"sets": evalsets or []}))
    return files


def _settings(root: Path, **replay):
    return from_dict({"root": str(root), "replay": {"fraction": 0.2, **replay}})


def test_draw_comes_only_from_earlier_training_lines_and_is_the_same_every_time(tmp_path):
    """The drawn lines are store lines, never an evaluation content, never one of the batch's own
    contents; 20% of its own training lines; the same lines on a second run of the same batch."""
    root = tmp_path / "root"
    evalset = tmp_path / "earlier-set.jsonl"
    evalset.write_text(_line(7, "green") + "\n")
    put(root, 1, [_line(i, "red") for i in range(30)])
    put(root, 3, [_line(i, "green") for i in range(10)] + [_line(55, "blue")])
    own = [_line(i, "blue") for i in range(50, 100)]
    sets = [{"name": "batch 000003", "kind": "earlier", "path": str(evalset), "sha256": None, "batch": 3}]
    a = _batch(root, "000009", own, sets)
    first_split(a, _settings(root), ListLog())
    split = load_split(a)
    drawn = _hashes(a.replay)
    store_lines = set(_hashes(root / "replay" / "000001.jsonl") + _hashes(root / "replay" / "000003.jsonl"))
    assert len(drawn) == split.replay_lines == round(0.2 * split.own_lines) == 9
    assert set(drawn) <= store_lines
    assert content_hash(parse_line(next(iter_lines(open(evalset, "rb"), 1 << 20)))[0]) not in drawn
    assert not set(drawn) & set(_hashes(a.data))
    assert sum(split.replay["sources"].values()) == 9
    again = _batch(tmp_path / "other" / "root", "000009", own, sets)
    (tmp_path / "other" / "root" / "replay").symlink_to(root / "replay")
    first_split(again, _settings(tmp_path / "other" / "root"), ListLog())
    assert again.replay.read_bytes() == a.replay.read_bytes()


def test_a_damaged_store_file_is_skipped_with_a_warning(tmp_path):
    """A store file whose bytes no longer match its sha256 gives nothing to the draw, and says so."""
    root = tmp_path / "root"
    put(root, 1, [_line(i, "red") for i in range(30)])
    put(root, 2, [_line(i, "green") for i in range(30)])
    damaged = root / "replay" / "000001.jsonl"
    damaged.write_bytes(damaged.read_bytes().replace(b"red", b"rot"))
    files = _batch(root, "000005", [_line(i, "blue") for i in range(50, 100)])
    log = ListLog()
    first_split(files, _settings(root), log)
    assert log.find("replay_file_damaged")[0]["path"] == str(damaged)
    assert load_split(files).replay["sources"] == {"000002": 9}
    assert not set(_hashes(files.replay)) & {content_hash(parse_line(r)[0]) for r in iter_lines(open(damaged, "rb"), 1 << 20)}


def test_the_store_stays_within_its_bound_as_a_uniform_reservoir(tmp_path):
    """Twelve batches of ~200 KB under a 1 MiB bound: after compaction the store is within it, every
    batch is thinned alike (none dropped), each kept line is under the threshold, the index matches."""
    root = tmp_path / "root"
    for b in range(1, 13):
        put(root, b, [json.dumps({"text": f"batch {b} line {i} " + "x" * 150}) for i in range(1200)])
    compact(root, 1 << 20, ListLog())
    store = Store.open(root / "replay")
    assert store.bytes <= 1 << 20 and store.threshold < 1.0
    kept = [store.files[b].lines / 1200 for b in range(1, 13)]
    assert all(k > 0 for k in kept)
    # The same chance for every batch, old or new: each within 4 binomial standard deviations.
    t = store.threshold
    assert all(abs(k - t) < 4 * (t * (1 - t) / 1200) ** 0.5 for k in kept), (t, kept)
    for b, e in store.files.items():
        data = store.path(b).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e.sha256 and len(data) == e.bytes
        assert all(content_fraction(h) < store.threshold for h in _hashes(store.path(b)))


def test_abandoned_batches_leave_at_compaction(tmp_path):
    """After a rollback the later batches' files are marked abandoned, never drawn, and removed."""
    root = tmp_path / "root"
    put(root, 1, [_line(i, "red") for i in range(30)])
    put(root, 2, [_line(i, "blue") for i in range(30)])
    store = Store.open(root / "replay")
    store.abandon([2])
    files = _batch(root, "000003", [_line(i, "green") for i in range(50, 100)])
    first_split(files, _settings(root), ListLog())
    assert load_split(files).replay["sources"] == {"000001": 9}
    assert Store.open(root / "replay").over(1 << 30)
    compact(root, 1 << 30, ListLog())
    assert not (root / "replay" / "000002.jsonl").exists() and 2 not in Store.open(root / "replay").files


# --- exactness with replay on, through the real worker ----------------------------------------


@pytest.fixture(scope="module")
def replay_reference(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("replay-ref")
    batch = _worker_batch(tmp, tiny_model_dir)
    rc, result, logs = run_worker(batch)
    assert rc == 0, result
    assert result["replay"]["lines"] > 0 and result["replay"]["tokens"] > 0
    return batch, result


def _worker_batch(tmp: Path, model: Path, **train) -> Path:
    put(tmp / "root", 1, sample_lines(90, start=5000))
    return make_batch(tmp, model, sample_lines(120), replay={"fraction": 0.3}, model={"dtype": "float32"},
                      train={"micro_batch_size": 2, "grad_accum_steps": 2, **train})


def test_sigkill_and_stops_then_resume_with_replay_are_bit_identical(tmp_path, tiny_model_dir, replay_reference):
    """With replayed lines interleaved: SIGKILL after a checkpoint, and stops at arbitrary points
    (mid-step too), each resumed, end with the uninterrupted run's adapter, bit for bit."""
    ref_batch, ref = replay_reference
    batch = _worker_batch(tmp_path / "kill", tiny_model_dir)
    assert run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))[0] == -signal.SIGKILL
    rc, result, _ = run_worker(batch)
    assert rc == 0 and result["replay"] == ref["replay"]
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")
    batch = _worker_batch(tmp_path / "stops", tiny_model_dir)
    for min_step in (3, 7):
        proc = start_worker(batch)
        wait_for_event(proc, "step", min_step=min_step)
        (batch / ".stop").write_text("memory")
        assert finish(proc) in (0, 75)
        clean_runs(batch)
    assert run_worker(batch)[0] == 0
    assert adapter_bytes(batch / "final_adapter") == adapter_bytes(ref_batch / "final_adapter")


def test_memory_back_off_with_replay_keeps_cursor_and_schedule(tmp_path, tiny_model_dir, replay_reference):
    """Resumed at half the micro-batch and double accumulation: the same cursor (replay position
    included), the same schedule, the same loss within the back-off test's tolerance."""
    _, ref = replay_reference
    batch = _worker_batch(tmp_path, tiny_model_dir)
    assert run_worker(batch, env=subprocess_env(TRAINERD_FAULT="crash_at_step:5"))[0] == -signal.SIGKILL
    state = json.loads((batch / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["cursor"]["r_count"] > 0
    write_settings(batch, tmp_path / "root", tiny_model_dir, replay={"fraction": 0.3}, model={"dtype": "float32"},
                   train={"micro_batch_size": 1, "grad_accum_steps": 4})
    rc, result, logs = run_worker(batch)
    assert rc == 0
    started = next(x for x in logs if x["event"] == "training_started")
    assert started["cursor"] == state["cursor"] and result["total_steps"] == ref["total_steps"]
    assert result["last_loss"] == pytest.approx(ref["last_loss"], rel=1e-4)


# --- the daemon compacts between workers -------------------------------------------------------


def test_the_daemon_compacts_an_oversized_store_before_the_next_worker(tmp_path):
    """A store past replay.max_bytes is compacted by a maintenance child before the next worker
    starts (never beside one); the batch then trains as usual."""
    from test_supervisor import FAKE, drive, drop, state
    from trainerd.supervisor.daemon import Supervisor

    root = tmp_path / "root"
    for b in range(1, 4):
        put(root, b, [json.dumps({"text": f"b{b} l{i} " + "y" * 400}) for i in range(1200)])
    settings = from_dict(config_dict(root, tmp_path / "no-model", replay={"max_bytes": "1MiB"}))
    log = ListLog()
    s = Supervisor(settings, worker_cmd=[sys.executable, str(FAKE)], log=log)
    s.open()
    try:
        drop(s, "a.jsonl", ["done"])
        drive(s, lambda: s.ledger.batches() and state(s).state == "done", timeout=60)
        started = log.events().index("replay_compaction_started")
        assert log.events().index("replay_compaction_ended") < log.events().index("worker_started") and started >= 0
        assert Store.open(root / "replay").bytes <= 1 << 20
    finally:
        s.close()


# --- incremental compaction ---------------------------------------------------------------------


def _kept(root: Path) -> dict[int, list[str]]:
    store = Store.open(root / "replay")
    return {b: _hashes(store.path(b)) for b in store.files}


def test_compaction_in_slices_ends_where_one_pass_does_and_is_consistent_between_slices(tmp_path):
    """Slices of (almost) no time each visit one file and stop: between two slices every indexed file
    matches its sha256 and a draw never takes a line above the threshold; when no file is left the
    store holds exactly what one uninterrupted compaction keeps."""
    lines = {b: [json.dumps({"text": f"b{b} l{i} " + "z" * 200}) for i in range(400)] for b in range(1, 9)}
    for r in ("sliced", "whole"):
        for b, ls in lines.items():
            put(tmp_path / r, b, ls)
    assert compact(tmp_path / "whole", 300_000, ListLog())
    slices = 0
    while not compact(tmp_path / "sliced", 300_000, ListLog(), slice_s=0.0):
        slices += 1
        store = Store.open(tmp_path / "sliced" / "replay")
        for b, e in store.files.items():
            assert hashlib.sha256(store.path(b).read_bytes()).hexdigest() == e.sha256
        files = _batch(tmp_path / "sliced", f"{900 + slices:06d}", [_line(i, "blue") for i in range(50, 100)])
        first_split(files, _settings(tmp_path / "sliced"), ListLog())
        assert all(content_fraction(h) < store.threshold for h in _hashes(files.replay))
    assert slices >= 6
    assert _kept(tmp_path / "sliced") == _kept(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "sliced" / "replay").glob("*.jsonl")) == \
        sorted(Store.open(tmp_path / "sliced" / "replay").path(b).name for b in lines)


def test_a_crashed_slice_leaves_whole_files_and_its_orphan_is_swept(tmp_path):
    """A thinned file written but never indexed (the slice died before its save) is removed by the
    next slice; the indexed file it would have replaced is still whole and still drawn from."""
    root = tmp_path / "root"
    put(root, 1, [json.dumps({"text": f"l{i} " + "q" * 300}) for i in range(300)])
    orphan = root / "replay" / "000001-r1.jsonl"
    orphan.write_bytes(b'{"text": "half written"}\n')
    store = Store.open(root / "replay")
    assert hashlib.sha256(store.path(1).read_bytes()).hexdigest() == store.files[1].sha256
    compact(root, 1 << 30, ListLog())
    assert not orphan.exists() and store.path(1).exists()


def test_the_supervisors_add_during_a_slice_is_kept(tmp_path):
    """The index is changed under its lock from what is on disk: an entry the supervisor adds
    while a slice works survives the slice's save."""
    root = tmp_path / "root"
    for b in (1, 2):
        put(root, b, [json.dumps({"text": f"b{b} l{i} " + "w" * 300}) for i in range(300)])
    from trainerd.core import replay

    real = replay._thin

    def thin_and_meanwhile_publish(*args, **kw):
        if 3 not in Store.open(root / "replay").files:
            put(root, 3, [_line(i, "late") for i in range(10)])
        return real(*args, **kw)

    replay._thin = thin_and_meanwhile_publish
    try:
        compact(root, 100_000, ListLog())
    finally:
        replay._thin = real
    assert set(Store.open(root / "replay").files) == {1, 2, 3}
