"""Worker entry point: exit 0 done, 75 stopped (resumable), 65 bad data, 78 bad settings.

Anything else is a crash: the traceback goes to stderr and result.json says ``crashed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# Quiet, offline, no surprises: set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from trainerd.worker import heartbeat, record_early_signals, tally  # noqa: E402 (torch-free; first thing we do)

record_early_signals()
tally.start_clock()  # the restart's clock: process start to the first optimizer step, by phase


def _rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them; (0, 1) for a single worker."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _logger(rank: int, world: int):
    from trainerd.core import logs

    # JSON lines on stdout whatever stdout is: the supervisor relays and re-tags them. Under
    # torchrun every rank's stdout is the launcher's: rank 0 tells the story, the others speak
    # up only for warnings and errors, and every line says which rank it is from.
    logs.configure(fmt="json", stream=sys.stdout, level="info" if rank == 0 else "warning")
    return logs.get_logger(pid=os.getpid(), rank=rank) if world > 1 else logs.get_logger(pid=os.getpid())


RESERVE_BYTES = 64 << 10


def _first_split(files, settings, log):
    """Split the batch (held-out slice, evaluation contents excluded) before importing torch
    (seconds of imports and a model load): returns the rejecting ScanReport, or None to go on.
    The same line rules and verdict as ``trainerd validate``; the tokenizing pass can only find
    more bad lines, never fewer. Done once: split.json freezes it for every later attempt; a
    healing try only draws its replay again (once)."""
    from trainerd.core.fsutil import atomic_write_json, read_json_or_none
    from trainerd.worker.split import first_split, heal_split

    if files.split.exists():
        heal_split(files, settings, log)
        return None
    if not files.data.is_file():
        return None  # a missing or unreadable file is reported by the trainer in its own words
    scanned = read_json_or_none(files.scan)
    if scanned is not None:
        # A batch begun by a release without the split: it resumes exactly as it started.
        atomic_write_json(files.split, {"version": 1, "own_lines": scanned.get("good", 0), "legacy": True})
        return None
    try:
        rep = first_split(files, settings, log)
    except OSError:
        return None  # disk full writing the split, or the file vanished: the trainer says which
    if not rep.rejected or (rep.reason or "").startswith("cannot read"):
        return None
    return rep


def _expand(files, settings, log) -> None:
    """A compressed batch (data.jsonl.gz|zst, claimed as it came) is decompressed into data.jsonl
    before anything reads it: streamed, bounded by data.max_file_bytes and disk.min_free_bytes.
    Here, in the worker, not in the supervisor: it can take minutes, its memory and disk are this
    attempt's (the guard watches them), and a bad archive is this batch's bad data (exit 65).
    Done once; an attempt killed half-way leaves only a temporary that the next one replaces."""
    from trainerd.core.compressed import ArchiveError, expand
    from trainerd.core.contract import ExitCode, Outcome

    src = files.compressed()
    if src is None or files.data.exists():
        return
    try:
        got = expand(src, files.data, name=src.name, max_bytes=settings.data.max_file_bytes,
                     min_free_bytes=settings.disk.min_free_bytes, beat=heartbeat.beat)
    except ArchiveError as e:
        log.error("bad_data", reason=str(e), during="decompress")
        raise _Finish(Outcome.BAD_DATA, str(e), ExitCode.DATAERR, lines_good=0, lines_bad=0, errors=[], step=0,
                      total_steps=0)
    log.info("data_decompressed", file=src.name, **got)


class _Finish(Exception):
    """Raised to end the attempt with a result: status, reason, exit code, extra result fields."""

    def __init__(self, status, reason: str, code, **extra):
        super().__init__(reason)
        self.status, self.reason, self.code, self.extra = status, reason, code, extra


def _write_result(files, log, end: _Finish) -> int:
    """result.json (the worker's last word), then the exit code."""
    from trainerd.core.fsutil import atomic_write_json

    body = {"status": end.status, "reason": end.reason, "exit_code": int(end.code), **end.extra}
    # Free the reserve first: on a full disk it is the room result.json is written into, so the
    # supervisor learns *why* (disk_full) and not just "75".
    rank, _ = _rank()
    try:
        if rank == 0:
            os.unlink(files.reserve)
    except OSError:
        pass
    try:
        atomic_write_json(files.rank_result(rank), body)  # rank 0: result.json
    except OSError as e:  # disk full: the exit code still tells the supervisor
        log.error("result_write_failed", error=str(e))
    log.info("worker_exit", status=end.status, reason=end.reason, exit_code=end.code)
    return int(end.code)


def _settings(files, init_adapter: Path | None, log):
    """The attempt's settings from settings.json; _Finish (exit 78) naming every problem."""
    from trainerd.core.config import ConfigError, from_dict
    from trainerd.core.contract import ExitCode, Outcome
    from trainerd.core.fsutil import read_json

    def bad(reason: str, **extra) -> _Finish:
        return _Finish(Outcome.BAD_CONFIG, reason, ExitCode.CONFIG, **extra)

    if not files.dir.is_dir():
        raise bad(f"batch folder missing: {files.dir}")
    try:
        raw = read_json(files.settings)
    except FileNotFoundError:
        raise bad(f"settings file missing: {files.settings}")
    except ValueError as e:
        raise bad(f"settings.json is not valid JSON: {e}")
    try:
        settings = from_dict(raw, source=str(files.settings))
    except ConfigError as e:
        for problem in e.problems:
            log.error("bad_setting", problem=problem)
        raise bad("; ".join(e.problems), problems=e.problems)
    if init_adapter is not None and not (init_adapter / "adapter_config.json").is_file():
        raise bad(f"--init-adapter: no adapter at {init_adapter}")
    return settings


def _train(files, settings, args, log) -> _Finish:
    """Run the trainer; every way it can end, as a _Finish."""
    from trainerd.core.contract import ExitCode, Outcome
    from trainerd.core.fsutil import write_ballast

    # torch, transformers and peft: seconds (tens on a loaded machine) with no loop of ours to
    # beat the heartbeat, like the model load itself: the stall watchdog's longer "load" timeout.
    heartbeat.phase("load")
    from trainerd.worker.data import DataError
    from trainerd.worker.train import ConfigProblem, Trainer

    import peft  # noqa: F401 (here, not inside the model load: the restart's phases say what they are,
    import transformers  # noqa: F401  and these imports are most of a restart)

    tally.phase_done("imports")
    # released by _write_result() so that result.json can still be written when the disk fills
    # (rank 0's: another rank's early end must not take it away)
    if _rank()[0] == 0:
        write_ballast(files.reserve, RESERVE_BYTES)
    trainer = Trainer(files.dir, settings, init_adapter=args.init_adapter, publish=args.publish, log=log,
                      mtbf_s=args.mtbf_s)
    try:
        outcome = trainer.run()
    except DataError as e:
        log.error("bad_data", reason=e.reason, first_errors=e.errors[:5])
        summary = trainer.summary()
        summary["errors"] = e.errors or summary.get("errors", [])
        return _Finish(Outcome.BAD_DATA, e.reason, ExitCode.DATAERR, **summary)
    except ConfigProblem as e:
        log.error("bad_setting", problem=str(e))
        return _Finish(Outcome.BAD_CONFIG, str(e), ExitCode.CONFIG, problems=[str(e)], **trainer.summary())
    except Exception as e:
        traceback.print_exc()
        log.error("worker_crashed", error=f"{type(e).__name__}: {e}")
        try:
            summary = trainer.summary()
        except Exception:
            summary = {}
        return _Finish(Outcome.CRASHED, f"{type(e).__name__}: {e}", ExitCode.SOFTWARE, **summary)
    return _Finish(outcome.status, outcome.reason, outcome.exit_code, **trainer.summary(), **outcome.extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainerd.worker", description=__doc__)
    p.add_argument("batch_dir", type=Path)
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="adapter to continue from when the batch has no checkpoint yet")
    p.add_argument("--publish", type=Path, default=None,
                   help="where to write the final adapter (atomically; must not exist)")
    p.add_argument("--mtbf-s", type=float, default=None,
                   help="the supervisor's estimate of the mean time between faults (train.checkpoint_every_s: auto)")
    args = p.parse_args(argv)
    rank, world = _rank()
    log = _logger(rank, world)

    from trainerd.core.contract import BatchFiles, ExitCode, Outcome

    files = BatchFiles(args.batch_dir.resolve())
    if files.dir.is_dir() and rank == 0:
        # Rank 0's loops are the attempt's sign of life: every step waits for all ranks in a
        # collective, so a frozen rank stops rank 0's heartbeat too.
        heartbeat.start(files.heartbeat)
        heartbeat.phase("split")
    try:
        settings = _settings(files, args.init_adapter, log)
        if rank == 0:
            _expand(files, settings, log)  # issue 14: *.jsonl.gz|zst -> data.jsonl, before the split
        rejected = _first_split(files, settings, log) if rank == 0 else None  # the others wait for it
        tally.phase_done("split")
        if rejected is not None:
            log.error("bad_data", reason=rejected.reason, first_errors=rejected.errors[:5], during="first_split")
            raise _Finish(Outcome.BAD_DATA, rejected.reason, ExitCode.DATAERR, lines_good=rejected.good,
                          lines_bad=rejected.bad, errors=rejected.errors, step=0, total_steps=0)
        from trainerd.worker.curves import recording

        if rank == 0:
            with recording(files, settings, args.init_adapter, log):  # TensorBoard curves, fed by the log events
                end = _train(files, settings, args, log)
        else:
            end = _train(files, settings, args, log)
    except _Finish as e:
        end = e
    return _write_result(files, log, end)


if __name__ == "__main__":
    sys.exit(main())
