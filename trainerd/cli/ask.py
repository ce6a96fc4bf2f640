"""``trainerd ask [--version N|base] [--compare] "question"``: what an adapter version answers;
``trainerd learned [N]``: what version N learned (held-out loss before and after, and one held-out
question answered by it and by what it was trained from).

The CLI side resolves which adapters answer (``current``, or version N; with ``--compare`` also
its parent from ``adapters/<n>/lineage.json`` and the base model) and starts
``python -m trainerd.worker.ask`` as its own child, in the caller's process tree and memory:
never inside the daemon and its memory budget. It stays torch-free itself; the request goes to
the child as JSON on stdin, the answers come back as JSON lines on stdout.

Exit codes: 0 answered; 1 no such version (for ``learned --check``: the held-out loss did not
fall clearly); 66 not a root; 69 the model process could not answer (its libraries missing,
killed); 78 the model or an adapter cannot be loaded (bad config).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainerd.supervisor.views import heldout
from trainerd.cli.root import config_path, load_settings, subcommand
from trainerd.core.contract import ExitCode, RootLayout
from trainerd.core.fsutil import read_json_or_none
from trainerd.core.modelref import local_dir

__all__ = ["add_commands", "learned", "plan"]


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


def _settings_and_layout(args: argparse.Namespace, cmd: str) -> tuple[Any, RootLayout] | int:
    try:
        return load_settings(config_path(args)), args.layout
    except ValueError as e:  # config.ConfigError
        print(f"trainerd {cmd}: {e}", file=sys.stderr)
        return ExitCode.CONFIG


def _answer(settings: Any, answers: list[dict[str, Any]], trained_on: str | None, question: str,
            system: str | None, args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]] | int:
    """(the model folder, one answer per entry of ``answers``) from the child, or an exit code."""
    # The base the version was trained on, where it is still to be had (a folder, or a cached hub model).
    model_path = args.model or (trained_on if trained_on and local_dir(trained_on) else settings.model.path)
    req = {"model": {"path": str(model_path), "dtype": settings.model.dtype, "device": settings.model.device},
           "question": question, "system": system, "max_new_tokens": args.max_new_tokens,
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
    return str(model_path), got


def _print_answers(got: list[dict[str, Any]]) -> None:
    for g in got:
        if len(got) > 1:
            print(f"--- {g['label']}")
        print(g["answer"])


def cmd_ask(args: argparse.Namespace) -> int:
    sl = _settings_and_layout(args, "ask")
    if isinstance(sl, int):
        return sl
    settings, layout = sl
    try:
        answers, trained_on = plan(layout, args.version, args.compare)
    except NoSuchVersion as e:
        print(f"trainerd ask: {e}", file=sys.stderr)
        return ExitCode.FAIL
    out = _answer(settings, answers, trained_on, args.question, args.system, args)
    if isinstance(out, int):
        return out
    model_path, got = out
    if args.json:
        print(json.dumps({"question": args.question, "model": model_path, "answers": got}, indent=2))
        return ExitCode.OK
    _print_answers(got)
    return ExitCode.OK


def learned(layout: RootLayout, version: int | None) -> dict[str, Any]:
    """What ``trainerd learned`` shows of ``version`` (default: current), without the answers:
    its batch, the held-out figures and verdict, and the held-out question to ask."""
    if version is None:
        version = _current(layout)
        if version is None:
            raise NoSuchVersion(f"no adapter published yet under {layout.adapters}")
    lin = read_json_or_none(layout.adapter_dir(version) / "lineage.json")
    if lin is None:
        listed = ", ".join(map(str, _versions(layout))) or "none"
        raise NoSuchVersion(f"no adapter version {version} with a lineage under {layout.adapters} (versions: {listed})")
    shown = lin
    while shown.get("kind") == "rollback" and shown.get("rollback_of") is not None:  # a copy: its source's figures
        shown = read_json_or_none(layout.adapter_dir(shown["rollback_of"]) / "lineage.json") or {}
    batch = shown.get("batch")
    fig = heldout.of_version(layout, shown, batch)
    kept = layout.evalsets / "batches" / f"{layout.batch_name(batch)}.jsonl" if batch is not None else None
    q = heldout.question(kept) if kept is not None else None
    if q is None and fig and fig.get("set") and batch is not None:  # not kept (yet): the batch folder's
        q = heldout.question(layout.batch(batch).dir / str(fig["set"]).split(":", 1)[-1])
    champion = Path(str(shown.get("champion"))).name if shown.get("champion") else None  # None: the base model
    return {"version": version, "kind": lin.get("kind"), "rollback_of": lin.get("rollback_of"),
            "parent": lin.get("parent"), "before": f"version {champion}" if champion else "base",
            "batch": batch, "file": shown.get("file"), "steps": shown.get("steps"), "tokens": shown.get("tokens"),
            "decision": shown.get("decision"), "heldout": fig, "verdict": heldout.describe(fig),
            "learned": heldout.fell_clearly(fig), "question": q}


def _render_learned(info: dict[str, Any], got: list[dict[str, Any]] | None) -> str:
    v, fig, before = info["version"], info["heldout"], info["before"]
    copy = f" (a copy of version {info['rollback_of']})" if info.get("rollback_of") is not None else ""
    lines = [f"version {v}{copy}: batch #{info['batch']} {info['file'] or ''}, {info['steps']} steps, "
             f"{info['tokens']} tokens, {info['decision'] or info['kind']}"]
    if fig and fig.get("change") is not None:
        se = f" ± {fig['stderr']:.3f} (standard error)" if fig.get("stderr") is not None else ""
        lines.append(f"held-out loss  {before} {fig['before']:.3f} -> version {v} {fig['after']:.3f} nats/token: "
                     f"{fig['change']:+.3f}{se}, on {fig['examples']} examples ({fig['tokens']} tokens) never trained on")
    lines.append(f"               {info['verdict']}")
    q = info.get("question")
    if q is None:
        lines.append("held-out question: none (the held-out examples are plain text, or no longer kept)")
        return "\n".join(lines)
    lines.append(f"held-out question (never trained on): {q['question']}")
    lines.append(f"  the file's answer: {q['expected']}")
    for g in got or []:
        lines.append(f"--- {g['label']}")
        lines.append(g["answer"])
    return "\n".join(lines)


def cmd_learned(args: argparse.Namespace) -> int:
    sl = _settings_and_layout(args, "learned")
    if isinstance(sl, int):
        return sl
    settings, layout = sl
    try:
        info = learned(layout, args.version)
    except NoSuchVersion as e:
        print(f"trainerd learned: {e}", file=sys.stderr)
        return ExitCode.FAIL
    got = None
    q = info["question"]
    if q is not None and not args.no_ask:
        answers, trained_on = plan(layout, str(info["version"]), compare=True)
        out = _answer(settings, answers, trained_on, q["question"], q["system"], args)
        if isinstance(out, int):
            return out
        got = out[1]
    if args.json:
        print(json.dumps({**info, "answers": got}, indent=2))
    else:
        print(_render_learned(info, got))
    return ExitCode.FAIL if args.check and not info["learned"] else ExitCode.OK


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
    s = subcommand(sub, "learned", [common], cmd_learned,
                   help="what a version learned: held-out loss before and after, and a held-out question answered",
                   description="What an adapter version learned: its batch's held-out loss before (its champion) "
                   "and after, with the standard error of the change and a verdict, then the first held-out "
                   "question answered by the file, the version, its parent and the base model (in a child "
                   "process, as ask does). --no-ask prints only the figures (no model is loaded).",
                   examples=["trainerd learned", "trainerd learned 3 --no-ask", "trainerd learned --check --no-ask"])
    s.add_argument("version", nargs="?", type=int, help="an adapter version (default: current)")
    s.add_argument("--no-ask", action="store_true", help="only the figures (no model is loaded)")
    s.add_argument("--check", action="store_true",
                   help="exit 1 unless the held-out loss fell beyond noise (by more than t standard errors, "
                        "Student's t at 97.5 %% with n - 1 degrees of freedom: 2.36 for 8 examples)")
    s.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest answer in tokens (default 48)")
    s.add_argument("--model", metavar="DIR",
                   help="the base model (a folder or hub id; default: the version's lineage, else model.path)")
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
