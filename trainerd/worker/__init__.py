"""The training worker: the only package that imports torch, transformers, peft, datasets.

Run as ``python -m trainerd.worker BATCH_DIR [--init-adapter DIR] [--publish DIR]``; see
docs/architecture.md for the contract (argv, files, exit codes).
"""
