"""``python -m trainerd.worker.ask``: answer one question with the base model and some adapters.

Started by ``trainerd ask`` (trainerd/cli/ask.py) in the operator's own process tree, never by
the daemon: the model's memory is the caller's, not the training budget's. Reads one JSON request
on stdin::

    {"model": {"path", "dtype", "device"}, "question": "...", "system": null, "max_new_tokens": 128,
     "answers": [{"label": "version 3", "adapter": "/root/adapters/3"}, {"label": "base", "adapter": null}]}

and writes one JSON line per answer on stdout, in order:
``{"label", "adapter", "answer", "new_tokens", "seconds"}``. The question goes through the
model's chat template (a user turn, after an optional system turn; the plain text when the
tokenizer has no template); decoding is greedy, so the same adapter gives the same answer.
The base model is loaded once; each adapter is loaded beside it under its own name and the base
answers with the adapters disabled.

Exit codes: 0 answered; 78 the model or an adapter cannot be loaded; 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from trainerd.core.contract import ExitCode

__all__ = ["main", "prompt_ids"]


class _StderrLog:
    """The worker's model loader logs; here its lines go to stderr (stdout carries the answers)."""

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: print(json.dumps({"level": level, "event": event, **kw}, default=str),
                                         file=sys.stderr)


def prompt_ids(tokenizer: Any, question: str, system: str | None) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of the question as the model's chat template lays it out."""
    import torch

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = enc["input_ids"]
    else:
        ids = tokenizer(question, return_tensors="pt")["input_ids"]
    return ids, torch.ones_like(ids)


def _answer(model: Any, tokenizer: Any, ids: Any, mask: Any, max_new_tokens: int, device: Any) -> tuple[str, int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.shape[0])


def run(req: dict[str, Any]) -> int:
    from trainerd.core.config import from_dict
    from trainerd.worker import model as mdl

    settings = from_dict({"root": "/", "model": req["model"]})
    log = _StderrLog()
    try:
        loaded = mdl.load(settings, log)
    except mdl.ConfigProblem as e:
        print(f"trainerd ask: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    from peft import PeftModel

    model: Any = loaded.base
    model.eval()
    ids, mask = prompt_ids(loaded.tokenizer, req["question"], req.get("system"))
    names: dict[str, str] = {}
    for i, a in enumerate(req["answers"]):
        if a.get("adapter") is None or a["adapter"] in names:
            continue
        name = f"a{i}"
        try:
            if not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(loaded.base, a["adapter"], adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(a["adapter"], adapter_name=name, is_trainable=False)
        except (OSError, ValueError) as e:
            print(f"trainerd ask: cannot load the adapter {a['adapter']}: {e}", file=sys.stderr)
            return ExitCode.CONFIG
        names[a["adapter"]] = name
    model.to(loaded.device)
    model.eval()
    for a in req["answers"]:
        t0 = time.monotonic()
        if a.get("adapter") is None:
            if isinstance(model, PeftModel):
                with model.disable_adapter():
                    text, n = _answer(model, loaded.tokenizer, ids, mask, req["max_new_tokens"], loaded.device)
            else:
                text, n = _answer(model, loaded.tokenizer, ids, mask, req["max_new_tokens"], loaded.device)
        else:
            model.set_adapter(names[a["adapter"]])
            text, n = _answer(model, loaded.tokenizer, ids, mask, req["max_new_tokens"], loaded.device)
        print(json.dumps({"label": a["label"], "adapter": a.get("adapter"), "answer": text, "new_tokens": n,
                          "seconds": round(time.monotonic() - t0, 3)}), flush=True)
    return ExitCode.OK


def main() -> int:
    try:
        req = json.loads(sys.stdin.read())
        for a in req["answers"]:
            if a.get("adapter") is not None and not (Path(a["adapter"]) / "adapter_config.json").is_file():
                print(f"trainerd ask: no adapter at {a['adapter']}", file=sys.stderr)
                return ExitCode.CONFIG
    except (ValueError, KeyError, TypeError) as e:
        print(f"trainerd ask: bad request on stdin: {e}", file=sys.stderr)
        return ExitCode.FAIL
    return run(req)


if __name__ == "__main__":
    sys.exit(main())
