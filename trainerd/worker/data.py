"""Streamed data path: JSONL lines -> examples -> chunked tokenization -> fixed-size blocks.

Nothing here holds the file whole and nothing writes a dataset cache: lines are read with a
bound, ``data.chunk_lines`` examples are tokenized per call (one batched call to the fast
tokenizer), and tokens are packed into ``seq_len`` blocks so every training step needs the
same memory.

Every example is rendered to (text, label character spans) and tokenized with offsets, so the
three formats share one path: a token is trained on when it starts inside a label span.

The cursor is exact and O(1) to resume: the byte offset and line number of the first example
not yet fully packed, and how many of its tokens were already packed. Tokenizing an example is
independent of its neighbours, so seeking there and re-tokenizing that one example reproduces
the very next block.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from trainerd.worker.source import Cursor, DataError, Pos, TrainSource
from trainerd.core.replay import content_fraction, line_bytes
from trainerd.core.lines import Example, LineError, RawLine, ScanReport, content_hash, judge

IGNORE_INDEX = -100


@dataclass
class Encoded:
    line: int
    offset: int
    end: int
    ids: list[int]
    labels: list[bool]
    before: Pos | None = None  # the source's position just before this example / just after it
    after: Pos | None = None
    tag: Any = None            # whatever the caller passed along (the evaluation: a content hash)


class Encoder:
    """Render examples to text + label spans and tokenize them in one batched call."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token")
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, ex: Example) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, label spans, append_eos)."""
        if ex.kind == "text":
            return ex.text, [(0, len(ex.text))], True
        if ex.kind == "completion":
            text = ex.prompt + ex.completion
            return text, [(len(ex.prompt), len(text))], True
        if not self.has_chat_template:
            raise _RenderError("the tokenizer has no chat template, so 'messages' lines cannot be used")
        msgs = [{"role": r, "content": c} for r, c in ex.messages]
        try:
            full = self.tok.apply_chat_template(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = self.tok.apply_chat_template(msgs[:i], tokenize=False,
                                                      add_generation_prompt=True) if i else ""
                upto = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                if not (full.startswith(upto) and upto.startswith(before)):
                    raise _RenderError("the chat template is not prefix-stable; cannot locate assistant turns")
                spans.append((len(before), len(upto)))
        except _RenderError:
            raise
        except Exception as e:  # jinja raises TemplateError / others for odd role orders
            raise _RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
        return full, spans, False

    def encode(self, items: list[tuple]) -> tuple[list[Encoded], list[LineError]]:
        """Tokenize ``(raw, example[, before, after[, tag]])`` items in one call."""
        rendered, good, errors = [], [], []
        for item in items:
            raw, ex = item[0], item[1]
            try:
                rendered.append(self.render(ex))
                good.append(item)
            except _RenderError as e:
                errors.append(LineError(raw.number, raw.offset, str(e)))
        if not good:
            return [], errors
        enc = self.tok([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for item, (text, spans, add_eos), ids, offs in zip(good, rendered, enc["input_ids"], enc["offset_mapping"]):
            raw = item[0]
            labels = [any(s <= a < e for s, e in spans) for a, _b in offs]
            ids = list(ids)
            if add_eos:
                ids.append(self.eos_id)
                labels.append(True)
            if not any(labels):
                errors.append(LineError(raw.number, raw.offset, "no trainable tokens after tokenization"))
                continue
            out.append(Encoded(raw.number, raw.offset, raw.end, ids, labels, *item[2:]))
        return out, errors


class _RenderError(Exception):
    pass


def iter_encoded(path: Path, encoder: Encoder, *, max_line_bytes: int, chunk_lines: int,
                 start_offset: int = 0, start_line: int = 0,
                 on_error: Callable[[LineError], None] | None = None,
                 on_line: Callable[..., None] | None = None) -> Iterator[Encoded]:
    """Stream every good line of one file, encoded, ``chunk_lines`` per tokenizer call."""
    yield from TrainSource(path, max_line_bytes=max_line_bytes).encoded(
        encoder, chunk_lines=chunk_lines, start=Pos(offset=start_offset, line=start_line),
        on_error=on_error, on_line=on_line)


def scan(source: TrainSource, encoder: Encoder, *, seq_len: int, chunk_lines: int,
         max_bad_fraction: float, errors_path: Path, max_errors: int,
         should_stop: Callable[[], bool] | None = None, contrib: Path | None = None,
         contrib_threshold: float = 1.0) -> ScanReport:
    """Tokenize the whole training stream once (streamed), counting its tokens for the schedule,
    and judge data.jsonl's lines again (tokenizing can find lines the first split could not: a
    chat template that fails, no trainable token). Every bad line goes to ``errors_path`` as a
    JSON line. ``contrib``: also write the batch's own training lines that encode (those under
    the replay store's ``contrib_threshold``) there, for the store once the batch is published.
    Raises DataError when the file must be rejected."""
    st = os.stat(source.path)
    result = ScanReport(path=str(source.path), size=st.st_size, mtime_ns=st.st_mtime_ns, seq_len=seq_len)
    tmp = errors_path.with_name(f".{errors_path.name}.tmp")
    sink = Contrib(contrib, contrib_threshold) if contrib is not None else None
    try:
        return _scan(source, encoder, result, tmp, errors_path, sink, chunk_lines=chunk_lines,
                     max_bad_fraction=max_bad_fraction, max_errors=max_errors, should_stop=should_stop)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise


def _scan(source: TrainSource, encoder: Encoder, result: ScanReport, tmp: Path, errors_path: Path,
          sink: "Contrib | None", *, chunk_lines: int, max_bad_fraction: float, max_errors: int,
          should_stop: Callable[[], bool] | None) -> ScanReport:
    with open(tmp, "w", encoding="utf-8") as errf:
        def on_error(e: LineError) -> None:
            result.bad += 1
            errf.write(json.dumps(e.as_dict()) + "\n")
            if len(result.errors) < max_errors:
                result.errors.append(e.as_dict())

        def on_line(raw: RawLine, ex: Example | None, err: str | None) -> None:
            result.lines += 1
            if ex is None and err is None:
                result.blank += 1
            if should_stop is not None and result.lines % 4096 == 0 and should_stop():
                raise _Interrupted()

        def tag(raw: RawLine, ex: Example, before: Pos, after: Pos) -> Any:
            return (raw, ex) if after.own != before.own else None  # own lines only, not replayed ones

        for enc in source.encoded(encoder, chunk_lines=chunk_lines, on_error=on_error, on_line=on_line, tag=tag):
            result.tokens += len(enc.ids)
            result.label_tokens += sum(enc.labels)
            if enc.tag is None:
                result.replay_tokens += len(enc.ids)
            elif sink is not None:
                sink.add(*enc.tag)
    os.replace(tmp, errors_path)
    # Held-out and excluded lines are good lines (not trained here, but nothing wrong with them).
    result.good = result.lines - result.bad - result.blank
    judge(result, max_bad_fraction)
    if result.rejected:
        raise DataError(result.reason, result.errors)
    if sink is not None:
        result.contrib = sink.close()
    return result


class Contrib:
    """The batch's own training lines as the replay store keeps them (written as they pass)."""

    def __init__(self, path: Path, threshold: float):
        self.path, self.threshold = path, threshold
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.lines = self.bytes = 0

    def add(self, raw: RawLine, ex: Example) -> None:
        if content_fraction(content_hash(ex)) >= self.threshold:
            return
        data = line_bytes(raw)
        self.f.write(data)
        self.h.update(data)
        self.lines += 1
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"lines": self.lines, "bytes": self.bytes, "sha256": self.h.hexdigest()}

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class _Interrupted(Exception):
    """A stop was requested during the first pass."""


