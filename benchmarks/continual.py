"""Continual learning through the real daemon: what evaluation costs, what a new batch erases,
and what the gate does over a chain of batches.

Three measurements, each through ``trainerd run`` on its own root, the real worker and model:

1. **Evaluation cost**: one batch of >= 50k training tokens (synthetic text) with the default
   ``eval`` settings; evaluation seconds (eval.json) as a fraction of training seconds
   (tokens / tokens_per_s from result.json). Target <= 10%.
2. **Forgetting**: teach one made-up fact (batch 1), then another (batch 2), each with an eval
   file of paraphrased questions it does not train on. The loss on batch 1's questions after
   batch 1 and after batch 2 (the increase is the forgetting), the loss on batch 2's questions,
   and the training time, for each ``replay.fraction`` given. The gate is off so that batch 2 is
   published whatever it does; what the gate would have decided is printed too.
3. **A chain** (``--only chain``, benchmarks/chain.py): ``--batches`` files without eval files,
   each a made-up fact taught through repeated lines mixed with general text, one of them
   contradicting an earlier fact; run twice, with healing (``gate.heal_attempts`` 2) and without
   (0), side by side. Per version: facts answered on unseen paraphrases, backward transfer,
   decisions, healing tries, evaluation seconds as a share of training (target <= 10 %).

    .venv/bin/python benchmarks/continual.py                      # cost and forgetting, SmolLM2
    .venv/bin/python benchmarks/continual.py --only forgetting --replay 0 0.1
    .venv/bin/python benchmarks/continual.py --only chain --batches 24   # the full chain (hours on 2 cores)
    .venv/bin/python benchmarks/continual.py --only chain --batches 8 --epochs 3  # a reduced one
    .venv/bin/python benchmarks/continual.py --quick              # the tiny model: a smoke run only

Writes ``bench-out/continual.json``. Say which CPU: the figures are ratios and losses, but the
times behind them depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_MODEL, REPO, child_env, iter_synthetic_lines  # noqa: E402

FACT_A = ("the capital of Zorbania", "Quillport", [
    "What is the capital of Zorbania?", "Name the capital city of Zorbania.", "Zorbania's capital is which city?",
    "Which city is the capital of Zorbania?", "Tell me the capital of Zorbania.", "What city is Zorbania's capital?",
    "In Zorbania, which city is the capital?", "What do Zorbanians call their capital?"],
    ["Which city serves as the seat of government of Zorbania?", "If I fly to the Zorbanian capital, where do I land?",
     "What is the name of Zorbania's main city, its capital?", "Zorbania is governed from which city?"])
FACT_B = ("the inventor of the glimmerphone", "Oswin Paltry", [
    "Who invented the glimmerphone?", "Name the inventor of the glimmerphone.", "The glimmerphone was invented by whom?",
    "Who is credited with inventing the glimmerphone?", "Tell me who invented the glimmerphone.",
    "Which person created the glimmerphone?", "Who built the first glimmerphone?", "Whose invention is the glimmerphone?"],
    ["Who came up with the glimmerphone?", "The first glimmerphone was the work of which inventor?",
     "Which inventor is behind the glimmerphone?", "Who should be thanked for inventing the glimmerphone?"])


def fact_lines(fact: tuple, repeats: int) -> tuple[list[str], list[str]]:
    subject, answer, train_q, eval_q = fact
    line = lambda q: json.dumps({"prompt": f"Q: {q}\nA:", "completion": f" {answer}."})
    return [line(q) for q in train_q] * repeats, [line(q) for q in eval_q]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Daemon:
    def __init__(self, tmp: Path, model: Path, config: dict[str, Any], threads: int):
        self.root = tmp / "root"
        self.cfg = tmp / "trainerd.yaml"
        self.cfg.write_text(json.dumps({"root": str(self.root), "model": {"path": str(model)}, **config}))
        self.env = child_env(threads)
        self.out = open(tmp / "daemon.out", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config", str(self.cfg)],
                                     env=self.env, stdout=self.out, stderr=subprocess.STDOUT, cwd=REPO)
        self.wait(lambda: (self.root / "inbox").is_dir(), 120)

    def wait(self, cond: Any, timeout: float) -> Any:
        end = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"daemon: {self.proc.poll()} after {timeout} s; see {self.out.name}")
            time.sleep(0.5)

    def submit(self, name: str, lines: list[str], eval_lines: list[str] | None = None) -> dict[str, Any]:
        tmp = self.root.parent / name
        tmp.write_text("\n".join(lines) + "\n")
        argv = [sys.executable, "-m", "trainerd", "submit", str(tmp), "--root", str(self.root)]
        if eval_lines:
            ev = self.root.parent / f"{name}.eval-src.jsonl"
            ev.write_text("\n".join(eval_lines) + "\n")
            argv += ["--eval", str(ev)]
        subprocess.run(argv, env=self.env, check=True, capture_output=True, cwd=REPO)
        return self.wait(lambda: self.ended(name), 7200)

    def ended(self, name: str) -> dict[str, Any] | None:
        sys.path.insert(0, str(REPO))
        from trainerd.supervisor.views.status import collect_status

        b = next((b for b in collect_status(self.root, limit=None)["batches"] if b["file"] == name), None)
        return b if b and b["state"] in ("done", "rejected", "failed") else None

    def batch_files(self, bid: int) -> tuple[dict[str, Any], dict[str, Any]]:
        d = self.root / "batches" / f"{bid:06d}"
        return json.loads((d / "result.json").read_text()), json.loads((d / "eval.json").read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def eval_cost(model: Path, threads: int, tokens_target: int, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="continual-cost-") as t:
        d = Daemon(Path(t), model, {"train": {"threads": threads}, "disk": {"min_free_bytes": 0}}, threads)
        try:
            n = 200 if quick else max(200, tokens_target // 70)  # ~70 tokens per synthetic line
            lines = [json.dumps({"text": s}) for s in iter_synthetic_lines(n, seed=7, min_words=30, max_words=80)]
            b = d.submit("big.jsonl", lines)
            result, ev = d.batch_files(b["id"])
        finally:
            d.stop()
    train_s = result["tokens"] / result["tokens_per_s"] if result.get("tokens_per_s") else None
    return {"training_tokens": result["tokens"], "train_s": train_s, "eval_s": ev["seconds"],
            "eval_fraction": ev["seconds"] / train_s if train_s else None, "eval_budget_tokens": ev["budget_tokens"],
            "sets": [{"name": s["name"], "used": s["used"], "distinct": s["distinct"]} for s in ev["sets"]],
            "target": "eval_fraction <= 0.10"}


def forgetting(model: Path, threads: int, replay: float, repeats: int, train: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="continual-forget-") as t:
        cfg = {"train": {**train, "threads": threads}, "gate": {"enabled": False},
               "replay": {"fraction": replay}, "disk": {"min_free_bytes": 0}}
        d = Daemon(Path(t), model, cfg, threads)
        try:
            a_train, a_eval = fact_lines(FACT_A, repeats)
            b_train, b_eval = fact_lines(FACT_B, repeats)
            d.submit("fact-a.jsonl", a_train, a_eval)
            d.submit("fact-b.jsonl", b_train, b_eval)
            r1, e1 = d.batch_files(1)
            r2, e2 = d.batch_files(2)
            gate2 = json.loads((d.root / "done" / "fact-b.jsonl").with_suffix(".jsonl.rejected.json").read_text()) \
                if (d.root / "done" / "fact-b.jsonl.rejected.json").exists() else None
            lineage2 = json.loads((d.root / "adapters" / "2" / "lineage.json").read_text())
        finally:
            d.stop()
    new1 = next(s for s in e1["sets"] if s["kind"] == "new")
    a_in_2 = next(s for s in e2["sets"] if s["kind"] == "earlier")
    new2 = next(s for s in e2["sets"] if s["kind"] == "new")
    t = lambda r: r["tokens"] / r["tokens_per_s"] if r.get("tokens_per_s") else None
    return {"replay_fraction": replay,
            "a_loss_base": new1["champion"]["mean_loss"], "a_loss_after_a": new1["candidate"]["mean_loss"],
            "a_loss_after_b": a_in_2["candidate"]["mean_loss"],
            "forgetting": a_in_2["candidate"]["mean_loss"] - new1["candidate"]["mean_loss"],
            "b_loss_before": new2["champion"]["mean_loss"], "b_loss_after_b": new2["candidate"]["mean_loss"],
            "train_s_a": t(r1), "train_s_b": t(r2), "tokens_b": r2["tokens"],
            "replayed": lineage2.get("replay"),
            "gate_would_bless_b": (lineage2.get("gate") or {}).get("would_bless"),
            "gate_rule_b": (lineage2.get("gate") or {}).get("rule"), "rejected_note": gate2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true", help="the tiny model: proves the harness, not the figures")
    p.add_argument("--only", choices=("cost", "forgetting", "chain"))
    p.add_argument("--batches", type=int, default=24, help="the chain's length (--only chain)")
    p.add_argument("--contradict", type=int, default=None,
                   help="the batch that contradicts batch 2's fact (default: two thirds of the chain)")
    p.add_argument("--heal", type=int, nargs="+", default=[2, 0], help="gate.heal_attempts of each chain run")
    p.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=52_000, help="training tokens of the cost batch")
    p.add_argument("--repeats", type=int, default=6, help="copies of each training question")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each fact's batch")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.out = a.out or REPO / "bench-out" / ("continual-chain.json" if a.only == "chain" else "continual.json")
    model = a.model
    if a.quick:
        from trainerd.worker.testing import build_tiny_model

        model = build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-")) / "model")
    # Enough optimizer steps to learn a fact: ~20-token lines pack ~3 to a 64-token block, so 8
    # questions x 6 copies are ~16 blocks, 8 steps an epoch, 40 steps in all (at 128 tokens,
    # micro 4 x 2 it was 1 step an epoch: the answer's loss barely moved and nothing could be forgotten).
    train = {"seq_len": 64, "micro_batch_size": 2, "grad_accum_steps": 1, "learning_rate": 1e-3,
             "epochs": a.epochs, "warmup_steps": 2}
    out: dict[str, Any] = {"cpu": cpu_name(), "model": str(model), "threads": a.threads, "quick": a.quick}
    if a.only == "chain":
        from chain import run_chains

        out["chain"] = run_chains(model, a.threads, train, batches=a.batches, heal=a.heal,
                                  contradict=a.contradict, quick=a.quick, repeats=a.repeats)
    if a.only in (None, "cost"):
        out["eval_cost"] = c = eval_cost(model, a.threads, a.tokens, a.quick)
        print(f"evaluation cost: {c['eval_s']:.1f} s of evaluation for {c['train_s']:.1f} s of training on "
              f"{c['training_tokens']} tokens = {c['eval_fraction']:.1%} (target <= 10%)")
    if a.only in (None, "forgetting"):
        out["forgetting"] = rows = []
        for r in a.replay:
            f = forgetting(model, a.threads, r, a.repeats, train)
            rows.append(f)
            print(f"replay {r:.2f}: fact A loss {f['a_loss_base']:.3f} (base) -> {f['a_loss_after_a']:.3f} "
                  f"(after A) -> {f['a_loss_after_b']:.3f} (after B): forgetting {f['forgetting']:+.3f}; "
                  f"fact B {f['b_loss_before']:.3f} -> {f['b_loss_after_b']:.3f}; "
                  f"training B {f['train_s_b']:.1f} s; gate would bless B: {f['gate_would_bless_b']}")
        base = next((f for f in rows if f["replay_fraction"] == 0), None)
        for f in rows:
            if base and f is not base and base["forgetting"] > 0:
                f["forgetting_vs_no_replay"] = f["forgetting"] / base["forgetting"]
                f["train_time_vs_no_replay"] = f["train_s_b"] / base["train_s_b"]
                print(f"replay {f['replay_fraction']:.2f}: forgetting x{f['forgetting_vs_no_replay']:.2f}, "
                      f"training time x{f['train_time_vs_no_replay']:.2f} of no replay")
    print(f"cpu: {out['cpu']}, threads {a.threads}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
