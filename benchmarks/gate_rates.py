#!/usr/bin/env python3
"""The gate's error rates over simulated chains (issue 17): how often it refuses a candidate that
harmed no batch, and how often it finds one contradicted batch, as the chain grows.

Each simulated decision is the real ``supervisor/gate.py`` on the memory of a chain of N batches,
one example each (the memory's tier 1 at N <= its bound): every batch's true change uniform in
[-0.05, +0.025] nats/token (some a little forgotten, some a little improved; all within
``gate.max_regression``) plus per-example noise of a given family and scale; for detection,
batch 1 is also contradicted by ``--contradiction`` nats/token. tests/test_gate.py asserts the
same on fewer chains.

    .venv/bin/python benchmarks/gate_rates.py                       # N = 1,000, 200 chains a row
    .venv/bin/python benchmarks/gate_rates.py --n 10 100 1000 10000 --chains 100

Writes ``bench-out/gate_rates.json``. Pure Python: no model, no CPU dependence but speed.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_json  # noqa: E402
sys.path.insert(0, str(REPO / "tests"))

from test_gate import benign_chain  # noqa: E402  (the one generator, shared with the test)
from trainerd.core.settings import GateSettings  # noqa: E402
from trainerd.supervisor.gate import judge  # noqa: E402

FAMILIES = [("normal", 0.02), ("normal", 0.05), ("normal", 0.1), ("normal", 0.2), ("laplace", 0.05),
            ("laplace", 0.1), ("laplace", 0.2), ("t5", 0.05), ("t5", 0.1), ("t5", 0.2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1000])
    p.add_argument("--chains", type=int, default=200)
    p.add_argument("--contradiction", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "gate_rates.json")
    a = p.parse_args()
    gate = GateSettings()
    rows = []
    for n in a.n:
        for kind, scale in FAMILIES:
            rng = random.Random(f"{n}-{kind}-{scale}")
            refused = sum(judge({"sets": [benign_chain(rng, kind, scale, n)]}, gate).verdict == "refused"
                          for _ in range(a.chains))
            found = {}
            for c in a.contradiction:
                hits = 0
                for _ in range(max(20, a.chains // 4)):
                    d = judge({"sets": [benign_chain(rng, kind, scale, n, contradicted=c)]}, gate)
                    hits += d.verdict == "refused" and 1 in d.targets
                found[c] = hits / max(20, a.chains // 4)
            row = {"n": n, "noise": kind, "scale": scale, "false_refusals": refused / a.chains, "found": found}
            rows.append(row)
            print(f"N {n:>6}  {kind:<7} {scale:<5} false refusals {row['false_refusals']:6.1%}  found "
                  + "  ".join(f"+{c}: {v:5.0%}" for c, v in found.items()), flush=True)
    write_json(a.out, {"gate": vars(gate), "chains": a.chains, "rows": rows})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
