"""The worker's data path on the tiny tokenizer: masking per format, packing, exact cursors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainerd.core.lines import iter_lines, parse_line
from trainerd.worker.data import (IGNORE_INDEX, BlockStream, Cursor, DataError, Encoder, TrainSource, iter_encoded,
                                  scan)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _one(tokenizer, obj) -> tuple[str, list[int], list[bool]]:
    enc = Encoder(tokenizer)
    raw = next(iter_lines(io.BytesIO(json.dumps(obj).encode() + b"\n"), 1 << 20))
    ex, err = parse_line(raw)
    assert err is None
    [e], errors = enc.encode([(raw, ex)])
    assert not errors
    return tokenizer.decode(e.ids), e.ids, e.labels


def _trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, keep in zip(ids, labels) if keep])


def test_text_lines_train_on_every_token_plus_eos(tokenizer):
    """A text line trains on all its tokens and on the eos appended after it."""
    text, ids, labels = _one(tokenizer, {"text": "hello there, fox"})
    assert all(labels) and ids[-1] == tokenizer.eos_token_id
    assert text == "hello there, fox" + tokenizer.eos_token


def test_prompt_completion_trains_on_completion_only(tokenizer):
    """Only the completion (and eos) carry loss; the prompt's tokens are masked."""
    _, ids, labels = _one(tokenizer, {"prompt": "Question: what is two plus two?", "completion": " Answer: four."})
    assert _trained_text(tokenizer, ids, labels) == " Answer: four." + tokenizer.eos_token
    assert not labels[0]


def test_chat_trains_on_assistant_turns_only(tokenizer):
    """Through the chat template, only assistant contents and their end markers carry loss."""
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "I am fine"}, {"role": "user", "content": "and you?"},
            {"role": "assistant", "content": "thank you"}]
    text, ids, labels = _one(tokenizer, {"messages": msgs})
    assert text == tokenizer.apply_chat_template(msgs, tokenize=False)
    trained = _trained_text(tokenizer, ids, labels)
    assert trained == "I am fine<|im_end|>\nthank you<|im_end|>\n"
    assert "hello" not in trained and "be nice" not in trained


def _write(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _stream(path, tokenizer, seq_len, cursor=None, chunk_lines=3, epochs=1, blocks_per_epoch=None):
    if blocks_per_epoch is None:
        total = sum(len(e.ids) for e in iter_encoded(path, Encoder(tokenizer), max_line_bytes=1 << 20,
                                                     chunk_lines=chunk_lines))
        blocks_per_epoch = -(-total // seq_len)
    return BlockStream(path, Encoder(tokenizer), seq_len=seq_len, max_line_bytes=1 << 20, chunk_lines=chunk_lines,
                       pad_id=tokenizer.pad_token_id, blocks_per_epoch=blocks_per_epoch, epochs=epochs,
                       cursor=cursor)


_texts = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                          max_size=40).filter(lambda s: s.strip()), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=_texts, seq_len=st.integers(min_value=1, max_value=24), chunk=st.integers(min_value=1, max_value=5))
def test_packing_loses_no_token(tmp_path, tokenizer, texts, seq_len, chunk):
    """Concatenating the blocks' real tokens gives back exactly every example's tokens, in order."""
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    expected = [t for e in iter_encoded(path, Encoder(tokenizer), max_line_bytes=1 << 20, chunk_lines=chunk)
                for t in e.ids]
    got = []
    for ids, labels, mask, _ in _stream(path, tokenizer, seq_len, chunk_lines=chunk):
        assert len(ids) == len(labels) == len(mask) == seq_len
        n = sum(mask)
        assert all(m == 1 for m in mask[:n]) and all(l == IGNORE_INDEX for l in labels[n:])
        got.extend(ids[:n])
    assert got == expected


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=_texts, seq_len=st.integers(min_value=2, max_value=16), data=st.data())
def test_resuming_from_any_cursor_reproduces_the_rest(tmp_path, tokenizer, texts, seq_len, data):
    """Resuming from the cursor after block k yields exactly the blocks k+1.. of an uninterrupted stream."""
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    full = list(_stream(path, tokenizer, seq_len, epochs=2))
    k = data.draw(st.integers(min_value=0, max_value=len(full) - 1))
    cursor = full[k][3]
    rest = list(_stream(path, tokenizer, seq_len, cursor=Cursor(**cursor.as_dict()), epochs=2,
                        blocks_per_epoch=len(full) // 2))
    assert [b[:3] for b in rest] == [b[:3] for b in full[k + 1:]]


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=400), limit=st.integers(min_value=16, max_value=64))
def test_arbitrary_bytes_never_crash_the_reader(blob, limit):
    """Any byte string reads as lines that are good, blank or bad with a reason; offsets tile the input."""
    pos = 0
    for raw in iter_lines(io.BytesIO(blob), limit):
        assert raw.offset == pos
        pos = raw.end
        ex, err = parse_line(raw)
        assert ex is None or err is None
        assert err is None or isinstance(err, str) and err
    assert pos == len(blob)


def test_valid_lines_are_each_trained_exactly_once(tmp_path, tokenizer):
    """Every valid line between bad ones appears in the block stream once, in order."""
    objs = [{"text": f"line number {i}"} for i in range(30)]
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i, o in enumerate(objs):
            f.write(json.dumps(o) + "\n")
            if i % 7 == 0:
                f.write("{broken\n\n")
    stream_text = tokenizer.decode([t for ids, _, mask, _ in _stream(path, tokenizer, 16) for t, m in
                                    zip(ids, mask) if m])
    for i in range(30):
        assert stream_text.count(f"line number {i}<|im_end|>") == 1


