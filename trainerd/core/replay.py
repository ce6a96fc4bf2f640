"""The replay store: earlier batches' training lines, kept so new batches can rehearse them.

``root/replay/`` holds one file per published batch (``<id>.jsonl``: its good *training* lines —
never held-out or evaluation contents, never bad lines, never a rejected batch) and
``index.json``: each file's line count, bytes and sha256, and the store's *threshold*.

Bounded by ``replay.max_bytes`` as a uniform reservoir over all history: a line is in the store
iff ``content_fraction(line) < threshold``, where ``content_fraction`` maps its content hash to
[0, 1). Every line ever published has the same chance, whatever its age; when the store grows
past its bound the threshold falls, and every file keeps only the lines under the new one
(:func:`compact`, run by the supervisor in a child process between workers — streaming, bounded
memory). An old batch is thinned, never simply dropped. A file whose bytes no longer match its
sha256 is skipped with a warning, never drawn from.

Compaction is incremental: each run works for at most ``SLICE_S`` seconds and exits, so a worker
runs between two slices (with 10,000 files a whole pass takes minutes). Between slices the store
is consistent: a file not yet thinned holds lines above the threshold, and a draw skips those
(it checks every line against the threshold). A thinned file is written under a new name and the
index switched to it (saved once per slice and every few seconds, not after every file); the old
file goes only after that save, so a crash at any instant leaves every indexed file whole (an
unsaved new file is an orphan the next slice removes). The index is read, changed and written
under ``index.lock``, so the supervisor's add or abandon never loses an entry to a slice.

After a rollback to version K the lines of batches published after K are dropped (marked
abandoned, removed by the next compaction): the rollback says those versions made the adapter
worse, and replaying their lines would teach it again.

Stdlib only: the supervisor, its maintenance child and the worker's torch-free first pass use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trainerd.core.fsutil import atomic_write_json, fsync_dir, open_regular, read_json_or_none
from trainerd.core.lines import RawLine, content_hash, iter_lines, parse_line

__all__ = ["Store", "compact", "content_fraction"]

MAX_LINE = 1 << 20
SLICE_S = 20.0       # one compaction run works at most this long, then a worker may run
SAVE_EVERY_S = 5.0   # ... saving the index this often meanwhile


def content_fraction(h: str) -> float:
    """A content hash as a number in [0, 1): uniform over contents, fixed for each."""
    return int(h[:13], 16) / float(1 << 52)


def line_bytes(raw: RawLine) -> bytes:
    """A line as stored: no BOM, no CR/LF, one newline."""
    data = raw.data or b""
    if raw.offset == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.rstrip(b"\r\n") + b"\n"


@dataclass
class Entry:
    lines: int
    bytes: int
    sha256: str
    abandoned: bool = False
    name: str | None = None          # the file's name (a compaction renames it); None: <id>.jsonl
    threshold: float | None = None   # every line of the file is under this one (None: the store's)

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "bytes": self.bytes, "sha256": self.sha256, "abandoned": self.abandoned,
                "name": self.name, "threshold": self.threshold}


@dataclass
class Store:
    """``root/replay/`` and its index (read it, change it, write it: the supervisor's side)."""

    dir: Path
    threshold: float = 1.0
    files: dict[int, Entry] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path) -> "Store":
        d = read_json_or_none(folder / "index.json") or {}
        threshold = float(d.get("threshold", 1.0))
        files = {int(k): Entry(**v) for k, v in (d.get("files") or {}).items()}
        for e in files.values():
            if e.threshold is None:  # an index from before incremental compaction: all compacted
                e.threshold = threshold
        return cls(folder, threshold, files)

    @contextlib.contextmanager
    def locked(self) -> Iterator["Store"]:
        """The index as it is on disk now, for a change written back before the lock is released."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "index.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fresh = Store.open(self.dir)
            yield fresh
            fresh.save()
            self.threshold, self.files = fresh.threshold, fresh.files

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "index.json", {
            "threshold": self.threshold, "updated_at": time.time(),
            "files": {f"{k:06d}": v.as_dict() for k, v in sorted(self.files.items())}})

    def path(self, batch_id: int) -> Path:
        e = self.files.get(batch_id)
        return self.dir / (e.name if e is not None and e.name else f"{batch_id:06d}.jsonl")

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.files.values())

    def add(self, batch_id: int, contrib: Path, entry: Entry) -> None:
        """A published batch's lines (a file its worker wrote) join the store: renamed in, indexed."""
        if batch_id in self.files:
            return
        dest = self.dir / f"{batch_id:06d}.jsonl"
        if not dest.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            os.rename(contrib, dest)
            fsync_dir(self.dir)
        with self.locked() as now:
            if batch_id not in now.files:
                # Its worker wrote only the lines under the threshold of its day.
                now.files[batch_id] = Entry(entry.lines, entry.bytes, entry.sha256,
                                            threshold=entry.threshold if entry.threshold is not None else now.threshold)

    def abandon(self, batch_ids: list[int]) -> None:
        with self.locked() as now:
            for b in batch_ids:
                if b in now.files:
                    now.files[b].abandoned = True

    def pending(self) -> list[int]:
        """Files compaction must still visit: abandoned ones, and ones with lines above the threshold."""
        return [b for b, e in sorted(self.files.items())
                if e.abandoned or (e.threshold if e.threshold is not None else 1.0) > self.threshold]

    def over(self, max_bytes: int) -> bool:
        """Does compaction have work: bytes past the bound, files to thin, abandoned files?"""
        return self.bytes > max_bytes or bool(self.pending())

    def lower_threshold(self, max_bytes: int) -> None:
        """Lower the threshold so the kept lines come to ~90% of the bound (headroom for growth).
        A file not yet thinned to the threshold counts with what it will keep (its bytes x the
        ratio of the thresholds): a store half-way through its slices is not lowered again."""
        live = sum(e.bytes * min(1.0, self.threshold / (e.threshold or 1.0))
                   for e in self.files.values() if not e.abandoned)
        if live > max_bytes:
            self.threshold *= 0.9 * max_bytes / live

    def usable(self, log: Any) -> Iterator[tuple[int, Path]]:
        """The files a draw may read: indexed, not abandoned (their sha256 is checked as they are read)."""
        for b, e in sorted(self.files.items()):
            if not e.abandoned and self.path(b).exists():
                yield b, self.path(b)


