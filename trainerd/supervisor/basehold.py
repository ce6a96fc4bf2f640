"""Holding the queue while the configured base model is not the chain's.

A LoRA adapter is a delta on one base model: continued on another it is nonsense the next
steps would happily publish. When ``model.path`` names another model than the chain's (or than
the one the head batch's checkpoints were trained on), nothing starts and nothing fails: the
log (``base_model_changed``) and ``trainerd status`` name both, until the operator restores
``model.path`` or runs ``trainerd rebase`` (chain.py). A model that cannot be read holds
nothing: the worker says why.
"""

from __future__ import annotations

from typing import Any

from trainerd.supervisor.basemodel import Watched, short
from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor.lineage import chain_base

__all__ = ["BaseHold"]


class BaseHold:
    def __init__(self, model_path: str, layout: RootLayout, log: Any):
        self.base = Watched(model_path)  # the configured base model's identity
        self.layout, self.log = layout, log
        self.held: dict[str, Any] | None = None  # why the queue is held, for status

    def holds(self, head: Any, latest: Any) -> bool:
        configured = self.base.get()
        if configured is None:
            return False
        chain, _ = chain_base(self.layout, latest)
        mine = (read_json_or_none(self.layout.batch(head.id).parent) or {}).get("base")
        other = next((b for b in (mine, chain) if b and b.get("id") != configured["id"]), None)
        if other is None:
            if self.held is not None:
                self.log.info("base_model_ok", base=configured["path"], base_id=configured["id"])
            self.held = None
            return False
        held = {"chain_base": short(other), "configured_base": short(configured), "batch": head.id}
        if held != self.held:
            self.log.error("base_model_changed", **held, action="the queue is held: restore model.path, or run "
                           "`trainerd rebase` to start a new chain on the configured model")
        self.held = held
        return True

    def describe(self) -> str:
        assert self.held is not None
        return (f"held: the base model is {self.held['configured_base']}, the chain's is "
                f"{self.held['chain_base']} (restore model.path or run `trainerd rebase`)")
