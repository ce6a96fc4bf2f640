"""The evaluation memory (trainerd/core/evalmemory.py): bounded, stratified, uniform over old and new,
updated at publish in O(memory), rolled back exactly, and the shared index of held-out contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.log import ListLog
from trainerd.core.evalmemory import EvalMemory, read_version
from trainerd.core.lines import RawLine, content_hash, parse_line


def _line(b: int, i: int) -> str:
    return json.dumps({"prompt": f"Q: fact {i} of batch {b}?", "completion": f" answer {b}-{i}"})


def _hash(text: str) -> str:
    return content_hash(parse_line(RawLine(1, 0, len(text), text.encode()))[0])


def publish(evalsets: Path, mem: EvalMemory, b: int, n: int, *, seen: bool = False) -> list[str]:
    """A published batch's set of ``n`` examples, kept and indexed as filing does it."""
    path = evalsets / "batches" / f"{b:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [_line(b, i) for i in range(n)]
    path.write_text("".join(x + "\n" for x in lines))
    mem.add_batch(b, seen=seen, tokens={_hash(x): 20 for x in lines})
    return lines


def _open(path: Path) -> EvalMemory:
    m = EvalMemory.open(path)
    m.db.execute("PRAGMA synchronous=OFF")  # these tests check the selection, not durability: no fsync each
    return m


@pytest.fixture
def mem(tmp_path):
    m = _open(tmp_path / "evalsets")
    yield m
    m.close()


def members(m: EvalMemory, cap: int = 100, tokens: int = 10**9) -> list[tuple[int, str]]:
    return [(b, h) for b, h, _, _ in m.select(cap, tokens)]


def test_bounded_and_every_batch_kept_while_there_is_room(tmp_path, mem):
    """40 batches of 1 to 8 examples under a bound of 100: exactly 100 members, every batch among
    them, and the rest shared in proportion to the batches' sizes (uniform over examples)."""
    sizes = {b: 1 + (b * 5) % 8 for b in range(1, 41)}
    for b, n in sizes.items():
        publish(tmp_path / "evalsets", mem, b, n)
    got = members(mem, 100)
    assert len(got) == 100 == len(set(got))
    assert {b for b, _ in got} == set(sizes)
    by = {b: sum(1 for x, _ in got if x == b) for b in sizes}
    assert all(by[b] <= sizes[b] for b in sizes)


def test_past_its_bound_the_memory_is_a_uniform_sample_of_batches_old_and_new(tmp_path, mem):
    """2,000 batches under a bound of 400: one example each from 400 batches, and the old half of
    the chain holds as many of them as the new half (within 4 binomial standard deviations)."""
    with mem.bulk():
        for b in range(1, 2001):
            publish(tmp_path / "evalsets", mem, b, 3)
    got = members(mem, 400)
    batches = [b for b, _ in got]
    assert len(got) == 400 == len(set(batches))
    old = sum(1 for b in batches if b <= 1000)
    assert abs(old - 200) < 4 * (400 * 0.25) ** 0.5, old