Interrupted = _Interrupted


class BlockStream:
    """Fixed-size token blocks from a cursor on; epochs follow each other seamlessly.

    Each yielded item is ``(input_ids, labels, attention_mask, cursor_after)`` with plain lists
    of length ``seq_len``. The last block of an epoch is padded (labels ignored, attention 0),
    so no token is lost and every block has the same shape. ``source`` is the training stream
    (a path means every good line of that one file).
    """

    def __init__(self, source: TrainSource | Path, encoder: Encoder, *, seq_len: int, max_line_bytes: int,
                 chunk_lines: int, pad_id: int, blocks_per_epoch: int, epochs: int,
                 cursor: Cursor | None = None):
        if not isinstance(source, TrainSource):
            source = TrainSource(Path(source), max_line_bytes=max_line_bytes)
        self.source, self.encoder = source, encoder
        self.seq_len, self.chunk_lines = seq_len, chunk_lines
        self.pad_id, self.blocks_per_epoch, self.epochs = pad_id, blocks_per_epoch, epochs
        self.cursor = cursor or Cursor()

    def __iter__(self) -> Iterator[tuple[list[int], list[int], list[int], Cursor]]:
        cur = Cursor(**self.cursor.as_dict())
        while cur.epoch < self.epochs:
            yield from self._epoch(cur)
            if cur.blocks != self.blocks_per_epoch:
                raise DataError(
                    f"data file changed while training: epoch {cur.epoch + 1} yielded {cur.blocks} blocks, "
                    f"the first pass counted {self.blocks_per_epoch}")
            cur = Cursor(epoch=cur.epoch + 1)

    def _epoch(self, cur: Cursor) -> Iterator[tuple[list[int], list[int], list[int], Cursor]]:
        n = self.seq_len
        queue: deque[list] = deque()  # [Encoded, tokens of it already packed]
        buffered = 0
        first = True
        last_after = cur.pos
        for enc in self.source.encoded(self.encoder, chunk_lines=self.chunk_lines, start=cur.pos):
            pos = 0
            if first:
                first = False
                if cur.token_skip:
                    # The example the checkpoint was in the middle of comes first again.
                    pos = cur.token_skip
                    if enc.before != cur.pos or pos > len(enc.ids):
                        raise DataError(f"data file changed: line {enc.line} is not what the checkpoint says")
            queue.append([enc, pos])
            buffered += len(enc.ids) - pos
            last_after = enc.after
            while buffered >= n:
                yield self._take(queue, n, cur, last_after)
                buffered -= n
        if buffered > 0:
            yield self._take(queue, buffered, cur, last_after)

    def _take(self, queue: deque, count: int, cur: Cursor, last_after: Pos):
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < count:
            enc, pos = queue[0]
            take = min(count - len(ids), len(enc.ids) - pos)
            seg = enc.ids[pos: pos + take]
            ids.extend(seg)
            labels.extend(t if keep else IGNORE_INDEX for t, keep in zip(seg, enc.labels[pos: pos + take]))
            queue[0][1] = pos + take
            if queue[0][1] == len(enc.ids):
                queue.popleft()
        real = len(ids)
        pad = self.seq_len - real
        if pad:
            ids.extend([self.pad_id] * pad)
            labels.extend([IGNORE_INDEX] * pad)
        mask = [1] * real + [0] * pad
        cur.blocks += 1
        if queue:
            enc, pos = queue[0]
            cur.at(enc.before, pos)
        else:
            cur.at(last_after, 0)
        return ids, labels, mask, Cursor(**cur.as_dict())