def test_scan_counts_and_records_errors(tmp_path, tokenizer):
    """The first pass counts good, bad and blank lines and writes every bad line to errors.jsonl."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a b c"}\n\n{"oops": 1}\n{"text": "d e"}\n')
    src = TrainSource(path, max_line_bytes=1 << 20)
    sc = scan(src, Encoder(tokenizer), seq_len=4, chunk_lines=2, max_bad_fraction=0.5,
              errors_path=tmp_path / "errors.jsonl", max_errors=10)
    assert (sc.lines, sc.good, sc.bad, sc.blank) == (4, 2, 1, 1)
    assert json.loads((tmp_path / "errors.jsonl").read_text())["line"] == 3
    assert sc.blocks_per_epoch == -(-sc.tokens // 4)
    with pytest.raises(DataError, match="too many bad lines"):
        scan(src, Encoder(tokenizer), seq_len=4, chunk_lines=2, max_bad_fraction=0.2,
             errors_path=tmp_path / "errors.jsonl", max_errors=10)


def test_overlong_line_is_skipped_without_reading_it_whole(tmp_path):
    """A 5 MB line under a 1 KB limit is reported with its length and the next line still parses."""
    path = tmp_path / "d.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"x" * (5 << 20) + b'"}\n{"text": "ok"}\n')
    with open(path, "rb") as f:
        raws = list(iter_lines(f, 1024))
    assert raws[0].data is None and "longer than data.max_line_bytes" in raws[0].error
    assert parse_line(raws[1])[0].text == "ok"


# --- issue 5: arbitrary mixes of good, bad and blank lines -------------------------------------

_good_line = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and "\x00" not in s)),
    st.builds(lambda p, c: {"prompt": p, "completion": c},
              st.text(min_size=1, max_size=15).filter(lambda s: s.strip() and "\x00" not in s),
              st.text(min_size=1, max_size=15).filter(lambda s: s.strip() and "\x00" not in s)),
    st.builds(lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
              st.text(min_size=1, max_size=15).filter(lambda s: s.strip() and "\x00" not in s),
              st.text(min_size=1, max_size=15).filter(lambda s: s.strip() and "\x00" not in s)),
)
_bad_line = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),  # mostly not JSON at all
    st.sampled_from([b"[1, 2]", b'{"text": ""}', b'{"text": 3}', b'{"prompt": "x"}', b"null", b'"text"',
                     b'{"messages": [{"role": "bot", "content": "x"}]}', b'{"text": "a\x00b"}', b"\xff\xfe{}"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(st.tuples(st.just("good"), _good_line), st.tuples(st.just("bad"), _bad_line),
                               st.just(("blank", b"  "))), min_size=1, max_size=14),
       crlf=st.booleans(), bom=st.booleans(), seq_len=st.integers(min_value=1, max_value=24),
       chunk=st.integers(min_value=1, max_value=5))
def test_every_valid_line_is_trained_exactly_once_among_bad_ones(tmp_path, tokenizer, rows, crlf, bom, seq_len,
                                                                 chunk):
    """Whatever mix of good, bad and blank lines (LF or CRLF, with or without a BOM): the blocks'
    real tokens are exactly the good lines' tokens, each line once, in file order; bad lines add none."""
    end = b"\r\n" if crlf else b"\n"
    body = b"".join((json.dumps(v).encode() if kind == "good" else v) + end for kind, v in rows)
    path = tmp_path / "d.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
    good_only = tmp_path / "good.jsonl"
    good_only.write_text("".join(json.dumps(v) + "\n" for kind, v in rows if kind == "good"))
    enc = Encoder(tokenizer)
    # A "bad" draw can happen to be a valid line (e.g. b'{"text":"x"}'): judge by the parser.
    expected_lines = []
    for raw in iter_lines(io.BytesIO(path.read_bytes()), 1 << 20):
        ex, err = parse_line(raw)
        if ex is not None:
            expected_lines.append(raw)
    assert len(expected_lines) >= sum(kind == "good" for kind, _ in rows)
    expected = [t for e in iter_encoded(path, enc, max_line_bytes=1 << 20, chunk_lines=1) for t in e.ids]
    lines_seen = [e.line for e in iter_encoded(path, enc, max_line_bytes=1 << 20, chunk_lines=chunk)]
    assert lines_seen == [r.number for r in expected_lines], "a valid line was dropped or repeated"
    if not expected:
        return
    got = []
    for ids, labels, mask, _ in _stream(path, tokenizer, seq_len, chunk_lines=chunk):
        got.extend(ids[: sum(mask)])
    assert got == expected
    if sum(kind == "good" for kind, _ in rows) == len(expected_lines):  # no accidental good "bad" line
        alone = [t for e in iter_encoded(good_only, enc, max_line_bytes=1 << 20, chunk_lines=1) for t in e.ids]
        assert got == alone, "bad or blank lines changed what the good lines train on"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_full_scan(tmp_path, tokenizer, blob):
    """The worker's first pass (validate + tokenize) on any bytes either accepts the file or rejects it
    with DataError and a reason; it never raises anything else."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(blob)
    try:
        sc = scan(TrainSource(path, max_line_bytes=64), Encoder(tokenizer), seq_len=8, chunk_lines=3,
                  max_bad_fraction=0.5,
                  errors_path=tmp_path / "errors.jsonl", max_errors=5)
    except DataError as e:
        assert e.reason
    else:
        assert sc.good >= 1 and sc.good + sc.bad + sc.blank == sc.lines
