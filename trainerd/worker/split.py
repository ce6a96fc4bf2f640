"""The first pass over a batch, before torch is imported: validate, split, freeze.

One streamed read of ``data.jsonl`` (bounded memory whatever its size):

- every line is validated (the same rules and verdict as ``trainerd validate``); a file that
  must be rejected is rejected here, in a fraction of a second instead of after the imports;
- the batch's *distinct* good contents are split by a hash of their content
  (:func:`trainerd.lines.content_hash`): the ``k`` smallest hashes are held out for evaluation,
  ``k`` = ``eval.holdout_fraction`` of the distinct contents, at least ``eval.holdout_min``
  (where there are >= 10) and at most ``eval.holdout_max``. So the split depends neither on the
  order of the lines nor on the file's name, and every copy of a line goes the same way;
- contents of every evaluation set (earlier batches' sets, standing suites, this batch's own
  eval file) are excluded from training: what trainerd evaluates on, it never trains on.

It writes ``holdout.jsonl`` (each held-out content once) and then ``split.json`` (the counts
and the hashes the training pass skips). ``split.json`` existing means the split is frozen: a
resume, a retry or a new suite cannot change what the batch trains on.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import math
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from trainerd.config import EvalSettings, Settings
from trainerd.contract import BatchFiles, RootLayout
from trainerd.fsutil import atomic_write_bytes, atomic_write_json, open_regular, read_json_or_none
from trainerd.lines import LineError, RawLine, ScanReport, content_hash, iter_lines, judge, parse_line
from trainerd.worker import heartbeat
from trainerd.replay import MAX_LINE, Store, content_fraction, line_bytes, read_checked

__all__ = ["EvalSetRef", "Split", "first_split", "holdout_count", "load_split", "read_evalsets", "set_hashes"]

SPLIT_VERSION = 1


@dataclass(frozen=True)
class EvalSetRef:
    """One evaluation set: the batch's new set, an earlier batch's set, or a standing suite."""

    name: str
    kind: str             # new | earlier | suite
    path: str
    sha256: str | None = None
    batch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": self.path, "sha256": self.sha256, "batch": self.batch}


@dataclass
class Split:
    """What split.json says; see the module docstring."""

    own_lines: int                 # good, not held out, not excluded: the batch's training lines
    replay_lines: int = 0
    heldout: tuple[str, ...] = ()  # content hashes held out of this batch
    excluded: tuple[str, ...] = ()  # content hashes of every evaluation set (never trained)
    new_set: str | None = None     # holdout.jsonl, eval.jsonl, or None (nothing to evaluate on)
    distinct: int | None = None
    excluded_lines: int = 0
    heldout_lines: int = 0
    replay: dict[str, Any] | None = None  # lines, sources (batch -> lines), eligible, threshold

    def skip(self) -> frozenset[str]:
        return frozenset(self.heldout) | frozenset(self.excluded)


def holdout_count(n_distinct: int, ev: EvalSettings) -> int:
    """How many distinct contents to hold out of ``n_distinct``; never all of them."""
    lo = ev.holdout_min if n_distinct >= 10 else 0
    k = max(lo, min(ev.holdout_max, int(ev.holdout_fraction * n_distinct)))
    return max(0, min(k, ev.holdout_max, n_distinct - 1))


def _exact_up_to(ev: EvalSettings) -> int:
    """Beyond this many distinct contents the holdout is holdout_max (or holdout_min) whatever the
    exact number, so the distinct set need not be kept: memory stays bounded."""
    if ev.holdout_fraction <= 0:
        return 10
    return max(10, math.ceil(ev.holdout_max / ev.holdout_fraction)) + 1


def read_evalsets(files: BatchFiles) -> list[EvalSetRef]:
    raw = read_json_or_none(files.evalsets) or {}
    return [EvalSetRef(**s) for s in raw.get("sets", [])]


def set_hashes(path: Path, max_line_bytes: int) -> list[str]:
    """Content hashes of a set's good lines, in file order (bad lines are skipped)."""
    out = []
    with open_regular(path) as f:
        for raw in iter_lines(f, max_line_bytes):
            ex, _err = parse_line(raw)
            if ex is not None:
                out.append(content_hash(ex))
    return out


def load_split(files: BatchFiles) -> Split | None:
    d = read_json_or_none(files.split)
    if d is None:
        return None
    return Split(own_lines=d["own_lines"], replay_lines=d.get("replay_lines", 0), heldout=tuple(d.get("heldout", ())),
                 excluded=tuple(d.get("excluded", ())), new_set=d.get("new_set"), distinct=d.get("distinct"),
                 excluded_lines=d.get("excluded_lines", 0), heldout_lines=d.get("heldout_lines", 0),
                 replay=d.get("replay"))


