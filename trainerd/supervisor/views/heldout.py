"""What a version learned, in figures a person can check: its batch's held-out loss before and after.

The evaluation (worker/evaluate.py, ``eval.json``) measures the champion (the parent version, or
the base model for the first one) and the candidate on the batch's new set: contents the batch
held out of training (or the eval file that came with it). From the per-example figures this module
derives the change of the token-weighted mean loss and its standard error, treating each example
as one independent draw (a ratio estimator: the tokens of one example are not independent of each
other). ``fell_clearly`` is the quickstart's proof: the loss fell beyond noise, i.e. by more than
t standard errors, t the 97.5 % quantile of Student's t with n - 1 degrees of freedom (12.7 for 2
examples, 2.36 for 8, 2.04 for 31, 2 beyond): with a handful of examples the standard error itself
is a rough guess, and two of them would bless a fall of 0.009 nats/token on 3 examples (measured
with the production defaults on the quickstart's sample).

It also picks the question the proof asks: the first held-out example, in the evaluation's
content-hash order, that has one (a chat's last user turn, or a prompt). Stdlib only: the
supervisor writes these figures into each version's lineage; ``trainerd history`` and
``trainerd learned`` read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import open_regular, read_json_or_none

__all__ = ["change_stderr", "describe", "fell_clearly", "figures", "of_eval", "of_version", "question", "t_bound"]

# Student's t, 97.5 % quantile (one-sided 2.5 %), for 1..30 degrees of freedom; 2.0 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def change_stderr(candidate: list[dict[str, Any]], champion: list[dict[str, Any]]) -> float | None:
    """Standard error of (candidate - champion) token-weighted mean loss, over paired examples
    (``per_example`` entries of eval.json: ``loss_sum``, ``tokens``); None under two examples."""
    pairs = [(a["loss_sum"] - b["loss_sum"], a["tokens"]) for a, b in zip(candidate, champion)
             if a.get("tokens") and a.get("tokens") == b.get("tokens")]
    n = len(pairs)
    total = sum(t for _, t in pairs)
    if n < 2 or not total:
        return None
    ratio = sum(d for d, _ in pairs) / total
    return math.sqrt(n / (n - 1) * sum((d - ratio * t) ** 2 for d, t in pairs)) / total


def figures(eval_set: dict[str, Any]) -> dict[str, Any]:
    """One set of eval.json as the proof shows it: before (champion), after (candidate), the change
    and its standard error, how many examples and tokens."""
    cand, champ = eval_set.get("candidate") or {}, eval_set.get("champion") or {}
    before, after = champ.get("mean_loss"), cand.get("mean_loss")
    change = after - before if _finite(before) and _finite(after) else None
    return {"set": eval_set.get("name"), "before": before, "after": after, "change": change,
            "stderr": change_stderr(cand.get("per_example") or [], champ.get("per_example") or []),
            "examples": cand.get("examples"), "tokens": cand.get("tokens")}


def of_eval(eval_result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures of the batch's own new set in an eval.json, or None when it had none."""
    new = next((s for s in (eval_result or {}).get("sets") or [] if s.get("kind") == "new"), None)
    return figures(new) if new else None


def of_version(layout: RootLayout, lineage: dict[str, Any], batch_id: int | None) -> dict[str, Any] | None:
    """A version's figures: its lineage's (written at publish), else its batch's eval.json
    (versions published before the lineage kept them, while the batch folder is still there)."""
    if lineage.get("heldout") is not None:
        return lineage["heldout"]
    if batch_id is None:
        return None
    return of_eval(read_json_or_none(layout.batch(batch_id).eval_result))


def t_bound(examples: int) -> float:
    """How many standard errors a fall must exceed, with ``examples`` paired examples (>= 2)."""
    df = max(1, examples - 1)
    return _T975[df - 1] if df <= len(_T975) else 2.0


def fell_clearly(fig: dict[str, Any] | None) -> bool:
    """The held-out loss fell by more than ``t_bound(examples)`` standard errors."""
    if not fig or fig.get("change") is None or fig.get("stderr") is None or not fig.get("examples"):
        return False
    return fig["change"] < -t_bound(fig["examples"]) * fig["stderr"]


def describe(fig: dict[str, Any] | None) -> str:
    """One line a person reads: did the held-out loss fall, and by how much against the noise."""
    if not fig or fig.get("change") is None:
        return "no held-out figures: the batch held nothing out and came with no eval file"
    change, se = fig["change"], fig.get("stderr")
    if se is None:
        return f"changed by {change:+.3f} nats/token; too few examples ({fig.get('examples')}) for a standard error"
    n = fig.get("examples") or 0
    z = (f"{abs(change) / se:.1f} standard errors" if se > 0 else "no spread at all") + f", {n} examples"
    bound = f"more than {t_bound(n):.2f} needed" if n else "no examples"
    if fell_clearly(fig):
        return f"fell by {-change:.3f} nats/token ({z}): learned, not noise"
    if change < 0:
        return f"fell by {-change:.3f} nats/token ({z}; {bound}): within noise"
    return f"rose by {change:.3f} nats/token ({z}): not learned"


def question(path: Path, max_line_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The first held-out example with a question, in content-hash order (the evaluation's):
    ``{"question", "system", "expected"}``; None when the set has none (plain text only)."""
    from trainerd.core.lines import content_hash, iter_lines, parse_line  # only here: `trainerd status` stays light

    found: dict[int, dict[str, Any]] = {}
    try:
        with open_regular(path) as f:
            for raw in iter_lines(f, max_line_bytes):
                ex, _err = parse_line(raw)
                q = _ask(ex) if ex is not None else None
                if q is not None:
                    found.setdefault(int(content_hash(ex), 16), q)
    except OSError:
        return None
    return found[min(found)] if found else None


def _ask(ex: Any) -> dict[str, Any] | None:
    if ex.kind == "completion":
        return {"question": ex.prompt, "system": None, "expected": ex.completion.strip()}
    if ex.kind != "chat" or not ex.messages or ex.messages[-1][0] != "assistant":
        return None
    users = [c for r, c in ex.messages[:-1] if r == "user"]
    system = next((c for r, c in ex.messages if r == "system"), None)
    return {"question": users[-1], "system": system, "expected": ex.messages[-1][1]} if users else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
