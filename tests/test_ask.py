"""`trainerd ask` on the tiny model: the answers are gibberish, the plumbing is real — current and
version N resolved from adapters/, the parent from lineage.json, the base without an adapter,
greedy (the same adapter answers the same), exit codes, a clear error for a missing version, and
a CLI process that never imports torch (the model runs in its own child)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from workerutil import sample_lines

pytestmark = pytest.mark.slow


def ask(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", "ask", "--root", str(root), "--max-new-tokens", "6",
                           *args], env=subprocess_env(), capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tiny_model_dir) -> Path:
    """A root with versions 1 and 2 (2 continues 1), published by a real daemon, then stopped."""
    from support.daemon import Daemon

    d = Daemon(tmp_path_factory.mktemp("ask"), tiny_model_dir, gate={"enabled": False})
    d.start()
    try:
        d.drop("one.jsonl", sample_lines(30))
        d.wait_for(lambda: d.state_of("one.jsonl") == "done", 300)
        d.drop("two.jsonl", sample_lines(30, start=100))
        d.wait_for(lambda: d.state_of("two.jsonl") == "done", 300)
    finally:
        assert d.terminate() == 0
    return d.root


def test_current_and_compare(two_versions):
    """Default: current (version 2); --compare adds its parent (version 1, from lineage.json) and the
    base model; each answer equals the one asked alone (greedy)."""
    root = two_versions
    assert json.loads((root / "adapters" / "2" / "lineage.json").read_text())["parent"] == 1
    p = ask(root, "--json", "--compare", "What is two plus two?")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    got = [(a["label"], a["version"], a["adapter"]) for a in out["answers"]]
    assert got == [("version 2 (current)", 2, str(root / "adapters" / "2")),
                   ("parent: version 1", 1, str(root / "adapters" / "1")), ("base", None, None)]
    assert all(0 < a["new_tokens"] <= 6 for a in out["answers"])
    alone = {}
    for v in ("1", "base"):
        q = ask(root, "--json", "--version", v, "What is two plus two?")
        assert q.returncode == 0, q.stderr
        alone[v] = json.loads(q.stdout)["answers"][0]["answer"]
    assert out["answers"][1]["answer"] == alone["1"]
    assert out["answers"][2]["answer"] == alone["base"]
    plain = ask(root, "--compare", "What is two plus two?")
    assert plain.returncode == 0 and "--- version 2 (current)" in plain.stdout and "--- base" in plain.stdout


def test_version_one_compares_with_the_base(two_versions):
    """Version 1's parent is the base model: --compare gives two answers, not three."""
    p = ask(two_versions, "--json", "--version", "1", "--compare", "hello")
    assert p.returncode == 0, p.stderr
    assert [a["label"] for a in json.loads(p.stdout)["answers"]] == ["version 1", "base"]


def test_missing_version_is_a_clear_error_without_torch(two_versions):
    """An unknown version exits 1 naming the versions there are, before any model is loaded: the
    CLI process itself never imports torch."""
    p = ask(two_versions, "--version", "9", "hello")
    assert p.returncode == 1
    assert "no adapter version 9" in p.stderr and "versions: 1, 2" in p.stderr
    code = ("import sys\nfrom trainerd.cli import main\n"
            f"rc = main(['ask', '--root', {str(two_versions)!r}, '--version', '9', 'hi'])\n"
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.split() == ["1", "False"]


def test_no_version_yet_and_a_broken_model(tmp_path, two_versions):
    """A root with nothing published says so (exit 1); a model folder that cannot load exits 78."""
    (tmp_path / "inbox").mkdir()
    p = ask(tmp_path, "hello")
    assert p.returncode == 1 and "no adapter published yet" in p.stderr
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    p = ask(two_versions, "--model", str(broken), "hello")
    assert p.returncode == 78, p.stderr
    assert "cannot load" in p.stderr