class _Smallest:
    """The ``cap`` smallest content hashes seen, with where each first appeared and how often."""

    def __init__(self, cap: int):
        self.cap = cap
        self._heap: list[tuple[int, str]] = []   # (-value, hash): a max-heap of the kept ones
        self.kept: dict[str, list[int]] = {}     # hash -> [offset of its first line, occurrences]

    def add(self, h: str, offset: int) -> None:
        entry = self.kept.get(h)
        if entry is not None:
            entry[1] += 1
            return
        if self.cap <= 0:
            return
        v = int(h, 16)
        if len(self._heap) < self.cap:
            heapq.heappush(self._heap, (-v, h))
        elif v < -self._heap[0][0]:
            # The largest kept one goes; it can never come back (the bound only falls).
            _, gone = heapq.heapreplace(self._heap, (-v, h))
            del self.kept[gone]
        else:
            return
        self.kept[h] = [offset, 1]

    def smallest(self, k: int) -> list[str]:
        return sorted(self.kept, key=lambda h: int(h, 16))[:k]


def _scan_eval_file(files: BatchFiles, settings: Settings, report: ScanReport, errf: BinaryIO) -> set[str]:
    """Validate the eval file claimed with the batch; its bad lines are reported like training
    lines (with ``file``); a file with too many is the batch's bad data."""
    d = settings.data
    er = ScanReport(path=str(files.eval_file))
    hashes: set[str] = set()
    with open_regular(files.eval_file) as f:
        for raw in iter_lines(f, d.max_line_bytes):
            er.lines += 1
            ex, err = parse_line(raw)
            if err is not None:
                er.bad += 1
                e = {**LineError(raw.number, raw.offset, err).as_dict(), "file": files.eval_file.name}
                errf.write(json.dumps(e).encode() + b"\n")
                if len(report.errors) < d.max_errors_reported:
                    report.errors.append(e)
            elif ex is not None:
                er.good += 1
                hashes.add(content_hash(ex))
    judge(er, d.max_bad_fraction)
    if er.rejected:
        report.rejected = True
        report.reason = f"{files.eval_file.name}: {er.reason}"
    return hashes


def first_split(files: BatchFiles, settings: Settings, log: Any) -> ScanReport:
    """Validate, split and freeze (see the module docstring). Returns the line report; when it
    is ``rejected`` nothing is frozen and errors.jsonl names the bad lines."""
    d, ev = settings.data, settings.eval
    excluded: set[str] = set()
    for ref in read_evalsets(files):
        try:
            excluded.update(set_hashes(Path(ref.path), d.max_line_bytes))
        except OSError as e:
            log.warning("eval_set_unreadable", set=ref.name, path=ref.path, error=str(e))
    report = ScanReport(path=str(files.data))
    tmp_errors = files.dir / ".errors.jsonl.first-pass"
    with open(tmp_errors, "wb") as errf:
        has_eval_file = files.eval_file.is_file()
        if has_eval_file:
            excluded |= _scan_eval_file(files, settings, report, errf)
        smallest = _Smallest(0 if has_eval_file else ev.holdout_max)
        own_prefixes = array("Q")  # 8 bytes a line: "never the batch's own lines twice" in the draw
        distinct: set[str] | None = set()
        exact_up_to = _exact_up_to(ev)
        excluded_lines = 0
        with open_regular(files.data) as f:
            for raw in iter_lines(f, d.max_line_bytes):
                report.lines += 1
                if report.lines % 4096 == 0:
                    heartbeat.beat()
                ex, err = parse_line(raw)
                if err is not None:
                    report.bad += 1
                    e = LineError(raw.number, raw.offset, err).as_dict()
                    errf.write(json.dumps(e).encode() + b"\n")
                    if len(report.errors) < d.max_errors_reported:
                        report.errors.append(e)
                    continue
                if ex is None:
                    report.blank += 1
                    continue
                report.good += 1
                h = content_hash(ex)
                if h in excluded:
                    excluded_lines += 1
                    continue
                smallest.add(h, raw.offset)
                own_prefixes.append(int(h[:16], 16))
                if distinct is not None:
                    distinct.add(h)
                    if len(distinct) > exact_up_to:
                        distinct = None  # enough to know the holdout size; stop holding them
    was_rejected = report.rejected
    if not was_rejected:
        judge(report, d.max_bad_fraction)
    if report.rejected:
        if report.lines or report.bad:
            os.replace(tmp_errors, files.errors)  # kept only when the file is rejected
        else:
            os.unlink(tmp_errors)
        return report
    os.unlink(tmp_errors)
    n_distinct = len(distinct) if distinct is not None else None
    k = 0 if has_eval_file else holdout_count(n_distinct if n_distinct is not None else exact_up_to, ev)
    heldout = smallest.smallest(k)
    heldout_lines = sum(smallest.kept[h][1] for h in heldout)
    own = report.good - excluded_lines - heldout_lines
    if own <= 0:
        report.rejected = True
        report.reason = (f"no training lines: all {report.good} good lines are evaluation contents "
                         f"({excluded_lines} of earlier sets or suites, {heldout_lines} held out)")
        return report
    if heldout:
        _write_holdout(files, [smallest.kept[h][0] for h in heldout], d.max_line_bytes)
    own_prefixes = array("Q", sorted(own_prefixes))
    replay = draw_replay(files, settings, excluded | set(heldout), own_prefixes, own, log)
    split = {"version": SPLIT_VERSION, "own_lines": own, "replay_lines": replay["lines"],
             "replay": replay, "heldout": heldout,
             "excluded": sorted(excluded), "excluded_lines": excluded_lines, "heldout_lines": heldout_lines,
             "distinct": n_distinct, "new_set": files.eval_file.name if has_eval_file else
             (files.holdout.name if heldout else None)}
    atomic_write_json(files.split, split)
    log.info("data_split", lines=report.lines, good=report.good, bad=report.bad, distinct=n_distinct,
             heldout=len(heldout), heldout_lines=heldout_lines, excluded_lines=excluded_lines, own_lines=own,
             new_set=split["new_set"])
    return report


