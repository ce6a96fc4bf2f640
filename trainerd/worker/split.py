"""The first pass over a batch, before torch is imported: validate, split, freeze.

One streamed read of ``data.jsonl`` (bounded memory whatever its size):

- every line is validated (the same rules and verdict as ``trainerd validate``); a file that
  must be rejected is rejected here, in a fraction of a second instead of after the imports;
- the batch's *distinct* good contents are split by a hash of their content
  (:func:`trainerd.core.lines.content_hash`): ``k`` of them are held out for evaluation
  (:func:`holdout_count`: ``eval.holdout_fraction`` of them, at least ``eval.holdout_min`` once
  there are two, at most ``eval.holdout_max``, never all), the smallest hashes, taken alike from
  the contents written more than once and from those written once (:func:`choose_holdout`: a
  fact taught through a few questions repeated many times, among general text, still has a
  question held out). So the split depends neither on the order of the lines nor on the file's
  name, and every copy of a line goes the same way. A file with one distinct content holds
  nothing out: it is judged on that content, trained, as its *seen* set, and every decision says so;
- a content that any published batch held out (the shared index, trainerd/core/evalmemory.py), or
  that a standing suite or this batch's own eval file holds, is excluded from training: what
  trainerd evaluates on, it never trains on. A lookup, not a copy: the folder records only the
  batch's own excluded contents.

It writes ``holdout.jsonl`` (each held-out content once) and then ``split.json`` (the counts,
this batch's held-out and excluded hashes, its replay draw). ``split.json`` existing means the
split is frozen: a resume, a retry or a new suite cannot change what the batch trains on; a
healing try (supervisor/heal.py) redraws only its replay, once (:func:`heal_split`).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from trainerd.core.settings import EvalSettings, Settings
from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.evalmemory import EvalMemory
from trainerd.core.fsutil import atomic_write_bytes, atomic_write_json, open_regular, read_json_or_none, unlink_quietly
from trainerd.core.lines import LineError, RawLine, ScanReport, content_hash, iter_lines, judge, parse_line
from trainerd.worker import heartbeat
from trainerd.worker.draw import draw_replay, own_prefixes

__all__ = ["EvalSetRef", "Split", "first_split", "heal_split", "holdout_count", "load_split", "read_evalsets",
           "set_hashes"]

SPLIT_VERSION = 2
LOOKUP_CHUNK = 512  # lines looked up in the shared index at a time


@dataclass(frozen=True)
class EvalSetRef:
    """One evaluation set: the batch's new set, a standing suite, or (roots from before the
    evaluation memory) an earlier batch's whole set."""

    name: str
    kind: str             # new | seen | suite | earlier
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
    excluded: tuple[str, ...] = ()  # this batch's contents that are evaluation contents (never trained)
    new_set: str | None = None     # holdout.jsonl, eval.jsonl, or None (nothing to evaluate on)
    new_set_kind: str | None = None  # new | seen
    distinct: int | None = None
    excluded_lines: int = 0
    heldout_lines: int = 0
    replay: dict[str, Any] | None = None  # lines, sources (batch -> lines), eligible, threshold, heal

    def skip(self) -> frozenset[str]:
        return frozenset(self.heldout) | frozenset(self.excluded)


def holdout_count(n_distinct: int, ev: EvalSettings) -> int:
    """How many distinct contents to hold out of ``n_distinct``: ``holdout_fraction`` of them, at
    least ``holdout_min`` once there are two, at most ``holdout_max``; never all of them."""
    if n_distinct < 2:
        return 0
    k = max(ev.holdout_min, int(ev.holdout_fraction * n_distinct))
    return max(0, min(k, ev.holdout_max, n_distinct - 1))


# Up to this many distinct contents each is counted (first offset, copies: ~250 bytes each) and
# the holdout is taken from the repeated and the single ones alike; beyond it, the smallest
# hashes of all (a uniform sample; a file that large holds holdout_max out anyway).
EXACT_DISTINCT = 20_000


def choose_holdout(counts: dict[str, list[int]], ev: EvalSettings) -> list[str]:
    """The held-out contents of a file whose distinct contents are all counted (``counts``: hash ->
    [first offset, copies]): ``holdout_count`` of them, of which ``holdout_count`` of the repeated
    ones and the rest from the ones written once (all but one of them at most); one written once
    where that leaves none. The smallest hashes of each kind."""
    by_hash = lambda hs: sorted(hs, key=lambda h: int(h, 16))  # noqa: E731
    repeated = by_hash(h for h, (_, n) in counts.items() if n >= 2)
    once = by_hash(h for h, (_, n) in counts.items() if n < 2)
    k = holdout_count(len(counts), ev)
    k_rep = min(holdout_count(len(repeated), ev), k)
    k_once = min(k - k_rep, max(len(once) - 1, 0))
    if k and not k_rep and not k_once and once:
        k_once = 1  # one repeated content and one written once: the repeated one is the lesson
    return repeated[:k_rep] + once[:k_once]