def read_checked(path: Path, sha256: str, log: Any) -> Iterator[RawLine] | None:
    """The lines of a store file, if its bytes match ``sha256`` (read twice: checked, then used)."""
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        log.warning("replay_file_unreadable", path=str(path), error=str(e))
        return None
    if h.hexdigest() != sha256:
        log.warning("replay_file_damaged", path=str(path), expected_sha256=sha256, sha256=h.hexdigest(),
                    action="skipped: never trained with wrong bytes")
        return None

    def lines() -> Iterator[RawLine]:
        with open_regular(path) as f:
            yield from iter_lines(f, MAX_LINE)

    return lines()


def _thin(path: Path, dest: Path, entry: Entry, threshold: float, log: Any) -> Entry | None:
    """``path``'s lines under ``threshold`` into ``dest`` (fsynced); None when ``path`` is damaged."""
    lines = read_checked(path, entry.sha256, log)
    if lines is None:
        return None
    h, n, size = hashlib.sha256(), 0, 0
    with open(dest, "wb") as out:
        for raw in lines:
            ex, _ = parse_line(raw)
            if ex is not None and content_fraction(content_hash(ex)) < threshold:
                data = line_bytes(raw)
                out.write(data)
                h.update(data)
                n, size = n + 1, size + len(data)
        out.flush()
        os.fsync(out.fileno())
    return Entry(n, size, h.hexdigest(), name=dest.name, threshold=threshold)


def compact(root: Path, max_bytes: int, log: Any, *, slice_s: float = SLICE_S) -> bool:
    """One slice of compaction (module docstring): lower the threshold if the store is past its
    bound, then thin files and drop abandoned ones for at most ``slice_s``. True when nothing is
    left to do."""
    folder = root / "replay"
    store = Store(folder)
    with store.locked() as now:
        now.lower_threshold(max_bytes)
    t0 = last_save = time.monotonic()
    changed: dict[int, Entry | None] = {}   # batch -> its new entry (None: dropped), not yet saved
    doomed: list[Path] = []                  # files to delete once the index no longer names them
    todo = store.pending()
    _sweep_orphans(store)
    visited = 0
    for b in todo:
        if visited and time.monotonic() - t0 > slice_s:
            break  # (a slice always does one file: every run moves on)
        visited += 1
        e = store.files[b]
        if e.abandoned:
            changed[b] = None
            doomed.append(store.path(b))
            log.info("replay_file_dropped", batch=b, reason="abandoned by a rollback")
        else:
            gen = int(e.name.rsplit("-r", 1)[1].split(".")[0]) + 1 if e.name and "-r" in e.name else 1
            thinned = _thin(store.path(b), folder / f"{b:06d}-r{gen}.jsonl", e, store.threshold, log)
            if thinned is not None:
                changed[b] = thinned
                doomed.append(store.path(b))
        if time.monotonic() - last_save > SAVE_EVERY_S:
            _apply(store, changed, doomed)
            last_save = time.monotonic()
    _apply(store, changed, doomed)
    left = len(store.pending())
    log.info("replay_compacted", threshold=store.threshold, bytes=store.bytes, files=len(store.files),
             visited=visited, left=left, seconds=round(time.monotonic() - t0, 2))
    return left == 0


def _apply(store: Store, changed: dict[int, Entry | None], doomed: list[Path]) -> None:
    """Save the slice's changes (merged into the index as it is now), then delete the old files."""
    if not changed:
        return
    with store.locked() as now:
        for b, e in changed.items():
            if e is None:
                now.files.pop(b, None)
            elif b in now.files:
                now.files[b] = e
    fsync_dir(store.dir)
    for p in doomed:
        p.unlink(missing_ok=True)
    changed.clear()
    doomed.clear()


def _sweep_orphans(store: Store) -> None:
    """Thinned files a crashed slice wrote but never indexed."""
    named = {store.path(b).name for b in store.files}
    for p in store.dir.glob("*-r*.jsonl"):
        if p.name not in named:
            p.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainerd.core.replay compact ROOT MAX_BYTES``: the supervisor's maintenance child."""
    from trainerd.core import logs

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3 or args[0] != "compact":
        print("usage: python -m trainerd.core.replay compact ROOT MAX_BYTES", file=sys.stderr)
        return 2
    logs.configure(fmt="json", stream=sys.stdout)
    compact(Path(args[1]), int(args[2]), logs.get_logger())  # one slice; the daemon starts the next
    return 0


if __name__ == "__main__":
    sys.exit(main())
