"""The replay draw: which earlier batches' lines a batch rehearses (torch-free, in its first pass).

``replay.fraction`` x the batch's own training lines, uniformly from the replay store
(trainerd/core/replay.py) — never an evaluation content (the shared index of held-out contents,
trainerd/core/evalmemory.py, and this batch's own skip set), never one of the batch's own contents,
never a line of a damaged store file. A healing try (supervisor/heal.py) adds
``gate.heal_replay`` x try x its own lines drawn from the batches it regressed on (all of their
eligible lines, repeated, where they are fewer).

Two streamed passes over the store (count what is eligible; collect the chosen lines into a
temporary file), then the chosen lines are written to ``replay.jsonl`` in an order shuffled with
the batch's seed, so a rehearsed batch is spread over the epoch rather than bunched where it
lies in the store. Training interleaves them evenly among the batch's own lines. Seeds derive
from the batch (and the try), so the draw is the same whenever it is made again.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from trainerd.core.settings import Settings
from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.evalmemory import EvalMemory
from trainerd.core.fsutil import open_regular
from trainerd.core.lines import RawLine, content_hash, iter_lines, parse_line
from trainerd.core.replay import MAX_LINE, Store, content_fraction, line_bytes, read_checked
from trainerd.worker import heartbeat

__all__ = ["draw_replay", "own_prefixes"]

CHUNK = 512


def own_prefixes(path: Path, skip: set[str], max_line_bytes: int) -> array:
    """The sorted 64-bit prefixes of a batch's own contents (8 bytes a line)."""
    out = array("Q")
    with open_regular(path) as f:
        for raw in iter_lines(f, max_line_bytes):
            ex, _ = parse_line(raw)
            if ex is not None:
                h = content_hash(ex)
                if h not in skip:
                    out.append(int(h[:16], 16))
    return array("Q", sorted(out))


def _has(sorted_prefixes: array, h: str) -> bool:
    v = int(h[:16], 16)
    i = bisect.bisect_left(sorted_prefixes, v)
    return i < len(sorted_prefixes) and sorted_prefixes[i] == v


class _Eligible:
    """A store file's lines a draw may take, in file order, looked up in the shared index in chunks."""

    def __init__(self, skip: set[str], own: array, threshold: float, index: EvalMemory | None):
        self.skip, self.own, self.threshold, self.index = skip, own, threshold, index

    def __call__(self, lines: Iterator[RawLine]) -> Iterator[RawLine]:
        buf: list[tuple[RawLine, str]] = []
        for n, raw in enumerate(lines):
            if n % 4096 == 0:
                heartbeat.beat()
            ex, _ = parse_line(raw)
            if ex is None:
                continue
            h = content_hash(ex)
            if h not in self.skip and content_fraction(h) < self.threshold and not _has(self.own, h):
                buf.append((raw, h))
            if len(buf) >= CHUNK:
                yield from self._flush(buf)
                buf = []
        yield from self._flush(buf)

    def _flush(self, buf: list[tuple[RawLine, str]]) -> Iterator[RawLine]:
        held = self.index.heldout([h for _, h in buf]) if self.index is not None and buf else set()
        return (raw for raw, h in buf if h not in held)


def _seed(settings: Settings, files: BatchFiles, own_lines: int, *tail: Any) -> int:
    key = ":".join(str(x) for x in (settings.train.seed, files.dir.name, own_lines, *tail))
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


