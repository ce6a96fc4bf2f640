"""A chain of batches through the real daemon, as a user writes them: no eval files, made-up facts
taught through a few questions repeated many times, mixed with general text, and one batch that
contradicts an earlier fact. Run by ``benchmarks/continual.py --only chain`` (see its docstring).

Each fact is asked eight ways in training and four other ways never written in any file (the
unseen paraphrases). After the chain, every published version is loaded and scored on every fact
taught before it: *answered* when the greedy answer to an unseen paraphrase is the fact's answer
(every answer token the model's first choice, teacher-forced: what greedy decoding would say).
Backward transfer (BWT, Lopez-Paz & Ranzato 2017) is the mean change, on each fact taught before
the last version, from right after its own batch to the end of the chain (0 = nothing forgotten).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from common import iter_synthetic_lines

TRAIN_Q = ["What is {s}?", "Tell me {s}.", "Do you know {s}?", "Name {s}.", "Which one is {s}?",
           "Say what {s} is.", "I need to know {s}.", "What would you call {s}?"]
UNSEEN_Q = ["Could you remind me what {s} is?", "Quick question: {s}?", "Any idea what {s} is?",
            "I forgot {s}. What is it?"]
_SYL = ["zor", "ban", "quil", "port", "mar", "vex", "tol", "dra", "ny", "sel", "gri", "um", "fal", "ko", "rin",
        "the", "lo", "pa", "wen", "dor", "ix", "ca", "bre", "su"]
_KINDS = ["the capital of {x}", "the inventor of the {x}", "the author of {x}", "the tallest mountain of {x}",
          "the founder of {x}", "the river through {x}"]


def _word(i: int, k: int) -> str:
    return "".join(_SYL[(i * 7 + j * 5 + k) % len(_SYL)] for j in range(3)).capitalize()


def facts(n: int) -> list[tuple[str, str]]:
    """``n`` made-up facts: (subject, answer), names no model has seen."""
    return [(_KINDS[i % len(_KINDS)].format(x=_word(i, 1)), _word(i, 11)) for i in range(n)]


def _line(subject: str, answer: str, q: str) -> str:
    return json.dumps({"prompt": f"Q: {q.format(s=subject)}\nA:", "completion": f" {answer}."})


def batch_lines(subject: str, answer: str, repeats: int, text_lines: int, seed: int) -> list[str]:
    out = [_line(subject, answer, q) for q in TRAIN_Q] * repeats
    out += [json.dumps({"text": t}) for t in iter_synthetic_lines(text_lines, seed=seed, min_words=20, max_words=50)]
    return out


def run_chains(model: Path, threads: int, train: dict[str, Any], *, batches: int, heal: list[int],
               contradict: int | None, quick: bool, repeats: int) -> dict[str, Any]:
    from continual import Daemon

    fs = facts(batches)
    contradict = contradict or max(3, (2 * batches) // 3)
    plan = []  # (file name, fact index it teaches, answer taught)
    for i in range(batches):
        if i + 1 == contradict:
            subject, answer = fs[1]
            plan.append((f"b{i + 1:02d}-contradicts-b02.jsonl", 1, _word(99, 3)))
        else:
            plan.append((f"b{i + 1:02d}.jsonl", i, fs[i][1]))
    out: dict[str, Any] = {"batches": batches, "contradicting_batch": contradict, "runs": []}
    for h in heal:
        with tempfile.TemporaryDirectory(prefix=f"continual-chain-h{h}-") as t:
            cfg = {"train": {**train, "threads": threads}, "gate": {"heal_attempts": h},
                   "disk": {"min_free_bytes": 0}}
            d = Daemon(Path(t), model, cfg, threads)
            try:
                for name, fi, answer in plan:
                    b = d.submit(name, batch_lines(fs[fi][0], answer, repeats, 4 * repeats, seed=fi))
                    print(f"  heal {h}: {name}: {b['state']}", flush=True)
                rows = _collect(d.root, plan)
            finally:
                d.stop()
            scores = _score(model, d.root, fs, rows, quick, threads)
        out["runs"].append(_summarize(h, plan, rows, scores, fs))
    return out


def _collect(root: Path, plan: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """Per batch: decision, healing tries, version, evaluation and training seconds (every try)."""
    from trainerd.supervisor.ledger import Ledger

    led = Ledger.open_readonly(root / "state.db")
    try:
        rows = []
        for b in led.batches():
            attempts = led.attempts(b.id)
            timed = [(a.result or {}).get("tokens", 0) / a.result["tokens_per_s"] for a in attempts
                     if (a.result or {}).get("tokens_per_s")]
            tries = (json.loads((root / "batches" / f"{b.id:06d}" / "tries.json").read_text())["tries"]
                     if (root / "batches" / f"{b.id:06d}" / "tries.json").exists() else [])
            ev = json.loads((root / "batches" / f"{b.id:06d}" / "eval.json").read_text()) \
                if (root / "batches" / f"{b.id:06d}" / "eval.json").exists() else {}
            gate = json.loads(b.gate_json) if b.gate_json else {}
            rows.append({"batch": b.id, "file": b.name, "state": b.state.value, "decision": b.decision,
                         "version": b.adapter_version, "heals": b.heals, "reason": b.last_reason,
                         "verdicts": [t["verdict"] for t in tries] or [gate.get("verdict")],
                         "train_s": sum(timed), "train_s_last_try": timed[-1] if timed else None,
                         "eval_s_last_try": ev.get("seconds"),
                         "memory_examples": next((s["used"] for s in ev.get("sets", []) if s["kind"] == "memory"), 0),
                         "history_changes": _history_changes(ev),
                         "new_set": (gate.get("new") or {}).get("change"),
                         "history": ((gate.get("history") or {}).get("pooled") or {}).get("change")})
        return rows
    finally:
        led.close()


def _history_changes(ev: dict[str, Any]) -> list[float]:
    """The candidate's per-example change of held-out loss (nats/token) on history (the memory,
    earlier sets, suites), paired with the champion's as the gate pairs them: its spread is the
    per-example noise the gate's error rates (README, benchmarks/gate_rates.py) are read against."""
    from trainerd.supervisor.gate import HISTORY_KINDS, _changes

    return [round(d, 5) for s in ev.get("sets", []) if s["kind"] in HISTORY_KINDS for d, _ in _changes(s)]


