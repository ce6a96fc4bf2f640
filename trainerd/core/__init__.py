"""The shared kernel: what both processes import, the supervisor (and the CLI) and the worker.

The contract between them (exit codes, stop reasons, the root's layout), the config, the data's
lines and their compressed streams, the replay store and the evaluation memory, the memory plan
(planning, ladder), checkpoint cadence, the model reference, atomic files, logging, fault injection.

May import: the standard library, pyyaml, structlog, zstandard (only for a .zst file), and the other
modules of this package; nothing else of trainerd (no supervisor, memguard, worker or cli), and never
torch, transformers, peft or datasets (tests/test_architecture.py).
"""