def _pick(rng: random.Random, n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``: each once while k <= n, then every one again (no more than needed)."""
    if n <= 0 or k <= 0:
        return []
    full, rest = divmod(k, n)
    return list(range(n)) * full + rng.sample(range(n), rest)


def draw_replay(files: BatchFiles, settings: Settings, skip: set[str], own: array, own_lines: int, log: Any, *,
                heal: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw into replay.jsonl (module docstring); returns what split.json records: lines, from
    which batches, how many were eligible, the store's threshold, and the healing try's share."""
    rp = settings.replay
    k_uniform = min(round(rp.fraction * own_lines), int(rp.max_fraction * own_lines)) if rp.fraction > 0 else 0
    k_heal = round(float(heal["fraction"]) * int(heal["try"]) * own_lines) if heal else 0
    empty = {"lines": 0, "sources": {}, "eligible": 0, "threshold": None}
    if heal:
        empty["heal"] = {"try": heal["try"], "targets": heal.get("targets", []), "lines": 0}
    if k_uniform + k_heal <= 0:
        return empty
    store = Store.open(RootLayout(settings.root).replay)
    index = EvalMemory.open_readonly(RootLayout(settings.root).evalsets)
    try:
        eligible = _Eligible(skip, own, store.threshold, index)
        counts: list[tuple[int, Path, int]] = []
        for b, path in store.usable(log):
            lines = read_checked(path, store.files[b].sha256, log)
            if lines is not None:
                counts.append((b, path, sum(1 for _ in eligible(lines))))
        total = sum(c for _, _, c in counts)
        if total == 0:
            return {**empty, "threshold": store.threshold}
        rng = random.Random(_seed(settings, files, own_lines))
        chosen = Counter(sorted(rng.sample(range(total), min(k_uniform, total))))
        targeted = _targets(counts, heal, k_heal, random.Random(_seed(settings, files, own_lines, "heal", heal["try"]))
                            if heal else rng, total)
        chosen.update(targeted)
        sources = _write(files, counts, chosen, eligible,
                         random.Random(_seed(settings, files, own_lines, "order", heal["try"] if heal else 0)))
    finally:
        if index is not None:
            index.close()
    k = sum(chosen.values())
    out = {"lines": k, "sources": sources, "eligible": total, "threshold": store.threshold}
    if heal:
        out["heal"] = {"try": heal["try"], "targets": heal.get("targets", []), "lines": len(targeted)}
    log.info("replay_drawn", lines=k, eligible=total, from_batches=len(sources), threshold=store.threshold,
             **({"healing_try": heal["try"], "targeted_lines": len(targeted), "targets": heal.get("targets", [])}
                if heal else {}))
    return out


def _targets(counts: list[tuple[int, Path, int]], heal: dict[str, Any] | None, k: int, rng: random.Random,
             total: int) -> list[int]:
    """The healing try's extra draws, as global eligible-line indexes: from the batches it
    regressed on, or (a suite regressed, or theirs are all gone) from the whole store."""
    if not heal or k <= 0:
        return []
    wanted = set(int(t) for t in heal.get("targets") or [])
    ranges, start = [], 0
    for b, _p, c in counts:
        if b in wanted and c:
            ranges.append((start, c))
        start += c
    n = sum(c for _, c in ranges)
    if n == 0:
        return _pick(rng, total, k)
    out = []
    for i in _pick(rng, n, k):
        for s, c in ranges:
            if i < c:
                out.append(s + i)
                break
            i -= c
    return out


def _write(files: BatchFiles, counts: list[tuple[int, Path, int]], chosen: Counter, eligible: _Eligible,
           rng: random.Random) -> dict[str, int]:
    """Collect the chosen lines (store order, one pass), then write replay.jsonl in shuffled order."""
    sources: dict[str, int] = {}
    staged = files.replay.with_name(f".{files.replay.name}.staged")
    offsets = array("Q")
    i = 0
    with open(staged, "w+b") as out:
        for b, path, _n in counts:
            # The file was just checked; compaction (its only other writer) never runs beside a worker.
            with open_regular(path) as f:
                for raw in eligible(iter_lines(f, MAX_LINE)):
                    copies = chosen.get(i, 0)
                    if copies:
                        data = line_bytes(raw)
                        for _ in range(copies):
                            offsets.append(out.tell())
                            out.write(data)
                        sources[f"{b:06d}"] = sources.get(f"{b:06d}", 0) + copies
                    i += 1
        out.flush()
        order = list(range(len(offsets)))
        rng.shuffle(order)
        tmp = files.replay.with_name(f".{files.replay.name}.tmp")
        with open(tmp, "wb") as dest:
            for j in order:
                out.seek(offsets[j])
                dest.write(out.readline())
            dest.flush()
            os.fsync(dest.fileno())
    os.replace(tmp, files.replay)
    os.unlink(staged)
    return sources
