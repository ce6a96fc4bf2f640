"""The evaluation memory: what every candidate is judged on from history, bounded whatever N is.

``root/evalsets/`` keeps every published batch's new set once (``batches/<id>.jsonl``: its held-out
slice, its eval file, or its one "seen" content) and, over them:

- ``memory.db`` (SQLite), the index: every example of those sets (content hash, batch, draw,
  tokens, where its line is), every batch (its draw, whether a rollback abandoned it). It is also
  the *exclusion index*: a content some published batch held out is never trained again — a
  batch's first pass looks its contents up here (:meth:`EvalMemory.heldout`) instead of copying
  every earlier hash into its folder.
- ``memory/v<version>.jsonl`` + ``.json``: the memory itself, a stratified reservoir of at most
  ``eval.memory_examples`` examples and ``eval.memory_tokens`` tokens, materialized once per
  change (the current version and the one before are kept). A batch freezes the version and
  its sha256 at its first start (supervisor/lineage.py): a resume judges on the same bytes.

The reservoir, a pure function of the live batches (so a rollback restores it exactly):
*tier 1* is one example per batch (its smallest draw), batches taken in the order of a draw of
their own — while there is room every batch keeps one, beyond it a uniform sample of batches;
*tier 2* is every other example in the order of its content draw — uniform over all history,
old and new alike. The memory is the longest prefix of tier 1 then tier 2 within both bounds.
Adding a batch can only push members out, never bring an evicted one back, so each update is
O(memory) (the previous version plus the new set) and the champion has measured every member.

Stdlib only: the supervisor writes it (at publish, at rollback, at the upgrade), the worker's
torch-free first pass and its evaluation read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

from trainerd.core.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, open_regular, read_json_or_none
from trainerd.core.lines import content_hash, iter_lines, parse_line
from trainerd.core.replay import content_fraction, line_bytes

__all__ = ["EvalMemory", "MemoryRef", "h64", "read_version"]

MAX_LINE = 1 << 20
CHUNK = 500  # host parameters per IN (...) query (SQLite allows 999 in old builds)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch      INTEGER PRIMARY KEY,
    draw       REAL NOT NULL,             -- tier 1 order: a uniform draw of the batch's own
    rep        TEXT NOT NULL,             -- its tier-1 example: the content with the smallest draw
    seen       INTEGER NOT NULL DEFAULT 0,  -- its set is its own trained lines (one distinct content)
    abandoned  INTEGER NOT NULL DEFAULT 0,  -- a rollback dropped it from the chain
    added_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_live ON batches(abandoned, draw);
CREATE TABLE IF NOT EXISTS examples (
    batch    INTEGER NOT NULL REFERENCES batches(batch),
    hash     TEXT NOT NULL,
    h64      INTEGER NOT NULL,             -- the hash's first 64 bits, signed: the lookup key
    draw     REAL NOT NULL,                -- tier 2 order: content_fraction(hash)
    heldout  INTEGER NOT NULL,             -- 1: never trained (excluded from every later batch)
    tokens   INTEGER,                      -- as the evaluation measured it (NULL: estimated from bytes)
    bytes    INTEGER NOT NULL,
    offset   INTEGER NOT NULL,             -- of its line in evalsets/batches/<batch>.jsonl
    PRIMARY KEY (batch, hash)
);
CREATE INDEX IF NOT EXISTS examples_h64 ON examples(h64);
CREATE INDEX IF NOT EXISTS examples_draw ON examples(draw);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


def h64(h: str) -> int:
    """A content hash's first 64 bits as SQLite's signed INTEGER."""
    return int(h[:16], 16) - (1 << 63)


def _batch_draw(batch: int) -> float:
    return content_fraction(hashlib.sha256(f"trainerd-memory-batch:{batch}".encode()).hexdigest())


def _est_tokens(nbytes: int) -> int:
    # Until an evaluation measured it: ~3.5 bytes a token for English BPE, rounded up (a bound
    # that overestimates only makes the memory a little smaller).
    return -(-nbytes * 2 // 7)


@dataclass(frozen=True)
class MemoryRef:
    """One version of the memory, as a batch freezes it (evalsets.json) and the worker reads it."""

    version: int
    sha256: str
    path: str                      # memory/v<version>.jsonl
    examples: int
    batches: int
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "path": self.path, "examples": self.examples,
                "batches": self.batches, "tokens": self.tokens}


class EvalMemory:
    """``root/evalsets/memory.db`` and the memory's versions (see the module docstring)."""

    def __init__(self, evalsets: Path, db: sqlite3.Connection):
        self.dir, self.db = evalsets, db

    @classmethod
    def open(cls, evalsets: Path) -> "EvalMemory":
        """The writer's side (the supervisor): creates what is missing."""
        (evalsets / "memory").mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(evalsets / "memory.db", isolation_level=None, timeout=30.0)
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return cls(evalsets, db)

    @classmethod
    def open_readonly(cls, evalsets: Path) -> "EvalMemory | None":
        """The reader's side (the worker); None when no batch was ever published into it."""
        path = evalsets / "memory.db"
        if not path.is_file():
            return None
        return cls(evalsets, sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30.0))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "EvalMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _meta(self, name: str) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return json.loads(r[0]) if r else None

    def _set_meta(self, name: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def set_path(self, batch: int) -> Path:
        return self.dir / "batches" / f"{batch:06d}.jsonl"

    # --- the exclusion index ----------------------------------------------------------------

    def heldout(self, hashes: Iterable[str]) -> set[str]:
        """Which of ``hashes`` a published batch held out (and so must never be trained)."""
        todo = list(dict.fromkeys(hashes))
        found: set[str] = set()
        for i in range(0, len(todo), CHUNK):
            part = todo[i:i + CHUNK]
            rows = self.db.execute(f"SELECT hash FROM examples WHERE heldout AND h64 IN ({','.join('?' * len(part))})",
                                   [h64(h) for h in part])
            found.update(r[0] for r in rows)
        return found & set(todo)

    # --- the writer's side --------------------------------------------------------------------

    def has(self, batch: int) -> bool:
        return self.db.execute("SELECT 1 FROM batches WHERE batch=?", (batch,)).fetchone() is not None

    def add_batch(self, batch: int, *, seen: bool, tokens: dict[str, int] | None = None, now: float | None = None) -> int:
        """Index a published batch's set (already at :meth:`set_path`; idempotent). ``tokens``:
        examples' token counts as an evaluation measured them (this set's, and any earlier one's
        still estimated). Returns the examples indexed."""
        tokens = tokens or {}
        if tokens:
            with self.bulk():  # one commit (one fsync), not one per example
                self.db.executemany("UPDATE examples SET tokens=? WHERE h64=? AND hash=? AND tokens IS NULL",
                                    [(int(t), h64(h), h) for h, t in tokens.items()])
        if self.has(batch):
            return 0
        rows: dict[str, tuple] = {}
        with open_regular(self.set_path(batch)) as f:
            for raw in iter_lines(f, MAX_LINE):
                ex, _err = parse_line(raw)
                if ex is None:
                    continue
                h = content_hash(ex)
                if h not in rows:
                    rows[h] = (batch, h, h64(h), content_fraction(h), 0 if seen else 1, tokens.get(h),
                               len(line_bytes(raw)), raw.offset)
        if not rows:
            return 0
        rep = min(rows, key=lambda h: (rows[h][3], h))
        with self.bulk():
            self.db.execute("INSERT INTO batches(batch, draw, rep, seen, added_at) VALUES (?,?,?,?,?)",
                            (batch, _batch_draw(batch), rep, int(seen), now if now is not None else time.time()))
            self.db.executemany("INSERT INTO examples(batch, hash, h64, draw, heldout, tokens, bytes, offset)"
                                " VALUES (?,?,?,?,?,?,?,?)", rows.values())
        return len(rows)

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """One transaction (one fsync) for everything inside; nested, it joins the outer one. The
        upgrade of a root with 10,000 sets commits once, not 10,000 times."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def abandon(self, batches: Iterable[int]) -> None:
        """A rollback: these batches leave the memory (they stay in the exclusion index)."""
        with self.bulk():
            self.db.executemany("UPDATE batches SET abandoned=1 WHERE batch=?", [(b,) for b in batches])

    def select(self, max_examples: int, max_tokens: int) -> list[tuple[int, str, int, int]]:
        """The reservoir now: (batch, hash, tokens, offset) in priority order (module docstring)."""
        out: list[tuple[int, str, int, int]] = []
        used = 0
        # CROSS JOIN fixes the loop order (SQLite never reorders it) and ``abandoned = 0`` can use
        # batches_live: tier 1 walks the live batches in draw order and stops at the bound. As a
        # plain JOIN with ``NOT abandoned`` the planner scanned every example of history and sorted
        # (0.47 s per publish at N = 10,000 x 64, growing with N; benchmarks/gate_scaling.py).
        q1 = ("SELECT b.batch, e.hash, e.offset, e.bytes, e.tokens FROM batches b CROSS JOIN examples e"
              " ON e.batch = b.batch AND e.hash = b.rep WHERE b.abandoned = 0 ORDER BY b.draw LIMIT ?")
        q2 = ("SELECT e.batch, e.hash, e.offset, e.bytes, e.tokens FROM examples e JOIN batches b"
              " ON b.batch = e.batch WHERE NOT b.abandoned AND e.hash <> b.rep ORDER BY e.draw LIMIT ?")
        for sql in (q1, q2):
            for batch, h, offset, nbytes, tok in self.db.execute(sql, (max_examples,)):
                t = tok if tok is not None else _est_tokens(nbytes)
                if len(out) >= max_examples or used + t > max_tokens:
                    return out
                out.append((batch, h, t, offset))
                used += t
        return out

    def current(self) -> MemoryRef | None:
        d = self._meta("current")
        return MemoryRef(**d) if d else None

    def refresh(self, max_examples: int, max_tokens: int, log: Any) -> MemoryRef | None:
        """Materialize the reservoir as a new version if it changed; the current one either way."""
        members = self.select(max_examples, max_tokens)
        cur = self.current()
        old = read_json_or_none(self.dir / cur.path.replace(".jsonl", ".json")) if cur else None
        if cur is not None and old is not None and [tuple(x) for x in old["examples"]] == [(b, h) for b, h, _, _ in members]:
            return cur
        if cur is None and not members:
            return None
        version = (cur.version if cur else 0) + 1
        lines = self._lines(members, cur)
        data = b"".join(lines)
        name = f"memory/v{version:08d}"
        atomic_write_bytes(self.dir / f"{name}.jsonl", data)
        sha = hashlib.sha256(data).hexdigest()
        ref = MemoryRef(version, sha, f"{name}.jsonl", len(members), len({b for b, _, _, _ in members}),
                        sum(t for _, _, t, _ in members))
        atomic_write_json(self.dir / f"{name}.json", {**ref.as_dict(), "examples": [[b, h] for b, h, _, _ in members]})
        fsync_dir(self.dir / "memory")
        self._set_meta("current", ref.as_dict())
        self._prune(version)
        log.info("eval_memory_updated", version=version, examples=ref.examples, batches=ref.batches,
                 tokens=ref.tokens, sha256=sha)
        return ref

    def _lines(self, members: list[tuple[int, str, int, int]], cur: MemoryRef | None) -> list[bytes]:
        """Each member's line: from the current version where it is one (one sequential read),
        else from its batch's set (the new batch, or every one after a rollback)."""
        have: dict[tuple[int, str], bytes] = {}
        if cur is not None:
            for (b, h), line in zip(_pairs(self.dir / cur.path.replace(".jsonl", ".json")),
                                    _raw_lines(self.dir / cur.path)):
                have[(b, h)] = line
        out = []
        for b, h, _t, offset in members:
            line = have.get((b, h))
            if line is None:
                with open_regular(self.set_path(b)) as f:
                    line = line_bytes(next(iter_lines(f, MAX_LINE, start_offset=offset)))
            out.append(line)
        return out

    def _prune(self, version: int) -> None:
        """Keep the current version and the one before (a batch frozen on it may still be judged)."""
        for p in (self.dir / "memory").glob("v*.json*"):
            stem = p.name.split(".")[0]
            if stem[1:].isdigit() and int(stem[1:]) < version - 1:
                p.unlink(missing_ok=True)

    def batches(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM batches").fetchone()[0])

    def migrated(self) -> bool:
        return bool(self._meta("migrated"))

    def mark_migrated(self) -> None:
        self._set_meta("migrated", True)


def _pairs(index: Path) -> list[tuple[int, str]]:
    d = read_json_or_none(index) or {}
    return [(int(b), str(h)) for b, h in d.get("examples", [])]


def _raw_lines(path: Path) -> Iterator[bytes]:
    try:
        with open_regular(path) as f:
            for raw in iter_lines(f, MAX_LINE):
                yield line_bytes(raw)
    except OSError:
        return


def read_version(evalsets: Path, ref: dict[str, Any]) -> tuple[list[bytes], list[tuple[int, str]]] | None:
    """A frozen memory version's lines and (batch, hash) of each, if its bytes still match its
    sha256; None otherwise (the caller says why)."""
    path = evalsets / ref["path"]
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        return None
    lines = [ln + b"\n" for ln in data.split(b"\n")[:-1]]
    pairs = _pairs(path.with_suffix(".json"))
    return (lines, pairs) if len(pairs) == len(lines) else None


def memory_root(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "evalsets"
