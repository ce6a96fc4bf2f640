"""The quickstart's proof on the real model: held-out loss before and after, and the answers.

Runs ``scripts/quickstart`` itself (the real daemon, the real SmolLM2-135M, ``examples/sample.jsonl``)
once per contender, each on a fresh root, and times it end to end; then ``trainerd learned --json``
on the published adapter: the held-out loss of the base and of adapter 1 on the examples the split
held out, the change and its standard error, and the held-out question answered by both; then
two questions the sample does not touch, asked with ``--compare`` (does the adapter still know
what the base model knew?).

Contenders, run alternately in one invocation so that a shared machine's noise lands on all alike:

- ``quickstart``: ``configs/quickstart.yaml`` (what the README's first command runs);
- ``defaults``: ``configs/trainerd.yaml`` (the production defaults) on the same sample: why the
  quickstart changes a few keys.

``--seeds 1234,7,99`` repeats the quickstart contender with other training seeds (the standard
error covers the choice of held-out examples, not the seed); ``--lrs 2e-3,3e-3`` with other learning
rates. ``--contenders quickstart`` runs one.

    nice -n 10 .venv/bin/python benchmarks/quickstart_proof.py [--seeds 1234] [--out bench-out/quickstart_proof.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info, write_json  # noqa: E402

# Not in the sample: does adapter 1 still know what the base model knew?
GENERAL = ("What is the capital of Italy?", "What is the highest mountain in the world?")
CONFIGS = {"quickstart": REPO / "configs" / "quickstart.yaml", "defaults": REPO / "configs" / "trainerd.yaml"}


def _config(src: Path, root: Path, seed: int | None, lr: float | None, dest: Path) -> Path:
    """``src`` with the root moved under ``root`` and the paths absolute (the copy lives elsewhere)."""
    from trainerd.core.config import load

    raw = yaml.safe_load(src.read_text()) or {}
    raw["root"] = str(root)
    raw.setdefault("model", {})["path"] = load(src).model.path
    if seed is not None:
        raw.setdefault("train", {})["seed"] = seed
    if lr is not None:
        raw.setdefault("train", {})["learning_rate"] = lr
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _events(root: Path) -> list[dict[str, Any]]:
    path = root / "logs" / "trainerd.jsonl"
    out = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(ln))
        except ValueError:
            pass
    return out


def _phases(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds between the worker's milestones, from the log's timestamps."""
    from datetime import datetime

    def at(name: str) -> float | None:
        e = next((e for e in events if e.get("event") == name), None)
        return datetime.fromisoformat(e["timestamp"]).timestamp() if e else None

    marks = {k: at(k) for k in ("worker_started", "training_started", "evaluation_started", "evaluation_done",
                                "adapter_published")}
    out: dict[str, Any] = {}
    pairs = (("worker_to_publish_s", "worker_started", "adapter_published"),
             ("load_and_split_s", "worker_started", "training_started"),
             ("train_s", "training_started", "evaluation_started"),
             ("evaluate_s", "evaluation_started", "evaluation_done"))
    for name, a, b in pairs:
        if marks[a] is not None and marks[b] is not None:
            out[name] = round(marks[b] - marks[a], 1)
    steps = [e for e in events if e.get("event") == "step"]
    if steps:
        last = steps[-1]
        out.update(steps=last.get("total_steps"), tokens=last.get("tokens"), tokens_per_s=last.get("tokens_per_s"),
                   first_step_lr=steps[0].get("lr"), last_step_lr=last.get("lr"), step_lines=len(steps))
    return out


def run_one(name: str, seed: int | None, work: Path, lr: float | None = None) -> dict[str, Any]:
    tag = f"{name}-{seed}-{lr}"
    root = work / tag
    cfg = _config(CONFIGS[name], root / "root", seed, lr, work / f"{tag}.yaml")
    env = {"QUICKSTART_TIMEOUT_S": "7200", **os.environ, "TRAINERD_CONFIG": str(cfg)}  # a busy machine is slow
    t0, ru0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([str(REPO / "scripts" / "quickstart")], cwd=REPO, env=env, capture_output=True, text=True)
    wall, ru1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole tree (daemon, worker, ask): less sensitive than wall time to a busy machine.
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    (work / f"{tag}.out").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        return {"contender": name, "seed": seed, "lr": lr, "rc": p.returncode, "tail": (p.stdout + p.stderr)[-3000:]}
    learned = json.loads(subprocess.run([str(REPO / ".venv" / "bin" / "trainerd"), "learned", "--config", str(cfg),
                                         "--json"], capture_output=True, text=True, check=True).stdout)
    proof = p.stdout[p.stdout.rfind("quickstart: $ trainerd history"):]
    general = {}
    for q in GENERAL:
        out = subprocess.run([str(REPO / ".venv" / "bin" / "trainerd"), "ask", "--config", str(cfg), "--json", "--compare",
                              "--system", "Answer in one sentence.", "--max-new-tokens", "32", q],
                             capture_output=True, text=True, check=True).stdout
        general[q] = {a["label"]: a["answer"] for a in json.loads(out)["answers"]}
    return {"contender": name, "seed": seed, "lr": lr, "rc": 0, "quickstart_s": round(wall, 1), "quickstart_cpu_s": round(cpu, 1),
            **_phases(_events(root / "root")), "heldout": learned["heldout"], "verdict": learned["verdict"],
            "learned": learned["learned"], "question": learned["question"],
            "answers": {a["label"]: a["answer"] for a in learned.get("answers") or []}, "general": general,
            "printed": proof}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contenders", default="quickstart,defaults")
    ap.add_argument("--seeds", default="1234", help="training seeds for the quickstart contender (comma-separated)")
    ap.add_argument("--lrs", default="", help="also the quickstart contender at these learning rates (comma-separated)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "quickstart_proof.json")
    args = ap.parse_args()
    names = [n for n in args.contenders.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    plan: list[tuple[str, int | None, float | None]] = [("quickstart", s, None) for s in seeds if "quickstart" in names]
    plan += [("quickstart", seeds[0], float(x)) for x in args.lrs.split(",") if x and "quickstart" in names]
    if "defaults" in names:
        plan.insert(1, ("defaults", None, None))  # between the quickstart's runs: alternating
    runs = []
    with tempfile.TemporaryDirectory(prefix="quickstart-proof-") as tmp:
        for name, seed, lr in plan:
            r = run_one(name, seed, Path(tmp), lr)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "printed"}), flush=True)
        qs = next((r for r in runs if r["contender"] == "quickstart" and r["lr"] is None and r["rc"] == 0), None)
        if qs:
            print("\nwhat the quickstart printed at its end:\n" + qs["printed"])
    res = {"machine": machine_info(), "runs": runs}
    write_json(args.out, res)
    print(f"written to {args.out}")
    return 0 if runs and all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
