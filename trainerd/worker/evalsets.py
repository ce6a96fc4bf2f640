"""What a candidate is evaluated on, loaded and tokenized: its new set, the evaluation memory,
the standing suites — never more than those, whatever the length of the chain.

- *The new set*: the batch's held-out slice (``holdout.jsonl``), the eval file that came with
  it, or its one distinct content ("seen", a file that could hold nothing out).
- *The memory* (trainerd/core/evalmemory.py): the version frozen in evalsets.json at the batch's first
  start, read once, its bytes checked against the frozen sha256 (else skipped, and the decision
  says history was not judged); every example carries the batch it came from.
- *The suites* (``root/evals/*.jsonl`` as frozen; in a batch frozen before the memory existed,
  the earlier batches' whole sets too).

Each set's distinct contents are taken once, in content-hash order. The memory is judged whole
(its bound is the cost); the new set and the suites share ``eval.max_tokens`` /
``eval.max_fraction`` round-robin in hash order (the new set twice a round, and always at least
its first example), so a subsample is a fixed prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.evalmemory import read_version
from trainerd.core.fsutil import open_regular
from trainerd.core.lines import RawLine, content_hash, iter_lines, parse_line
from trainerd.worker.data import IGNORE_INDEX, Encoder
from trainerd.worker.split import EvalSetRef, frozen_memory, read_evalsets

__all__ = ["EvalSet", "Example", "allocate", "load_new_set", "load_sets"]


@dataclass
class Example:
    hash: str
    ids: list[int]
    labels: list[int]   # -100 where no loss
    batch: int | None = None  # a memory example: the published batch it was held out of

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class EvalSet:
    ref: EvalSetRef
    sha256: str
    examples: list[Example]                 # distinct contents, hash order
    chosen: list[Example] = field(default_factory=list)
    memory: dict[str, Any] | None = None    # the memory's version, when this set is it


def _sha256(path: Path) -> str:
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _encode(raws: list[RawLine], encoder: Encoder, seq_len: int, batches: list[int | None] | None = None
            ) -> list[Example]:
    """The distinct good contents among ``raws``, tokenized, in content-hash order. A content
    longer than seq_len keeps its last seq_len tokens (the answer is at the end)."""
    items: dict[str, tuple] = {}
    for i, raw in enumerate(raws):
        ex, _err = parse_line(raw)
        if ex is not None:
            items.setdefault(content_hash(ex), (raw, ex, batches[i] if batches else None))
    order = sorted(items, key=lambda h: int(h, 16))
    encoded, _errors = encoder.encode([(items[h][0], items[h][1], None, None, h) for h in order])
    out = []
    for enc in encoded:
        ids, keep = enc.ids[-seq_len:], enc.labels[-seq_len:]
        labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]
        if any(k for k in keep[1:]):  # position 0 predicts nothing
            out.append(Example(enc.tag, ids, labels, items[enc.tag][2]))
    return out


def _read_set(path: Path, max_line_bytes: int) -> list[RawLine]:
    with open_regular(path) as f:
        return list(iter_lines(f, max_line_bytes))


def load_new_set(files: BatchFiles, name: str | None, kind: str | None, encoder: Encoder, seq_len: int,
                 max_line_bytes: int) -> EvalSet | None:
    """The batch's own set (``kind`` new or seen), or None when it has none."""
    if not name:
        return None
    path = files.dir / name
    ref = EvalSetRef(name=f"{files.dir.name}:{name}", kind=kind or "new", path=str(path))
    return EvalSet(ref, _sha256(path), _encode(_read_set(path, max_line_bytes), encoder, seq_len))


def _load_memory(files: BatchFiles, root: str, encoder: Encoder, seq_len: int, log: Any) -> EvalSet | None:
    ref = frozen_memory(files)
    if not ref:
        return None
    got = read_version(RootLayout(root).evalsets, ref)
    if got is None:
        log.warning("eval_memory_unusable", version=ref.get("version"), path=ref.get("path"),
                    expected_sha256=ref.get("sha256"),
                    action="history is not judged: the memory's bytes are not the ones this batch was frozen with")
        return None
    lines, pairs = got
    raws = [RawLine(i + 1, 0, 0, line) for i, line in enumerate(lines)]
    examples = _encode(raws, encoder, seq_len, [b for b, _ in pairs])
    s = EvalSet(EvalSetRef(name="memory", kind="memory", path=ref["path"], sha256=ref["sha256"]),
                ref["sha256"], examples, memory=dict(ref))
    s.chosen = list(examples)  # judged whole: its bound is the evaluation's cost
    return s


def load_sets(files: BatchFiles, settings: Any, split: Any, encoder: Encoder, log: Any) -> list[EvalSet]:
    """The new set first, then the memory, then the suites (a damaged or unreadable suite is
    skipped with a warning)."""
    seq_len, max_line = settings.train.seq_len, settings.data.max_line_bytes
    sets = []
    new = load_new_set(files, split.new_set, split.new_set_kind, encoder, seq_len, max_line)
    if new is not None:
        sets.append(new)
    memory = _load_memory(files, settings.root, encoder, seq_len, log)
    if memory is not None:
        sets.append(memory)
    for ref in read_evalsets(files):
        path = Path(ref.path)
        try:
            sha = _sha256(path)
            raws = _read_set(path, max_line)
        except OSError as e:
            log.warning("eval_set_unreadable", set=ref.name, path=ref.path, error=str(e))
            continue
        if ref.sha256 and sha != ref.sha256:
            log.warning("eval_set_damaged", set=ref.name, path=ref.path, expected_sha256=ref.sha256, sha256=sha,
                        action="skipped: its bytes are not the ones it was judged with")
            continue
        sets.append(EvalSet(ref, sha, _encode(raws, encoder, seq_len)))
    return sets


def allocate(sets: list[EvalSet], budget_tokens: int) -> int:
    """Choose the new set's and the suites' examples within ``budget_tokens`` (one model's share):
    round-robin in hash order, the new set taking two turns a round and its first example
    whatever the budget (every batch is judged on something). The memory is already chosen
    whole and is not counted here. Returns the tokens chosen."""
    todo = [s for s in sets if s.ref.kind != "memory"]
    used = 0
    nxt = [0] * len(todo)
    for i, s in enumerate(todo):
        if s.ref.kind in ("new", "seen") and s.examples:
            s.chosen.append(s.examples[0])
            used += s.examples[0].tokens
            nxt[i] = 1
    progress = True
    while progress:
        progress = False
        for i, s in enumerate(todo):
            for _ in range(2 if s.ref.kind in ("new", "seen") else 1):
                if nxt[i] >= len(s.examples):
                    break
                ex = s.examples[nxt[i]]
                if used + ex.tokens > budget_tokens:
                    nxt[i] = len(s.examples)  # this set is full; later ones may still fit smaller examples
                    break
                s.chosen.append(ex)
                used += ex.tokens
                nxt[i] += 1
                progress = True
    return used
