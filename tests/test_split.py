"""The first split: which contents are held out, that they never reach the training stream, and
that the split depends on contents only (not order, not name, not how often a line repeats)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainerd.core.config import from_dict
from trainerd.core.settings import EvalSettings
from trainerd.core.contract import BatchFiles
from trainerd.core.evalmemory import EvalMemory
from trainerd.core.lines import RawLine, content_hash, iter_lines, parse_line
from trainerd.worker.data import BlockStream, Encoder, TrainSource
from trainerd.worker.split import choose_holdout, first_split, holdout_count, load_split

from support.log import ListLog


def _batch(tmp: Path, lines: list[str], name: str = "b") -> BatchFiles:
    files = BatchFiles(tmp / name)
    files.dir.mkdir(parents=True)
    files.data.write_text("\n".join(lines) + "\n")
    return files


def _hash(text: str) -> str:
    return content_hash(parse_line(RawLine(1, 0, len(text), text.encode()))[0])


def _settings(**ev):
    return from_dict({"root": "/r", "eval": ev})


def _line(i: int, word: str = "red") -> str:
    return json.dumps({"prompt": f"Q: what color is item {i}?", "completion": f" {word}"})


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 0), (2, 1), (6, 1), (9, 1), (10, 1), (19, 1), (20, 2),
                                        (100, 10), (640, 64), (10_000, 64)])
def test_holdout_size(n, expected):
    """10% of the distinct contents, at least 1 once there are 2, at most 64, never all of them."""
    assert holdout_count(n, EvalSettings()) == expected


@settings(max_examples=300, deadline=None)
@given(n=st.integers(min_value=0, max_value=5000), fraction=st.floats(min_value=0, max_value=0.5),
       lo=st.integers(min_value=0, max_value=8), extra=st.integers(min_value=0, max_value=100))
def test_holdout_floor_properties(n, fraction, lo, extra):
    """The floor holds for every setting: something is held out once there are two distinct contents
    (when holdout_min >= 1), never all of them, never more than holdout_max, and never less for more."""
    ev = EvalSettings(holdout_fraction=fraction, holdout_min=lo, holdout_max=lo + extra)
    k = holdout_count(n, ev)
    assert 0 <= k <= max(0, n - 1) and k <= ev.holdout_max
    if n >= 2:
        assert k >= min(lo, n - 1)
    assert holdout_count(n + 1, ev) >= k


def test_a_few_distinct_contents_still_hold_one_out(tmp_path):
    """Six questions written forty times each (how people write fact files): one content is held
    out, every copy of it, and the batch is judged on it."""
    files = _batch(tmp_path, [_line(i) for i in range(6)] * 40)
    first_split(files, _settings(), ListLog())
    split = load_split(files)
    assert split.distinct == 6 and len(split.heldout) == 1 and split.heldout_lines == 40
    assert split.own_lines == 200 and split.new_set == "holdout.jsonl" and split.new_set_kind == "new"


def test_a_fact_among_general_text_still_has_a_question_held_out(tmp_path):
    """Eight questions of a fact written four times each among sixteen lines of text written once:
    the holdout takes from both kinds (a question and a line of text), not from the text alone."""
    text = [json.dumps({"text": f"general line {i} about nothing"}) for i in range(16)]
    files = _batch(tmp_path, [_line(i) for i in range(8)] * 4 + text)
    first_split(files, _settings(), ListLog())
    split = load_split(files)
    questions = {_hash(_line(i)) for i in range(8)}
    assert len(split.heldout) == 2 and len(set(split.heldout) & questions) == 1
    assert split.heldout_lines == 4 + 1 and split.own_lines == 48 - 5


@settings(max_examples=200, deadline=None)
@given(repeated=st.integers(min_value=0, max_value=60), once=st.integers(min_value=0, max_value=60))
def test_the_holdout_takes_from_repeated_and_single_contents_alike(repeated, once):
    """Whatever the mix: the overall floor and bound hold, something repeated is held out once there
    are two repeated contents, and the held-out ones are the smallest hashes of their kind."""
    counts = {f"{i:064x}": [i, 3] for i in range(1, repeated + 1)}
    counts.update({f"{i:064x}": [i, 1] for i in range(1000, 1000 + once)})
    ev = EvalSettings()
    held = choose_holdout(counts, ev)
    n = repeated + once
    assert len(held) == len(set(held)) <= max(0, n - 1) and len(held) <= ev.holdout_max
    assert (len(held) >= 1) == (n >= 2)
    rep = [h for h in held if counts[h][1] >= 2]
    assert (len(rep) >= 1) == (repeated >= 2)
    assert rep == sorted(h for h in counts if counts[h][1] >= 2)[:len(rep)]


def test_one_distinct_content_is_judged_on_its_own_lines_as_seen(tmp_path):
    """A file that repeats a single content holds nothing out: all of it trains, and its set is
    that content, marked seen, and the log says why."""
    files = _batch(tmp_path, [_line(1)] * 240)
    log = ListLog()
    first_split(files, _settings(), log)
    split = load_split(files)
    assert split.heldout == () and split.own_lines == 240
    assert (split.new_set, split.new_set_kind) == ("holdout.jsonl", "seen")
    assert files.holdout.read_text().splitlines() == [_line(1)]
    assert "seen" in log.find("data_split")[0]["note"]


def test_history_is_excluded_by_lookup_and_only_this_batchs_hashes_are_recorded(tmp_path):
    """Contents a published batch held out (the shared index) never train again; split.json records
    only this batch's own excluded contents, however many the index holds."""
    root = tmp_path / "root"
    sets = root / "evalsets" / "batches"
    sets.mkdir(parents=True)
    with EvalMemory.open(root / "evalsets") as mem:
        for b in range(1, 41):
            (sets / f"{b:06d}.jsonl").write_text("".join(_line(1000 * b + i, "x") + "\n" for i in range(8)))
            mem.add_batch(b, seen=False)
    files = _batch(tmp_path, [_line(i) for i in range(30)] + [_line(5003, "x"), _line(7001, "x")] * 3)
    first_split(files, from_dict({"root": str(root)}), ListLog())
    split = load_split(files)
    assert set(split.excluded) == {_hash(_line(5003, "x")), _hash(_line(7001, "x"))} and split.excluded_lines == 6
    assert json.loads(files.split.read_text())["excluded"] == sorted(split.excluded)


