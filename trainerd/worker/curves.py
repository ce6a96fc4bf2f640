"""Training curves for TensorBoard: event files under ``root/tensorboard/`` (worker side).

One run per batch (``tensorboard/<batch>/``), fed by what the worker already logs: a
:class:`logging.Handler` on trainerd's logger sees each structured event (structlog hands the
event dict to the stdlib record; the steps the log thins out arrive at debug) and turns some into
scalars, so the training loop itself has no curve code and nothing here touches the model, the
RNG or the data cursor (exact resume stays exact):

    step             train/loss, train/learning_rate, train/tokens_per_s, train/rss_bytes
    eval_step        eval/new_set_loss                      (eval.every_steps)
    evaluation_done  eval/<kind>/<set>/candidate|champion   (the gate's inputs, at the last step)

The step axis continues across the chain: a batch's step k is ``offset + k``, where ``offset``
is the steps of every adapter its init adapter descends from: the running total ``chain_steps``
in the init adapter's ``trainerd.json`` (each adapter writes its own, its offset + its steps), so
one file is read whatever the chain's length (an adapter from before the total existed: its
``init_adapter`` chain is walked instead). A resumed attempt writes a purge
marker at the step it resumes from, so TensorBoard hides what an interrupted attempt logged
after its last checkpoint. The file is flushed at every checkpoint (and every 10 s), so what a
SIGKILL loses of the curves is what it loses of the training.

Each published version's gate figures (from ``adapters/<n>/lineage.json``: per set champion,
candidate, change and allowed; ``version/blessed``) go to the run ``tensorboard/versions/`` at
step n, appended to its one event file (under a lock); ``.written.json`` there says up to which
version, so a worker looks only at the versions published since (never lists ``adapters/``).
The supervisor, which decides, stays free of tensorboardX (it imports torch when present), so
the next worker to start writes them, or ``python -m trainerd.worker.curves ROOT`` does at once.

The writer is tensorboardX's own record writer used synchronously (no queue, no thread: its
SummaryWriter's queue would block training once its writer thread died, e.g. on a full disk).
Any failure is logged once (``curves_failed``) and the curves go quiet; training never notices.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.fsutil import atomic_write_json, read_json_or_none
from trainerd.core.logs import LOGGER_NAME

__all__ = ["Curves", "chain_offset", "recording", "write_versions"]

VERSIONS_RUN = "versions"
# TensorBoard reads a run's event files in name order and watches only the last for new events:
# this name sorts after any timestamped file (older trainerds wrote one file per version).
VERSIONS_FILE = "events.out.tfevents.9999999999.trainerd-versions"
VERSIONS_DONE = ".written.json"
_FLUSH_S = 10.0
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.\-/]+")


def _tag(*parts: Any) -> str:
    return "/".join(_TAG_BAD.sub("_", str(p)).strip("_") or "_" for p in parts)


def chain_offset(init_adapter: Path | None, limit: int = 100_000) -> int:
    """Optimizer steps of the whole chain behind ``init_adapter`` (0 for the base model): its
    running total, or (an adapter from before the total) the sum walked up its init adapters."""
    total, seen, cur = 0, set(), init_adapter
    while cur is not None and len(seen) < limit:
        key = os.path.realpath(cur)
        if key in seen:
            break  # a cycle: a hand-made folder; stop rather than loop
        seen.add(key)
        meta = read_json_or_none(Path(cur) / "trainerd.json") or {}
        if isinstance(meta.get("chain_steps"), int):
            return total + meta["chain_steps"]
        total += int(meta.get("steps") or 0)
        cur = Path(meta["init_adapter"]) if meta.get("init_adapter") else None
    return total


class _Writer:
    """One event file: tensorboardX's EventsWriter, synchronous."""

    def __init__(self, logdir: Path, suffix: str, *, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        self._Event, self._Summary = Event, Summary
        logdir.mkdir(parents=True, exist_ok=True)
        self.w = EventsWriter(str(logdir / "events"), filename_suffix=suffix)
        if purge_step is not None:
            # TensorBoard drops events of earlier files at or after this step (SummaryWriter's purge_step).
            self.w.write_event(Event(wall_time=time.time(), step=purge_step,
                                     session_log=SessionLog(status=SessionLog.START)))
        self.flushed_at = time.monotonic()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = self._Summary(value=[self._Summary.Value(tag=k, simple_value=float(v))
                                       for k, v in values.items() if isinstance(v, (int, float))])
        self.w.write_event(self._Event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self.flushed_at >= _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.w.flush()  # flush + fsync: every _FLUSH_S at most, and at the end
        self.flushed_at = time.monotonic()

    def close(self) -> None:
        self.w.close()


class Curves(logging.Handler):
    """Turns the worker's log events into TensorBoard scalars for one batch's run."""

    def __init__(self, run_dir: Path, offset: int, log: Any):
        super().__init__(level=logging.DEBUG)
        self.run_dir, self.offset, self.log = run_dir, offset, log
        self.writer: _Writer | None = None
        self.step = 0
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        ev = record.msg
        if self.failed or not isinstance(ev, dict):
            return
        try:
            self._on(ev.get("event"), ev)
        except Exception as e:  # noqa: BLE001 - curves must never break training
            self.fail(e)

    def _on(self, event: Any, ev: dict[str, Any]) -> None:
        if event == "training_started":
            self.step = int(ev.get("step") or 0)
            if self.writer is None:
                # The first step this attempt logs is step + 1: hide the earlier attempts' from there on.
                self.writer = _Writer(self.run_dir, f".{os.getpid()}", purge_step=self.offset + self.step + 1)
            return
        w = self.writer
        if w is None:
            return
        if event == "step":
            self.step = int(ev["step"])
            w.scalars(self.offset + self.step, {
                "train/loss": ev.get("loss"), "train/learning_rate": ev.get("lr"),
                "train/tokens_per_s": ev.get("tokens_per_s"), "train/rss_bytes": ev.get("rss_bytes")})
        elif event == "eval_step":
            self.step = int(ev.get("step") or self.step)
            w.scalars(self.offset + self.step, {"eval/new_set_loss": ev.get("new_set_loss")})
        elif event == "checkpoint_saved":
            w.flush()  # the curves are as durable as the checkpoint: a resume purges only what follows it
        elif event == "evaluation_done":
            values = {}
            for s in ev.get("sets") or []:
                for model in ("candidate", "champion"):
                    values[_tag("eval", s.get("kind"), s.get("name"), model)] = s.get(model)
            w.scalars(self.offset + self.step, values)
            w.flush()

    def fail(self, e: BaseException) -> None:
        self.failed = True
        # Off the handler's own logger path: this handler is on it, and it is now quiet anyway.
        self.log.warning("curves_failed", error=f"{type(e).__name__}: {e}", run=str(self.run_dir),
                         action="no more TensorBoard curves for this attempt; training goes on")

    def close(self) -> None:
        try:
            if self.writer is not None and not self.failed:
                self.writer.close()
        except Exception as e:  # noqa: BLE001
            self.fail(e)
        super().close()


def _version_event(n: int, lin: dict[str, Any]) -> bytes:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    values: dict[str, Any] = {"version/blessed": 1.0 if lin.get("kind") in ("blessed", None) else 0.0,
                              "version/steps": lin.get("steps"), "version/tokens": lin.get("tokens")}
    for s in (lin.get("gate") or {}).get("sets") or []:
        for field in ("candidate", "champion", "change", "allowed"):
            values[_tag("gate", s.get("kind"), s.get("name"), field)] = s.get(field)
    summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
                             if isinstance(v, (int, float))])
    return Event(wall_time=time.time(), step=n, summary=summary).SerializeToString()


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC (what EventsWriter writes)."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("Q", len(data))
    return header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))