def _spread(xs: list[float]) -> dict[str, Any]:
    """Standard deviation and the MAD scaled to a normal's sd (x 1.4826): heavy tails part them."""
    import statistics

    if len(xs) < 2:
        return {"examples": len(xs)}
    med = statistics.median(xs)
    return {"examples": len(xs), "mean": statistics.fmean(xs), "sd": statistics.stdev(xs),
            "mad_sd": 1.4826 * statistics.median(abs(x - med) for x in xs),
            "p05": sorted(xs)[len(xs) // 20], "p95": sorted(xs)[(19 * len(xs)) // 20]}


def _score(model: Path, root: Path, fs: list[tuple[str, str]], rows: list[dict[str, Any]], quick: bool,
           threads: int) -> dict[int, dict[int, dict[str, float]]]:
    """version (0 = base) -> fact -> {answered (0..1 over the unseen paraphrases), loss}."""
    import torch

    # The run's threads, not torch's default: at nice 10 on a loaded 2-core machine two OpenMP
    # threads waited on each other and scoring 8 versions ran over 26 min; with 1 it took 173 s.
    torch.set_num_threads(threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    base.eval()
    versions = sorted(r["version"] for r in rows if r["version"])
    out: dict[int, dict[int, dict[str, float]]] = {0: _facts_on(base, tok, fs)}
    peft = None
    for v in versions:
        path = root / "adapters" / str(v)
        if peft is None:
            peft = PeftModel.from_pretrained(base, str(path), adapter_name=f"v{v}")
        else:
            peft.load_adapter(str(path), adapter_name=f"v{v}")
        peft.set_adapter(f"v{v}")
        out[v] = _facts_on(peft, tok, fs)
        peft.delete_adapter(f"v{v}") if v != versions[-1] else None
    return out


def _facts_on(model: Any, tok: Any, fs: list[tuple[str, str]]) -> dict[int, dict[str, float]]:
    import torch

    res = {}
    with torch.no_grad():
        for i, (subject, answer) in enumerate(fs):
            hits, losses = 0, []
            for q in UNSEEN_Q:
                prompt, completion = f"Q: {q.format(s=subject)}\nA:", f" {answer}"
                ids = tok(prompt + completion, return_offsets_mapping=True, add_special_tokens=False)
                start = next(k for k, (a, _b) in enumerate(ids["offset_mapping"]) if a >= len(prompt))
                x = torch.tensor([ids["input_ids"]])
                logits = model(input_ids=x).logits[0]
                target = x[0, start:]
                pred = logits[start - 1:-1]
                hits += int(bool((pred.argmax(-1) == target).all()))
                losses.append(torch.nn.functional.cross_entropy(pred, target).item())
            res[i] = {"answered": hits / len(UNSEEN_Q), "loss": sum(losses) / len(losses)}
    return res


def _summarize(heal: int, plan: list[tuple[str, int, str]], rows: list[dict[str, Any]],
               scores: dict[int, dict[int, dict[str, float]]], fs: list[tuple[str, str]]) -> dict[str, Any]:
    """Per version: facts answered so far; BWT over the chain; decisions; the evaluation's share."""
    by_batch = {r["batch"]: r for r in rows}
    versions, taught = [], []  # taught: facts whose batch was published (not the contradiction)
    for k, (name, fi, answer) in enumerate(plan, start=1):
        r = by_batch[k]
        if r["version"] and answer == fs[fi][1]:
            taught.append((fi, r["version"]))
        v = r["version"]
        if v:
            answered = [scores[v][f]["answered"] for f, _ in taught]
            versions.append({"version": v, "batch": k, "file": name, "decision": r["decision"], "heals": r["heals"],
                             "facts_taught": len(taught), "facts_answered": round(sum(answered), 2),
                             "eval_share": (r["eval_s_last_try"] or 0) / r["train_s_last_try"]
                             if r["train_s_last_try"] else None})
        print(f"  heal {heal}: batch {k:2d} {name:<26} {r['decision'] or r['state']:<9} heals {r['heals']} "
              f"version {v or '-':>3}  facts answered " +
              (f"{versions[-1]['facts_answered']:.2f}/{len(taught)}" if v else "-") +
              (f"  eval/train {versions[-1]['eval_share']:.1%}" if v and versions[-1]['eval_share'] else ""), flush=True)
    last = versions[-1]["version"] if versions else 0
    deltas = [scores[last][f]["answered"] - scores[v][f]["answered"] for f, v in taught if v != last]
    loss_deltas = [scores[last][f]["loss"] - scores[v][f]["loss"] for f, v in taught if v != last]
    shares = [v["eval_share"] for v in versions if v["eval_share"] is not None]
    contra = next((r for r in rows if "contradicts" in r["file"]), None)
    # The spread of history over every published candidate's evaluation (benign changes: a refused
    # candidate's include the contradiction's own effect, which is not noise).
    spread = _spread([d for r in rows if r["version"] for d in r["history_changes"]])
    summary = {"heal_attempts": heal, "versions": versions, "rows": rows,
               "bwt_answered": sum(deltas) / len(deltas) if deltas else None,
               "bwt_loss": sum(loss_deltas) / len(loss_deltas) if loss_deltas else None,
               "facts_answered_at_end": sum(scores[last][f]["answered"] for f, _ in taught) if last else 0,
               "facts_taught": len(taught), "heals": sum(r["heals"] for r in rows),
               "decisions": {d: sum(1 for r in rows if r["decision"] == d) for d in {r["decision"] for r in rows}},
               "contradiction": None if contra is None else {k: contra[k] for k in ("state", "decision", "heals", "reason")},
               "history_spread": spread,
               "eval_share_median": sorted(shares)[len(shares) // 2] if shares else None,
               "eval_share_max": max(shares) if shares else None}
    print(f"heal {heal}: {summary['facts_answered_at_end']:.2f}/{len(taught)} facts answered at the end, "
          f"BWT {summary['bwt_answered']} (answered) {summary['bwt_loss']} (loss), decisions {summary['decisions']}, "
          f"healing tries {summary['heals']}, evaluation/training median {summary['eval_share_median']}, "
          f"max {summary['eval_share_max']}; the contradiction: {summary['contradiction']}", flush=True)
    print(f"heal {heal}: per-example change of history on published candidates: {spread}", flush=True)
    return summary
