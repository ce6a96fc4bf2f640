"""The supervisor side of trainerd: one daemon, one worker at a time (never imports torch).

    daemon.py     the loop: signals, reload, pause, systemd notify, inbox scans, ticks (bounded turns)
    intake.py     inbox scans in slices; claimpool.py: a burst claimed in groups (claims.py: the steps)
    guardthread.py  the memory guard on its own thread and schedule; health.py: the loop's figures
    attempts.py   claim -> start -> settle; with claims.py, the only caller of ledger transitions
    policy.py     pure: how an attempt ended -> Verdict (publish / requeue / fail)
    stopping.py   one Escalation per attempt: .stop -> SIGTERM -> SIGKILL, with cause and sender
    filing.py     idempotent moves to done/ and failed/, adapter versions, ``current``
    reconcile.py  restart recovery and leftover workers
    forensics.py  the kernel's OOM evidence
"""

from trainerd.supervisor.daemon import AlreadyRunning, Supervisor

__all__ = ["AlreadyRunning", "Supervisor"]