def _has(sorted_prefixes: array, h: str) -> bool:
    v = int(h[:16], 16)
    i = bisect.bisect_left(sorted_prefixes, v)
    return i < len(sorted_prefixes) and sorted_prefixes[i] == v


def draw_replay(files: BatchFiles, settings: Settings, skip: set[str], own: array, own_lines: int,
                log: Any) -> dict[str, Any]:
    """Draw ``replay.fraction`` x the batch's own training lines, uniformly, from the replay store
    (never an evaluation content, never one of this batch's own lines; damaged store files are
    skipped) into replay.jsonl, with a seed derived from the batch. Two streamed passes over the
    store: count what is eligible, then copy the drawn lines (in store order; training
    interleaves them evenly). Returns what split.json records: lines, from which batches."""
    rp = settings.replay
    k = min(round(rp.fraction * own_lines), int(rp.max_fraction * own_lines)) if rp.fraction > 0 else 0
    empty = {"lines": 0, "sources": {}, "eligible": 0, "threshold": None}
    if k <= 0:
        return empty
    store = Store.open(RootLayout(settings.root).replay)

    def eligible(lines: Iterator[RawLine]) -> Iterator[RawLine]:
        for n, raw in enumerate(lines):
            if n % 4096 == 0:
                heartbeat.beat()
            ex, _ = parse_line(raw)
            if ex is None:
                continue
            h = content_hash(ex)
            if h not in skip and content_fraction(h) < store.threshold and not _has(own, h):
                yield raw

    counts: list[tuple[int, Path, str, int]] = []
    for b, path in store.usable(log):
        lines = read_checked(path, store.files[b].sha256, log)
        if lines is not None:
            counts.append((b, path, store.files[b].sha256, sum(1 for _ in eligible(lines))))
    total = sum(c[3] for c in counts)
    k = min(k, total)
    if k == 0:
        return {**empty, "threshold": store.threshold}
    seed = int(hashlib.sha256(f"{settings.train.seed}:{files.dir.name}:{own_lines}".encode()).hexdigest()[:16], 16)
    chosen = sorted(random.Random(seed).sample(range(total), k))
    sources: dict[str, int] = {}
    i = j = 0
    tmp = files.replay.with_name(f".{files.replay.name}.tmp")
    with open(tmp, "wb") as out:
        for b, path, _sha, _n in counts:
            # The file was just checked; compaction (its only other writer) never runs beside a worker.
            with open_regular(path) as f:
                for raw in eligible(iter_lines(f, MAX_LINE)):
                    if j < k and chosen[j] == i:
                        out.write(line_bytes(raw))
                        sources[f"{b:06d}"] = sources.get(f"{b:06d}", 0) + 1
                        j += 1
                    i += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, files.replay)
    log.info("replay_drawn", lines=k, eligible=total, from_batches=sources, threshold=store.threshold)
    return {"lines": k, "sources": sources, "eligible": total, "threshold": store.threshold}


def _write_holdout(files: BatchFiles, offsets: list[int], max_line_bytes: int) -> None:
    """Each held-out content once, as its first line in the file read back at its offset."""
    out = []
    with open_regular(files.data) as f:
        for off in offsets:
            raw = next(iter_lines(f, max_line_bytes, start_offset=off))
            data = raw.data or b""
            if raw.offset == 0 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            out.append(data.rstrip(b"\r\n") + b"\n")
    atomic_write_bytes(files.holdout, b"".join(out))