def test_copies_go_together_and_the_split_is_by_content(tmp_path):
    """Every copy of a held-out content is held out; the held-out ones are the smallest hashes;
    holdout.jsonl has each once; split.json counts what remains to train."""
    lines = [_line(i) for i in range(30)] * 4
    files = _batch(tmp_path, lines)
    rep = first_split(files, _settings(), ListLog())
    assert not rep.rejected
    split = load_split(files)
    hashes = sorted({content_hash(parse_line(r)[0]) for r in iter_lines(open(files.data, "rb"), 1 << 20)},
                    key=lambda h: int(h, 16))
    assert list(split.heldout) == hashes[:3]
    assert split.heldout_lines == 12 and split.own_lines == 120 - 12 and split.new_set == "holdout.jsonl"
    kept = [content_hash(parse_line(r)[0]) for r in iter_lines(open(files.holdout, "rb"), 1 << 20)]
    assert kept == hashes[:3]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(min_value=1, max_value=60), reps=st.integers(min_value=1, max_value=3),
       seed=st.integers(min_value=0, max_value=10_000))
def test_same_split_when_renamed_or_reordered(tmp_path_factory, n, reps, seed):
    """Shuffling the lines, repeating them and renaming the file change nothing about the split."""
    tmp = tmp_path_factory.mktemp("split")
    lines = [_line(i) for i in range(n)]
    shuffled = lines * reps
    random.Random(seed).shuffle(shuffled)
    a, b = _batch(tmp, lines, "a"), _batch(tmp, shuffled, "other-name")
    first_split(a, _settings(), ListLog())
    first_split(b, _settings(), ListLog())
    sa, sb = load_split(a), load_split(b)
    assert sa.heldout == sb.heldout and sa.distinct == sb.distinct == n
    assert sb.own_lines == reps * sa.own_lines


def test_earlier_sets_and_eval_file_contents_are_never_trained(tmp_path):
    """Contents of an earlier batch's set (evalsets.json) and of the batch's own eval file are
    excluded from training; the eval file replaces the automatic holdout."""
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text(_line(1) + "\n" + _line(2) + "\n")
    files = _batch(tmp_path, [_line(i) for i in range(20)])
    files.evalsets.write_text(json.dumps({"sets": [{"name": "batch 000001", "kind": "earlier",
                                                    "path": str(earlier), "sha256": None, "batch": 1}]}))
    files.eval_file.write_text(_line(3) + "\n" + _line(3, "blue") + "\n")
    first_split(files, _settings(), ListLog())
    split = load_split(files)
    assert split.new_set == "eval.jsonl" and split.heldout == ()
    skip = split.skip()
    assert {content_hash(parse_line(r)[0]) for r in iter_lines(open(earlier, "rb"), 1 << 20)} <= skip
    assert split.excluded_lines == 3 and split.own_lines == 17


def test_a_bad_eval_file_rejects_the_batch_naming_it(tmp_path):
    """An eval file whose lines are bad is reported like training lines, with its file name."""
    files = _batch(tmp_path, [_line(i) for i in range(20)])
    files.eval_file.write_text('{"oops": 1}\nnot json\n')
    rep = first_split(files, _settings(), ListLog())
    assert rep.rejected and rep.reason.startswith("eval.jsonl: ")
    errors = [json.loads(x) for x in files.errors.read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in errors] == [("eval.jsonl", 1), ("eval.jsonl", 2)]
    assert not files.split.exists()


def test_held_out_lines_never_reach_the_token_stream(tmp_path, tiny_model_dir):
    """Decoding every training block shows none of the held-out contents, and all the others."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    lines = [json.dumps({"text": f"fox number {i} jumps"}) for i in range(40)] * 2
    files = _batch(tmp_path, lines)
    first_split(files, _settings(), ListLog())
    split = load_split(files)
    src = TrainSource(files.data, max_line_bytes=1 << 20, skip=split.skip(), own_total=split.own_lines)
    enc = Encoder(tok)
    total = sum(len(e.ids) for e in src.encoded(enc, chunk_lines=7))
    stream = BlockStream(src, enc, seq_len=16, max_line_bytes=1 << 20, chunk_lines=7, pad_id=tok.pad_token_id,
                         blocks_per_epoch=-(-total // 16), epochs=1)
    text = "".join(tok.decode([t for t, m in zip(ids, mask) if m]) for ids, _, mask, _ in stream)
    held = {json.loads(x)["text"] for x in files.holdout.read_text().splitlines()}
    assert len(held) == 4
    for i in range(40):
        t = f"fox number {i} jumps"
        assert text.count(t + tok.eos_token) == (0 if t in held else 2), t