def read_evalsets(files: BatchFiles) -> list[EvalSetRef]:
    """The sets frozen in evalsets.json besides the memory: standing suites (and, in a batch
    frozen before the evaluation memory existed, the earlier batches' sets)."""
    raw = read_json_or_none(files.evalsets) or {}
    return [EvalSetRef(**s) for s in raw.get("sets", [])]


def frozen_memory(files: BatchFiles) -> dict[str, Any] | None:
    """The evaluation memory's version this batch is judged on (evalsets.json), if any."""
    return (read_json_or_none(files.evalsets) or {}).get("memory")


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
    new_set = d.get("new_set")
    return Split(own_lines=d["own_lines"], replay_lines=d.get("replay_lines", 0), heldout=tuple(d.get("heldout", ())),
                 excluded=tuple(d.get("excluded", ())), new_set=new_set,
                 new_set_kind=d.get("new_set_kind") or ("new" if new_set else None), distinct=d.get("distinct"),
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


def _frozen_set_hashes(files: BatchFiles, max_line_bytes: int, log: Any) -> set[str]:
    """Contents of the suites (and legacy earlier sets) frozen in evalsets.json: bounded by what
    an operator placed in root/evals/, never by the chain's length."""
    out: set[str] = set()
    for ref in read_evalsets(files):
        try:
            out.update(set_hashes(Path(ref.path), max_line_bytes))
        except OSError as e:
            log.warning("eval_set_unreadable", set=ref.name, path=ref.path, error=str(e))
    return out


class _Excluder:
    """Is a content an evaluation content? Suites and the eval file from a set held here; every
    published batch's held-out contents through the shared index, looked up in chunks."""

    def __init__(self, local: set[str], index: EvalMemory | None):
        self.local, self.index = local, index
        self.found: set[str] = set()     # this batch's excluded contents (what split.json records)

    def filter(self, hashes: list[str]) -> set[str]:
        hit = {h for h in hashes if h in self.local}
        if self.index is not None:
            hit |= self.index.heldout([h for h in hashes if h not in hit])
        self.found |= hit
        return hit


def _good_lines(f: BinaryIO, report: ScanReport, errf: BinaryIO, max_line_bytes: int, max_errors: int
                ) -> Iterator[tuple[RawLine, str]]:
    """(line, content hash) of every good line, counting and recording the others."""
    for raw in iter_lines(f, max_line_bytes):
        report.lines += 1
        if report.lines % 4096 == 0:
            heartbeat.beat()
        ex, err = parse_line(raw)
        if err is not None:
            report.bad += 1
            e = LineError(raw.number, raw.offset, err).as_dict()
            errf.write(json.dumps(e).encode() + b"\n")
            if len(report.errors) < max_errors:
                report.errors.append(e)
            continue
        if ex is None:
            report.blank += 1
            continue
        report.good += 1
        yield raw, content_hash(ex)


def _chunked(items: Iterator[tuple[RawLine, str]], excluder: _Excluder) -> Iterator[tuple[RawLine, str, bool]]:
    """The lines with whether each is excluded, looked up ``LOOKUP_CHUNK`` at a time."""
    buf: list[tuple[RawLine, str]] = []
    for item in items:
        buf.append(item)
        if len(buf) >= LOOKUP_CHUNK:
            hit = excluder.filter([h for _, h in buf])
            yield from ((r, h, h in hit) for r, h in buf)
            buf = []
    if buf:
        hit = excluder.filter([h for _, h in buf])
        yield from ((r, h, h in hit) for r, h in buf)


def _index(settings: Settings) -> EvalMemory | None:
    return EvalMemory.open_readonly(RootLayout(settings.root).evalsets)


def first_split(files: BatchFiles, settings: Settings, log: Any) -> ScanReport:
    """Validate, split and freeze (see the module docstring). Returns the line report; when it
    is ``rejected`` nothing is frozen and errors.jsonl names the bad lines."""
    d, ev = settings.data, settings.eval
    t0 = time.monotonic()
    local = _frozen_set_hashes(files, d.max_line_bytes, log)
    report = ScanReport(path=str(files.data))
    tmp_errors = files.dir / ".errors.jsonl.first-pass"
    index = _index(settings)
    try:
        with open(tmp_errors, "wb") as errf:
            has_eval_file = files.eval_file.is_file()
            if has_eval_file:
                local |= _scan_eval_file(files, settings, report, errf)
            excluder = _Excluder(local, index)
            smallest = _Smallest(0 if has_eval_file else max(ev.holdout_max, 1))
            counts: dict[str, list[int]] | None = {}  # hash -> [first offset, copies], while bounded
            prefixes = array("Q")  # 8 bytes a line: "never the batch's own lines twice" in the draw
            excluded_lines = 0
            with open_regular(files.data) as f:
                for raw, h, excluded in _chunked(_good_lines(f, report, errf, d.max_line_bytes,
                                                             d.max_errors_reported), excluder):
                    if excluded:
                        excluded_lines += 1
                        continue
                    smallest.add(h, raw.offset)
                    prefixes.append(int(h[:16], 16))
                    if counts is not None:
                        seen_h = counts.setdefault(h, [raw.offset, 0])
                        seen_h[1] += 1
                        if len(counts) > EXACT_DISTINCT:
                            counts = None  # a large file: the smallest hashes of all (bounded memory)
    finally:
        if index is not None:
            index.close()
    if not report.rejected:
        judge(report, d.max_bad_fraction)
    if report.rejected:
        if report.lines or report.bad:
            os.replace(tmp_errors, files.errors)  # kept only when the file is rejected
        else:
            os.unlink(tmp_errors)
        return report
    os.unlink(tmp_errors)
    n_distinct = len(counts) if counts is not None else None
    kept = counts if counts is not None else smallest.kept  # hash -> [first offset, copies]
    if has_eval_file:
        heldout = []
    elif counts is not None:
        heldout = choose_holdout(counts, ev)
    else:
        heldout = smallest.smallest(holdout_count(EXACT_DISTINCT + 1, ev))
    heldout_lines = sum(kept[h][1] for h in heldout)
    own = report.good - excluded_lines - heldout_lines
    if own <= 0:
        report.rejected = True
        report.reason = (f"no training lines: all {report.good} good lines are evaluation contents "
                         f"({excluded_lines} of earlier batches' held-out sets, suites or the eval file, "
                         f"{heldout_lines} held out)")
        return report
    seen = not has_eval_file and not heldout and n_distinct == 1
    if heldout or seen:
        _write_holdout(files, [kept[h][0] for h in (heldout or list(kept))], d.max_line_bytes)
    skip = local | excluder.found | set(heldout)  # the draw skips suites' contents too, not only this batch's
    replay = draw_replay(files, settings, skip, array("Q", sorted(prefixes)), own, log)
    new_set, kind = ((files.eval_file.name, "new") if has_eval_file else (files.holdout.name, "new") if heldout
                     else (files.holdout.name, "seen") if seen else (None, None))
    split = {"version": SPLIT_VERSION, "own_lines": own, "replay_lines": replay["lines"],
             "replay": replay, "heldout": heldout,
             "excluded": sorted(excluder.found), "excluded_lines": excluded_lines, "heldout_lines": heldout_lines,
             "distinct": n_distinct, "new_set": new_set, "new_set_kind": kind}
    atomic_write_json(files.split, split)
    log.info("data_split", lines=report.lines, good=report.good, bad=report.bad, distinct=n_distinct,
             heldout=len(heldout), heldout_lines=heldout_lines, excluded_lines=excluded_lines, own_lines=own,
             new_set=new_set, new_set_kind=kind, split_s=round(time.monotonic() - t0, 3),
             **({"note": "one distinct content: nothing to hold out; judged on its own lines (seen)"} if seen else {}))
    return report


def heal_split(files: BatchFiles, settings: Settings, log: Any) -> bool:
    """A healing try (batches/<id>/heal.json, written by the supervisor) draws its replay again,
    once: the usual uniform draw plus the regressed batches' lines. The split itself (what is
    held out, what is excluded) does not change. True when it redrew."""
    heal = read_json_or_none(files.heal)
    split = read_json_or_none(files.split)
    if heal is None or split is None or (split.get("replay") or {}).get("heal", {}).get("try") == heal["try"]:
        return False
    # The previous try's scan counted the previous draw: gone before the new split can be seen.
    unlink_quietly(files.scan)
    skip = set(split.get("heldout", ())) | set(split.get("excluded", ()))
    skip |= _frozen_set_hashes(files, settings.data.max_line_bytes, log)
    if files.eval_file.is_file():
        skip |= set(set_hashes(files.eval_file, settings.data.max_line_bytes))
    own = split["own_lines"]
    replay = draw_replay(files, settings, skip, own_prefixes(files.data, skip, settings.data.max_line_bytes), own,
                         log, heal=heal)
    atomic_write_json(files.split, {**split, "replay_lines": replay["lines"], "replay": replay})
    return True


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
