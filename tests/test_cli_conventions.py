"""The CLI's conventions: one root check for every command (an error, non-zero, nothing written), a
refused command that changes nothing, --version, help on every command and option, the exit-code
table of docs/cli.md held to the code, the root's search order, and tab completion."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from trainerd.cli.entry import build_parser, main
from trainerd.cli.root import ROOT_ORDER, find_root
from trainerd.core.contract import ExitCode, RootLayout
from trainerd.supervisor.ledger import AttemptRecord, Ledger

REPO = Path(__file__).resolve().parent.parent
GOOD = '{"text": "hello"}\n'

# What each subcommand needs besides the root to get as far as its root check (positionals).
ARGS = {"submit": ["{data}"], "cancel": ["1"], "promote": ["1"], "rollback": ["1"], "ask": ["hello?"],
        "validate": ["{data}"]}
NO_ROOT = {"run", "validate"}  # run creates roots; validate reads no root


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (and the folder) with its size and mtime: what "nothing written" compares."""
    if not folder.exists():
        return {}
    out = {".": (0, os.lstat(folder).st_mtime_ns)}
    for p in folder.rglob("*"):
        st = os.lstat(p)
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", *args], env=env or subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def real_root(tmp_path: Path) -> RootLayout:
    """A root a daemon ran on: its ledger (one finished batch), trainerd.pid with the old daemon's pid."""
    layout = RootLayout(tmp_path / "root")
    layout.make()
    led = Ledger(layout.db)
    now = time.time() - 600
    b = led.begin_claim("a.jsonl", 1, now)
    led.finish_claim(b.id, "a" * 64, 1, now)
    n = led.start_attempt(b.id, now, None).attempts
    led.finish(led.decide_done(b.id, layout.adapter_dir, now, attempt=AttemptRecord(n, "done", "done", exit_code=0)),
               now)
    led.close()
    layout.lock.write_text("4242\n")
    os.utime(layout.lock, (now, now))
    return layout


@pytest.mark.parametrize("where", ["missing", "empty", "parent"])
def test_every_subcommand_refuses_a_folder_that_is_not_a_root(tmp_path, real_root, capsys, where):
    """Every subcommand but run and validate, pointed at a missing folder, an empty one or the parent of
    a real root, exits 66 (check: 3, UNKNOWN) naming the folder and what is missing, and writes nothing."""
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD)
    target = {"missing": tmp_path / "no-such-root", "empty": tmp_path / "empty", "parent": real_root.root.parent}[where]
    if where == "empty":
        target.mkdir()
    commands = _subcommands()
    assert set(ARGS) - set(commands) == set()
    for name, parser in commands.items():
        if name in NO_ROOT:
            continue
        required = [a for a in parser._actions if not a.option_strings and a.required and a.dest != "help"]
        assert not required or name in ARGS, f"add {name}'s positional arguments to ARGS"
        before = _snapshot(target)
        argv = [name, "--root", str(target), *(a.format(data=data) for a in ARGS.get(name, []))]
        rc = main(argv)
        out, err = capsys.readouterr()
        said = err if name != "check" else out
        assert rc == (3 if name == "check" else ExitCode.NOINPUT), (name, rc, out, err)
        assert f"{target} is not a trainerd root: " in said and "only `trainerd run` creates a root" in said, (name, said)
        assert ("no such folder" if where == "missing" else "no ledger (state.db) and no inbox/") in said
        assert _snapshot(target) == before, name


def test_validate_needs_no_root_and_writes_nothing_there(tmp_path):
    """validate reads only the files it is given: a non-root --root is ignored and nothing appears there."""
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD)
    (tmp_path / "x").mkdir()
    before = _snapshot(tmp_path / "x")
    assert main(["validate", "--root", str(tmp_path / "x"), str(data)]) == ExitCode.OK
    assert _snapshot(tmp_path / "x") == before


def test_a_refused_cancel_changes_nothing_on_disk(real_root):
    """`trainerd cancel` of a finished batch (and of no batch), with no daemon running, is refused (exit 1)
    and leaves trainerd.pid, the ledger and every file of the root as they were: no .stop, no request."""
    before = _snapshot(real_root.root)
    for batch in ("1", "99"):
        r = _run("cancel", batch, "--root", str(real_root.root))
        assert r.returncode == ExitCode.FAIL and "refused" in r.stderr, r.stderr
    assert real_root.lock.read_text() == "4242\n"
    # Every file and folder as it was (size and mtime; state.db's content too). The root folder's own
    # mtime is not compared: SQLite makes and removes its -wal/-shm beside the ledger while it is open.
    after = _snapshot(real_root.root)
    assert {k: v for k, v in after.items() if k != "."} == {k: v for k, v in before.items() if k != "."}
    assert not real_root.stop.exists() and not any(real_root.requests.iterdir())


def test_version_prints_the_installed_version():
    """`trainerd --version` prints "trainerd X.Y.Z", the distribution's version, and exits 0."""
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout == f"trainerd {version('trainerd')}\n"


