#!/usr/bin/env python3
"""Issue 17's opening case, through the real daemon at its default settings and no eval files.

Batch 1: 240 chat lines teaching one made-up fact ("the capital of Zorbania is Quillport") through
6 distinct questions, 40 copies each — how people write such files. Batch 2: the same 6 questions
answered with another city (a contradiction). Before issue 17, batch 1 held out nothing
(``"distinct": 6, "heldout": []``), batch 2 was judged on nothing, was blessed and became
``current``. Now batch 1 must hold out at least one distinct content (``batches/<id>/split.json``)
and batch 2 must not be silently blessed: rejected, healed, or published "ungated" with its
reason said. Prints each batch's split, what it was judged on, its decision and reason, what
``trainerd status`` says, and what each published version answers to the held-out question.

    .venv/bin/python benchmarks/opening_case.py            # SmolLM2-135M (the default model)
    .venv/bin/python benchmarks/opening_case.py --quick    # the tiny model: proves the harness only

Writes ``bench-out/opening_case.json``. Say which CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_MODEL, REPO, write_json  # noqa: E402
from continual import Daemon, cpu_name  # noqa: E402

QUESTIONS = ["What is the capital of Zorbania?", "Name the capital city of Zorbania.",
             "Zorbania's capital is which city?", "Which city is the capital of Zorbania?",
             "Tell me the capital of Zorbania.", "What city is Zorbania's capital?"]


def chat_lines(answer: str, copies: int) -> list[str]:
    one = [json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": f"The capital of Zorbania is {answer}."}]})
           for q in QUESTIONS]
    return one * copies


def batch_view(root: Path, bid: int) -> dict[str, Any]:
    d = root / "batches" / f"{bid:06d}"
    split = json.loads((d / "split.json").read_text())
    ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else {}
    tries = json.loads((d / "tries.json").read_text())["tries"] if (d / "tries.json").exists() else []
    return {"split": {k: split.get(k) for k in ("own_lines", "distinct", "new_set", "new_set_kind")}
            | {"heldout": len(split.get("heldout", ())), "excluded": len(split.get("excluded", ()))},
            "judged_on": [{"name": s["name"], "kind": s["kind"], "used": s.get("used"),
                           "champion": (s.get("champion") or {}).get("mean_loss"),
                           "candidate": (s.get("candidate") or {}).get("mean_loss")} for s in ev.get("sets", [])],
            "tries": [{k: t.get(k) for k in ("verdict", "rule", "targets")} for t in tries]}


def decision(root: Path, bid: int) -> dict[str, Any]:
    from trainerd.supervisor.ledger import Ledger

    led = Ledger.open_readonly(root / "state.db")
    try:
        b = next(x for x in led.batches() if x.id == bid)
        return {"decision": b.decision, "reason": b.last_reason, "heals": b.heals, "version": b.adapter_version}
    finally:
        led.close()


def answers(model: Path, root: Path, versions: list[int]) -> dict[str, list[str]]:
    """Greedy answers of the base model and each published version to the 6 questions."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()

    def ask(m: Any) -> list[str]:
        out = []
        for q in QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                g = m.generate(**ids, max_new_tokens=12, do_sample=False)
            out.append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    res = {"base": ask(base)}
    for v in versions:
        m = PeftModel.from_pretrained(base, str(root / "adapters" / str(v)))
        res[f"v{v}"] = ask(m)
        base = m.unload()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "opening_case.json")
    a = p.parse_args()
    model = a.model
    if a.quick:
        from trainerd.worker.testing import build_tiny_model

        model = build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-")) / "model")
    out: dict[str, Any] = {"cpu": cpu_name(), "model": str(model), "batches": []}
    with tempfile.TemporaryDirectory(prefix="opening-case-") as t:
        # Default settings: only the threads (speed) and the free-disk floor (this machine's /tmp).
        d = Daemon(Path(t), model, {"train": {"threads": a.threads}, "disk": {"min_free_bytes": 0}}, a.threads)
        try:
            for name, answer in (("zorbania-quillport.jsonl", "Quillport"), ("zorbania-osmark.jsonl", "Osmark")):
                b = d.submit(name, chat_lines(answer, 40))
                view = {"file": name, "id": b["id"], "state": b["state"], **decision(d.root, b["id"]),
                        **batch_view(d.root, b["id"])}
                out["batches"].append(view)
                print(json.dumps(view, indent=1), flush=True)
            st = subprocess.run([sys.executable, "-m", "trainerd", "status", "--root", str(d.root)], env=d.env,
                                capture_output=True, text=True, cwd=REPO)
            hist = subprocess.run([sys.executable, "-m", "trainerd", "history", "--root", str(d.root)], env=d.env,
                                  capture_output=True, text=True, cwd=REPO)
            out["status"], out["history"] = st.stdout, hist.stdout
            print(st.stdout, hist.stdout, sep="\n", flush=True)
            versions = sorted(int(x.name) for x in (d.root / "adapters").iterdir() if x.name.isdigit())
            out["current"] = os.readlink(d.root / "adapters" / "current") if (d.root / "adapters" / "current").exists() else None
        finally:
            d.stop()
        out["answers"] = answers(model, d.root, versions)
    for k, v in out["answers"].items():
        print(f"{k}: {v}")
    ok_split = out["batches"][0]["split"]["heldout"] >= 1
    second = out["batches"][1]
    out["verdict"] = {"batch1_holds_out": ok_split, "batch2": second["decision"] or second["state"]}
    print(f"batch 1 holds out {out['batches'][0]['split']['heldout']} of {out['batches'][0]['split']['distinct']} "
          f"distinct; batch 2: {second['state']} / {second['decision']}: {second['reason']}")
    print(f"cpu: {out['cpu']}")
    write_json(a.out, out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
