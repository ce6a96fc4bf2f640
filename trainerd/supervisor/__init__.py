"""The supervisor side of trainerd: one daemon, one worker at a time (never imports torch).

    daemon.py     the loop: signals, reload, pause, systemd notify, inbox scans, ticks
    attempts.py   claim -> start -> settle; the only caller of ledger transitions
    policy.py     pure: how an attempt ended -> Verdict (publish / requeue / fail)
    stopping.py   one Escalation per attempt: .stop -> SIGTERM -> SIGKILL, with cause and sender
    filing.py     idempotent moves to done/ and failed/, adapter versions, ``current``
    reconcile.py  restart recovery and leftover workers
    forensics.py  the kernel's OOM evidence
"""

from trainerd.supervisor.daemon import AlreadyRunning, Supervisor

__all__ = ["AlreadyRunning", "Supervisor"]
