"""The supervisor process (``trainerd run``): one daemon, one worker at a time. Never imports torch,
transformers, peft or datasets, not even lazily: it stays small and is never the process the kernel
kills (tests/test_architecture.py, tests/test_no_torch.py).

May import: the standard library, watchdog, psutil, pyyaml, structlog, prometheus_client,
:mod:`trainerd.core` (the kernel it shares with the worker) and :mod:`trainerd.memguard`; never
:mod:`trainerd.worker` (it starts the worker as a child: argv, files, exit codes) nor
:mod:`trainerd.cli`. Its sub-packages: :mod:`.ledger` (the SQLite ledger: state.db, its schema, rows
and states) and :mod:`.views` (read-only views of a root: status, health, held-out figures, paging;
the CLI reads them too).

This file imports nothing: ``trainerd status`` reads the ledger through this package and must not
pay for the daemon's imports (watchdog, psutil). The daemon is :mod:`trainerd.supervisor.daemon`.

    daemon.py     the loop: signals, reload, pause, systemd notify, inbox scans, ticks (bounded turns)
    intake.py     inbox scans in slices; claimpool.py: a burst claimed in groups (claims.py: the steps)
    guardthread.py  the memory guard on its own thread and schedule; loophealth.py: the loop's figures
    attempts.py   claim -> start -> settle; with claims.py, the only caller of ledger transitions
    policy.py     pure: how an attempt ended -> Verdict (publish / requeue / fail)
    stopping.py   one Escalation per attempt: .stop -> SIGTERM -> SIGKILL, with cause and sender
    filing.py     idempotent moves to done/ and failed/, adapter versions, ``current``
    reconcile.py  restart recovery and leftover workers
    forensics.py  the kernel's OOM evidence
"""
