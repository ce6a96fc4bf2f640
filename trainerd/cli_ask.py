"""``trainerd ask [--version N|base] [--compare] "question"``: what an adapter version answers;
``trainerd learned [N]``: what version N learned (held-out loss before and after, and one held-out
question answered by it and by what it was trained from).

The CLI side resolves which adapters answer (``current``, or version N; with ``--compare`` also
its parent from ``adapters/<n>/lineage.json`` and the base model) and starts
``python -m trainerd.worker.ask`` as its own child, in the caller's process tree and memory:
never inside the daemon and its memory budget. It stays torch-free itself; the request goes to
the child as JSON on stdin, the answers come back as JSON lines on stdout.

Exit codes: 0 answered; 1 no such version (or no root, or the child failed; for ``learned
--check``: the held-out loss did not fall clearly); 78 the model or an adapter cannot be loaded
(bad config).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainerd import heldout
from trainerd.contract import ExitCode, RootLayout
from trainerd.fsutil import read_json_or_none

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
    from trainerd.cli import _config_path, _load_settings, _root

    try:
        return _load_settings(_config_path(args)), RootLayout(_root(args))
    except ValueError as e:  # config.ConfigError
        print(f"trainerd {cmd}: {e}", file=sys.stderr)
        return ExitCode.CONFIG


def _answer(settings: Any, answers: list[dict[str, Any]], trained_on: str | None, question: str,
            system: str | None, args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]] | int:
    """(the model folder, one answer per entry of ``answers``) from the child, or an exit code."""
    model_path = args.model or (trained_on if trained_on and Path(trained_on).is_dir() else settings.model.path)
    req = {"model": {"path": str(model_path), "dtype": settings.model.dtype, "device": settings.model.device},
           "question": question, "system": system, "max_new_tokens": args.max_new_tokens,
           "answers": [{"label": a["label"], "adapter": a["adapter"]} for a in answers]}
    argv = [sys.executable, "-m", "trainerd.worker.ask"]
    p = subprocess.run(argv, input=json.dumps(req), capture_output=True, text=True, check=False)
    if p.returncode != 0:
        tail = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("{"))[-2000:]
        print(tail or f"trainerd ask: the model process exited {p.returncode}", file=sys.stderr)
        return ExitCode.CONFIG if p.returncode == ExitCode.CONFIG else ExitCode.FAIL
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
    s = sub.add_parser("ask", parents=[common], help="answer a question with current (or version N), greedy")
    s.add_argument("question")
    s.add_argument("--version", help="an adapter version, or 'base' (default: current)")
    s.add_argument("--compare", action="store_true", help="also the parent version's and the base model's answers")
    s.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    s.add_argument("--system", help="a system message before the question")
    s.add_argument("--model", help="the base model folder (default: the version's lineage, else model.path)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_ask)
    s = sub.add_parser("learned", parents=[common],
                       help="what a version learned: held-out loss before and after, and a held-out question answered")
    s.add_argument("version", nargs="?", type=int, help="an adapter version (default: current)")
    s.add_argument("--no-ask", action="store_true", help="only the figures (no model is loaded)")
    s.add_argument("--check", action="store_true",
                   help="exit 1 unless the held-out loss fell beyond noise (by more than t standard errors, "
                        "Student's t at 97.5 %% with n - 1 degrees of freedom: 2.36 for 8 examples)")
    s.add_argument("--max-new-tokens", type=int, default=48, help="longest answer in tokens (default 48)")
    s.add_argument("--model", help="the base model folder (default: the version's lineage, else model.path)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_learned)