def _written_through(run: Path) -> int:
    done = read_json_or_none(run / VERSIONS_DONE)
    if done is not None:
        return int(done.get("through") or 0)
    # A root from before the marker: one file per version, ``...v<n>``; listed this once.
    return max((int(v) for p in run.glob("events.out.tfevents.*.v*")
                if (v := p.name.rsplit(".v", 1)[-1]).isdigit()), default=0)


def write_versions(layout: RootLayout) -> list[int]:
    """The gate figures of every version published since the last call, appended to the ``versions``
    run; returns the versions written. Costs the new versions only, never the chain's length."""
    try:
        newest = int(os.readlink(layout.current))
    except (OSError, ValueError):
        return []  # no version yet
    run = layout.tensorboard / VERSIONS_RUN
    if run.is_dir() and (read_json_or_none(run / VERSIONS_DONE) or {}).get("through", 0) >= newest:
        return []  # the common case: nothing published since the last worker
    run.mkdir(parents=True, exist_ok=True)
    written: list[int] = []
    with open(run / VERSIONS_FILE, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # one writer at a time (a worker, or the command)
        through = _written_through(run)
        if through >= newest:
            return []
        if f.tell() == 0:
            from tensorboardX.proto.event_pb2 import Event

            f.write(_record(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()))
        for n in range(through + 1, newest + 1):
            lin = read_json_or_none(layout.adapter_dir(n) / "lineage.json")
            if lin is not None:  # (none: its folder was removed, or it was adopted without one)
                f.write(_record(_version_event(n, lin)))
                written.append(n)
        f.flush()
        os.fsync(f.fileno())
        atomic_write_json(run / VERSIONS_DONE, {"through": newest})
    return written


@contextmanager
def recording(files: BatchFiles, settings: Any, init_adapter: Path | None, log: Any) -> Iterator[Curves | None]:
    """While the block runs, the worker's events become curves in ``tensorboard/<batch>/``."""
    layout = RootLayout(settings.root)
    curves = None
    try:
        write_versions(layout)
        curves = Curves(layout.tensorboard / files.dir.name, chain_offset(init_adapter), log)
    except Exception as e:  # noqa: BLE001 - no curves, same training
        log.warning("curves_failed", error=f"{type(e).__name__}: {e}", run=str(layout.tensorboard),
                    action="no TensorBoard curves for this attempt; training goes on")
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    if curves is not None:
        # Every step is a point on the curve, but the log keeps only some step lines at info and
        # the rest at debug (worker/progress.py): debug reaches this handler, the others keep their level.
        for h in logger.handlers:
            h.setLevel(max(h.level, level))
        logger.setLevel(min(level, logging.DEBUG))
        logger.addHandler(curves)
    try:
        yield curves
    finally:
        if curves is not None:
            logger.removeHandler(curves)
            logger.setLevel(level)
            curves.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m trainerd.worker.curves ROOT``: write the versions' gate figures now."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainerd.worker.curves ROOT", file=sys.stderr)
        return 2
    written = write_versions(RootLayout(args[0]))
    print(f"gate figures written for versions: {written or 'none new'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