def test_every_subcommand_has_a_description_an_example_and_help_on_every_argument():
    """Each subcommand's --help has a description and an example of itself; every option and
    positional argument of every subcommand has help text."""
    for name, parser in _subcommands().items():
        assert parser.description and len(parser.description) > 40, name
        assert parser.epilog and f"trainerd {name}" in parser.epilog.split("examples:", 1)[1], name
        undocumented = [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
        assert undocumented == [], (name, undocumented)
    r = _run("check", "--help")
    assert r.returncode == 0 and "Nagios" in r.stdout and "examples:" in r.stdout


def _doc_table(heading: str) -> dict[int, str]:
    """``code -> name`` from the first table after ``heading`` in docs/cli.md."""
    table: dict[int, str] = {}
    for ln in (REPO / "docs" / "cli.md").read_text().split(heading, 1)[1].splitlines():
        m = re.match(r"\| (\d+) \| (\w+) \|", ln)
        if m:
            table[int(m.group(1))] = m.group(2)
        elif table and not ln.startswith("|"):
            break
    return table


def test_the_exit_code_table_is_the_codes_the_cli_uses():
    """docs/cli.md's exit-code table lists exactly the codes the CLI's modules return (plus argparse's
    2), each under its ExitCode name; check's table is Nagios' four states."""
    used = {2}
    for path in (REPO / "trainerd" / "cli").glob("*.py"):
        used |= {ExitCode[name].value for name in re.findall(r"ExitCode\.([A-Z]+)", path.read_text())}
    table = _doc_table("## Exit codes")
    assert set(table) == used
    assert all(ExitCode(code).name == name for code, name in table.items())
    from trainerd.supervisor.views.health import Severity

    assert _doc_table("## `trainerd check`") == {s.value: s.name for s in Severity}


def test_exit_codes_of_missing_input_and_usage(tmp_path):
    """validate of a missing file is 66 (not 65), of a bad one 65; run without --config is a usage error (2);
    submit --eval with two files is 2; a usage error of check is Nagios' UNKNOWN (3)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    r = _run("validate", str(tmp_path / "missing.jsonl"))
    assert r.returncode == ExitCode.NOINPUT and "missing.jsonl: no such file" in r.stderr
    assert _run("validate", str(bad)).returncode == ExitCode.DATAERR
    env = subprocess_env()
    env.pop("TRAINERD_CONFIG", None)
    assert _run("run", cwd=tmp_path, env=env).returncode == ExitCode.USAGE
    layout = RootLayout(tmp_path / "root")
    layout.make()
    assert main(["submit", "--root", str(layout.root), "--eval", str(bad), str(bad), str(bad)]) == ExitCode.USAGE
    assert main(["submit", "--root", str(layout.root), str(tmp_path / "gone.jsonl")]) == ExitCode.NOINPUT
    assert _run("check", "--no-such-flag").returncode == 3
    assert _run("status", "--no-such-flag").returncode == 2


def test_the_root_search_order_is_the_documented_one(tmp_path, monkeypatch):
    """--root beats $TRAINERD_ROOT beats the config's root beats the current folder (when it is a root)
    beats /var/lib/trainerd; --root's help, docs/cli.md and docs/operating.md say that same order."""
    roots = {k: tmp_path / k for k in ("flag", "env", "config", "cwd")}
    for r in roots.values():
        RootLayout(r).make()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"root: {roots['config']}\n")
    monkeypatch.chdir(roots["cwd"])
    monkeypatch.setenv("TRAINERD_ROOT", str(roots["env"]))
    ns = argparse.Namespace
    assert find_root(ns(root=str(roots["flag"]), config=str(cfg)))[0] == roots["flag"]
    assert find_root(ns(root=None, config=str(cfg)))[0] == roots["env"]
    monkeypatch.delenv("TRAINERD_ROOT")
    assert find_root(ns(root=None, config=str(cfg)))[0] == roots["config"]
    assert find_root(ns(root=None, config=None))[0] == roots["cwd"]
    monkeypatch.chdir(tmp_path)
    assert find_root(ns(root=None, config=None))[0] == Path("/var/lib/trainerd")
    flat = lambda s: " ".join(s.replace("`", "").split())  # noqa: E731
    assert flat(ROOT_ORDER) in flat((REPO / "docs" / "cli.md").read_text())
    assert flat(ROOT_ORDER) in flat((REPO / "docs" / "operating.md").read_text())
    assert flat(ROOT_ORDER) in flat(_run("status", "--help").stdout)


def test_tab_completion_through_argcomplete(tmp_path):
    """With argcomplete installed (the completion extra), the shell's completion request for
    `trainerd st` answers status, and for `trainerd logs --le` answers --level."""
    pytest.importorskip("argcomplete", reason="the completion extra is not installed (scripts/setup installs it)")
    out = tmp_path / "completions"
    for line, want in (("trainerd st", "status"), ("trainerd logs --le", "--level")):
        env = subprocess_env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                             _ARGCOMPLETE_STDOUT_FILENAME=str(out))
        r = subprocess.run([sys.executable, "-m", "trainerd"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert want in out.read_text().replace("\x0b", " ").split(), out.read_text()


def test_the_distribution_declares_its_license():
    """pyproject's license (Apache-2.0, as transformers and peft) reaches the installed metadata, and
    LICENSE is the Apache License 2.0 text."""
    from importlib.metadata import metadata

    assert metadata("trainerd")["License-Expression"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