def _select_steps(m: EvalMemory, cap: int) -> int:
    """SQLite virtual-machine steps (in hundreds) one selection of ``cap`` members takes."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    m.db.set_progress_handler(tick, 100)
    try:
        assert len(m.select(cap, 10**9)) == cap
    finally:
        m.db.set_progress_handler(None, 0)
    return steps[0]


def test_a_selection_costs_the_same_at_50_and_at_2000_batches(tmp_path):
    """Choosing 64 members walks the index in draw order and stops at the bound: the work is
    the same (within 1.5x) with 50 batches of history as with 2,000, not a scan of every example."""
    steps = {}
    for n in (50, 2000):
        m = _open(tmp_path / f"n{n}")
        with m.bulk():
            for b in range(1, n + 1):
                publish(tmp_path / f"n{n}", m, b, 8)
        steps[n] = _select_steps(m, 64)
        m.close()
    assert steps[2000] <= 1.5 * steps[50], steps


def test_the_token_bound_holds(tmp_path, mem):
    """Examples of 20 tokens under a bound of 250 tokens: 12 members, 240 tokens."""
    for b in range(1, 11):
        publish(tmp_path / "evalsets", mem, b, 4)
    got = mem.select(100, 250)
    assert len(got) == 12 and sum(t for _, _, t, _ in got) == 240


def test_a_publish_only_pushes_members_out(tmp_path, mem):
    """Each new version is a subset of the previous one plus the new set: an evicted example never
    comes back, so the champion has always measured every member it is judged against."""
    previous: set[tuple[int, str]] = set()
    for b in range(1, 120):
        lines = publish(tmp_path / "evalsets", mem, b, 1 + b % 5)
        now = set(members(mem, 60))
        assert now <= previous | {(b, _hash(x)) for x in lines}
        previous = now


def test_versions_are_materialized_frozen_and_checked(tmp_path, mem):
    """refresh writes a new version only when the members change, keeps the current and the one
    before, and read_version returns the lines with their batches, or None once the bytes differ."""
    ev = tmp_path / "evalsets"
    log = ListLog()
    for b in range(1, 5):
        publish(ev, mem, b, 3)
        mem.refresh(8, 10**6, log)
    assert mem.refresh(8, 10**6, log).version == 4 and len(log.find("eval_memory_updated")) == 4
    assert sorted(p.name for p in (ev / "memory").iterdir()) == ["v00000003.json", "v00000003.jsonl",
                                                                  "v00000004.json", "v00000004.jsonl"]
    ref = mem.current().as_dict()
    lines, pairs = read_version(ev, ref)
    assert len(lines) == ref["examples"] == 8 and {b for b, _ in pairs} == {1, 2, 3, 4}
    assert [_hash(x.decode().strip()) for x in lines] == [h for _, h in pairs]
    path = ev / ref["path"]
    path.write_bytes(path.read_bytes().replace(b"answer", b"ANSWER"))
    assert read_version(ev, ref) is None


def test_a_rollback_restores_the_memory_exactly(tmp_path):
    """Abandoning the batches published after K gives the very memory a chain that stopped at K
    has (the members come back from their batches' kept sets)."""
    a, b = _open(tmp_path / "a"), _open(tmp_path / "b")
    try:
        for n in range(1, 61):
            publish(tmp_path / "a", a, n, 2 + n % 3)
            if n <= 35:
                publish(tmp_path / "b", b, n, 2 + n % 3)
        a.refresh(30, 10**6, ListLog())
        a.abandon(range(36, 61))
        ref = a.refresh(30, 10**6, ListLog())
        assert members(a, 30) == members(b, 30)
        lines, pairs = read_version(tmp_path / "a", ref.as_dict())
        assert pairs == members(b, 30) and [_hash(x.decode().strip()) for x in lines] == [h for _, h in pairs]
    finally:
        a.close()
        b.close()


def test_the_shared_index_knows_every_held_out_content_and_no_seen_one(tmp_path, mem):
    """heldout() finds a held-out content of any published batch (evicted from the memory or not),
    and never a "seen" batch's content (that one was trained)."""
    for n in range(1, 300):
        publish(tmp_path / "evalsets", mem, n, 2)
    seen = publish(tmp_path / "evalsets", mem, 300, 1, seen=True)
    asked = [_hash(_line(7, 1)), _hash(_line(299, 0)), _hash(seen[0]), _hash(_line(9999, 0))]
    assert mem.heldout(asked) == {asked[0], asked[1]}


def test_adding_a_batch_twice_changes_nothing(tmp_path, mem):
    """Filing repeats itself after a crash: a second add of the same batch adds nothing."""
    publish(tmp_path / "evalsets", mem, 1, 3)
    assert mem.add_batch(1, seen=False) == 0 and mem.batches() == 1
