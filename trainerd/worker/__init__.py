"""The training worker: the only package that imports torch, transformers, peft, datasets.

Run as ``python -m trainerd.worker BATCH_DIR [--init-adapter DIR] [--publish DIR] [--mtbf-s S]``; see
docs/architecture.md for the contract (argv, files, exit codes).
"""

import os
import signal

# SIGTERM/SIGINT that arrive before the trainer installs its own handlers (imports and the
# model load take seconds): recorded here so they still mean "stop cleanly, exit 75" rather
# than a bare death by signal that the supervisor must count as a crash.
EARLY_SIGNALS: list[int] = []


def _early_signal(signum: int, _frame: object) -> None:
    EARLY_SIGNALS.append(signum)
    if len(EARLY_SIGNALS) > 1:  # a second one stops at once, as it does later
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def record_early_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _early_signal)
