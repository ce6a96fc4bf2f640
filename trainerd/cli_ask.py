"""``trainerd ask [--version N|base] [--compare] "question"``: what an adapter version answers.

The CLI side resolves which adapters answer (``current``, or version N; with ``--compare`` also
its parent from ``adapters/<n>/lineage.json`` and the base model) and starts
``python -m trainerd.worker.ask`` as its own child, in the caller's process tree and memory:
never inside the daemon and its memory budget. It stays torch-free itself; the request goes to
the child as JSON on stdin, the answers come back as JSON lines on stdout.

Exit codes: 0 answered; 1 no such version; 66 not a root; 69 the model process could not answer
(its libraries missing, killed); 78 the model or an adapter cannot be loaded (bad config).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from trainerd.cli_root import config_path, load_settings, subcommand
from trainerd.contract import ExitCode, RootLayout
from trainerd.fsutil import read_json_or_none
from trainerd.modelref import local_dir

__all__ = ["add_commands", "plan"]


class NoSuchVersion(LookupError):
    pass


def _versions(layout: RootLayout) -> list[int]:
    if not layout.adapters.is_dir():
        return []
    return sorted(int(p.name) for p in layout.adapters.iterdir() if p.name.isdigit() and p.is_dir())


def _current(layout: RootLayout) -> int | None:
    try:
        return int(os.readlink(layout.current))
    except (OSError, ValueError):
        return None


def plan(layout: RootLayout, version: str | None, compare: bool) -> tuple[list[dict[str, Any]], str | None]:
    """Who answers, in order (label, version, adapter dir or None for the base), and the base
    model the adapters were trained on (their lineage's ``base_model``), if it says."""
    have = _versions(layout)
    if version == "base":
        # The base the chain was trained on, as the current version's lineage names it.
        cur = _current(layout)
        lin = (read_json_or_none(layout.adapter_dir(cur) / "lineage.json") or {}) if cur is not None else {}
        base = lin.get("base_model")
        return [{"label": "base", "version": None, "adapter": None}], base if isinstance(base, str) else None
    if version is None:
        n = _current(layout)
        if n is None:
            raise NoSuchVersion(f"no adapter published yet under {layout.adapters} "
                                "(`--version base` asks the base model)")
    else:
        try:
            n = int(version)
        except ValueError:
            raise NoSuchVersion(f"--version: a version number or 'base', got {version!r}") from None
    d = layout.adapter_dir(n)
    if n not in have or not (d / "adapter_config.json").is_file():
        listed = ", ".join(map(str, have)) or "none"
        raise NoSuchVersion(f"no adapter version {n} under {layout.adapters} (versions: {listed})")
    lineage = read_json_or_none(d / "lineage.json") or {}
    answers = [{"label": f"version {n}" + (" (current)" if n == _current(layout) else ""), "version": n,
                "adapter": str(d)}]
    if compare:
        parent = lineage.get("parent")
        if parent is not None and (layout.adapter_dir(parent) / "adapter_config.json").is_file():
            answers.append({"label": f"parent: version {parent}", "version": parent,
                            "adapter": str(layout.adapter_dir(parent))})
        answers.append({"label": "base", "version": None, "adapter": None})
    base = lineage.get("base_model")
    return answers, base if isinstance(base, str) else None


def cmd_ask(args: argparse.Namespace) -> int:
    settings = load_settings(config_path(args))
    layout = args.layout
    try:
        answers, trained_on = plan(layout, args.version, args.compare)
    except NoSuchVersion as e:
        print(f"trainerd ask: {e}", file=sys.stderr)
        return ExitCode.FAIL
    # The base the version was trained on, where it is still to be had (a folder, or a cached hub model).
    model_path = args.model or (trained_on if trained_on and local_dir(trained_on) else settings.model.path)
    req = {"model": {"path": str(model_path), "dtype": settings.model.dtype, "device": settings.model.device},
           "question": args.question, "system": args.system, "max_new_tokens": args.max_new_tokens,
           "answers": [{"label": a["label"], "adapter": a["adapter"]} for a in answers]}
    argv = [sys.executable, "-m", "trainerd.worker.ask"]
    p = subprocess.run(argv, input=json.dumps(req), capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("{"))[-2000:]
        print(tail or f"trainerd ask: the model process exited {p.returncode}", file=sys.stderr)
        # 78: the model or an adapter cannot be loaded; anything else: the model process could
        # not answer (its libraries missing, killed for memory): unavailable.
        return ExitCode.CONFIG if p.returncode == ExitCode.CONFIG else ExitCode.UNAVAILABLE
    got = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    for a, g in zip(answers, got):
        g["version"] = a["version"]
    if args.json:
        print(json.dumps({"question": args.question, "model": str(model_path), "answers": got}, indent=2))
        return ExitCode.OK
    for g in got:
        if len(got) > 1:
            print(f"--- {g['label']}")
        print(g["answer"])
    return ExitCode.OK


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = subcommand(sub, "ask", [common], cmd_ask, help="answer a question with current (or version N), greedy",
                   description="Answer a question with an adapter version (greedy decoding), in a child process "
                   "of this command: never inside the daemon or its memory budget. --compare also asks the "
                   "version's parent and the base model, to see what the training changed.",
                   examples=['trainerd ask "What is the capital of France?"',
                             'trainerd ask --version 3 --compare --max-new-tokens 64 "Summarise our refund policy"'])
    s.add_argument("question", help="the user message (quote it)")
    s.add_argument("--version", help="an adapter version, or 'base' (default: current)")
    s.add_argument("--compare", action="store_true", help="also the parent version's and the base model's answers")
    s.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="longest answer in tokens (default 128)")
    s.add_argument("--system", metavar="TEXT", help="a system message before the question")
    s.add_argument("--model", metavar="DIR",
                   help="the base model (a folder or hub id; default: the version's lineage, else model.path)")
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
