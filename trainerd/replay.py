"""The replay store: earlier batches' training lines, kept so new batches can rehearse them.

``root/replay/`` holds one file per published batch (``<id>.jsonl``: its good *training* lines —
never held-out or evaluation contents, never bad lines, never a rejected batch) and
``index.json``: each file's line count, bytes and sha256, and the store's *threshold*.

Bounded by ``replay.max_bytes`` as a uniform reservoir over all history: a line is in the store
iff ``content_fraction(line) < threshold``, where ``content_fraction`` maps its content hash to
[0, 1). Every line ever published has the same chance, whatever its age; when the store grows
past its bound the threshold falls, and every file keeps only the lines under the new one
(:func:`compact`, run by the supervisor in a child process between workers — streaming, bounded
memory, each file replaced atomically). An old batch is thinned, never simply dropped. A file
whose bytes no longer match its sha256 is skipped with a warning, never drawn from.

After a rollback to version K the lines of batches published after K are dropped (marked
abandoned, removed by the next compaction): the rollback says those versions made the adapter
worse, and replaying their lines would teach it again.

Stdlib only: the supervisor, its maintenance child and the worker's torch-free first pass use it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trainerd.fsutil import atomic_write_json, fsync_dir, open_regular, read_json_or_none
from trainerd.lines import RawLine, content_hash, iter_lines, parse_line

__all__ = ["Store", "compact", "content_fraction"]

MAX_LINE = 1 << 20


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

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "bytes": self.bytes, "sha256": self.sha256, "abandoned": self.abandoned}


@dataclass
class Store:
    """``root/replay/`` and its index (read it, change it, write it: the supervisor's side)."""

    dir: Path
    threshold: float = 1.0
    files: dict[int, Entry] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path) -> "Store":
        d = read_json_or_none(folder / "index.json") or {}
        files = {int(k): Entry(**v) for k, v in (d.get("files") or {}).items()}
        return cls(folder, float(d.get("threshold", 1.0)), files)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "index.json", {
            "threshold": self.threshold, "updated_at": time.time(),
            "files": {f"{k:06d}": v.as_dict() for k, v in sorted(self.files.items())}})

    def path(self, batch_id: int) -> Path:
        return self.dir / f"{batch_id:06d}.jsonl"

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.files.values())

    def add(self, batch_id: int, contrib: Path, entry: Entry) -> None:
        """A published batch's lines (a file its worker wrote) join the store: renamed in, indexed."""
        if batch_id in self.files:
            return
        dest = self.path(batch_id)
        if not dest.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            os.rename(contrib, dest)
            fsync_dir(self.dir)
        self.files[batch_id] = entry
        self.save()

    def abandon(self, batch_ids: list[int]) -> None:
        for b in batch_ids:
            if b in self.files:
                self.files[b].abandoned = True
        self.save()

    def over(self, max_bytes: int) -> bool:
        """Does compaction have work: bytes past the bound, lines over the threshold, abandoned files?"""
        return self.bytes > max_bytes or any(e.abandoned for e in self.files.values())

    def lower_threshold(self, max_bytes: int) -> None:
        """Lower the threshold so the kept lines come to ~90% of the bound (headroom for growth)."""
        live = sum(e.bytes for e in self.files.values() if not e.abandoned)
        if live > max_bytes:
            self.threshold *= 0.9 * max_bytes / live
            self.save()

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


def compact(root: Path, max_bytes: int, log: Any) -> None:
    """Rewrite every file to the lines under the threshold, drop abandoned files (streaming, each
    file replaced atomically, the index saved after each)."""
    store = Store.open(root / "replay")
    store.lower_threshold(max_bytes)
    for b, e in sorted(store.files.items()):
        path = store.path(b)
        if e.abandoned:
            path.unlink(missing_ok=True)
            del store.files[b]
            store.save()
            log.info("replay_file_dropped", batch=b, reason="abandoned by a rollback")
            continue
        lines = read_checked(path, e.sha256, log)
        if lines is None:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        h, n, size = hashlib.sha256(), 0, 0
        with open(tmp, "wb") as out:
            for raw in lines:
                ex, _ = parse_line(raw)
                if ex is not None and content_fraction(content_hash(ex)) < store.threshold:
                    data = line_bytes(raw)
                    out.write(data)
                    h.update(data)
                    n, size = n + 1, size + len(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        store.files[b] = Entry(n, size, h.hexdigest())
        store.save()
    log.info("replay_compacted", threshold=store.threshold, bytes=store.bytes, files=len(store.files))


def main(argv: list[str] | None = None) -> int:
    """``python -m trainerd.replay compact ROOT MAX_BYTES``: the supervisor's maintenance child."""
    from trainerd import logs

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3 or args[0] != "compact":
        print("usage: python -m trainerd.replay compact ROOT MAX_BYTES", file=sys.stderr)
        return 2
    logs.configure(fmt="json", stream=sys.stdout)
    compact(Path(args[1]), int(args[2]), logs.get_logger())
    return 0


if __name__ == "__main__":
    sys.exit(main())
