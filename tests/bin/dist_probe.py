"""Run under torchrun (2 ranks, gloo): dist.reduce_step and dist.agree with real collectives.

Every rank gives a gradient of its own (rank + 1 everywhere, one parameter without a gradient),
a loss, a token count and the stop reason named in argv[rank + 1] ("-" for none); it prints one
JSON line with what it got back."""

from __future__ import annotations

import json
import sys

import torch

from trainerd.worker import dist


def main() -> int:
    ranks = dist.Ranks.from_env()
    dist.init(ranks, "gloo", 30, torch.device("cpu"))
    reason = sys.argv[1 + ranks.rank]
    reason = None if reason == "-" else reason
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(1))  # never gets a gradient on any rank
    a.grad = torch.full((3,), float(ranks.rank + 1))
    b.grad = torch.full((2, 2), 10.0 * (ranks.rank + 1))
    loss, tokens, agreed = dist.reduce_step([a, b, c], 0.5 * (ranks.rank + 1), 100 + ranks.rank, reason,
                                           torch.device("cpu"))
    flag_reason, flags = dist.agree(reason, ranks.rank == 1, False)
    # One write per line (print() writes the newline separately: the ranks share torchrun's stdout).
    sys.stdout.write(json.dumps({"rank": ranks.rank, "loss": loss, "tokens": tokens,
                      "agreed": None if agreed is None else str(agreed),
                      "a": a.grad.tolist(), "b": b.grad.tolist(), "c": None if c.grad is None else c.grad.tolist(),
                      "agree_reason": None if flag_reason is None else str(flag_reason), "flags": flags,
                      "gathered": dist.gather_objects({"r": ranks.rank})}) + "\n")
    sys.stdout.flush()
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
