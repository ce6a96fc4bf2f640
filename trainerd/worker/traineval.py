"""Evaluation while a batch trains and when it ends: the new set's loss every ``eval.every_steps``
(early stopping keeps the best step's checkpoint), the best step's adapter restored, and the
candidate against the champion on every set at the end (eval.json, the supervisor's gate input).

A part of :class:`trainerd.worker.train.Trainer`, which holds the state it works on.
"""

from __future__ import annotations

from trainerd.core.fsutil import atomic_write_json
from trainerd.worker import checkpoint as ckpt
from trainerd.worker import evaluate as ev

__all__ = ["TrainEval"]


class TrainEval:
    """The Trainer's evaluations."""

    def _watch_new_set(self) -> bool:
        """Every eval.every_steps: the new set's loss, logged; True when it is the best so far."""
        if not self.early.due(self.step) or not self.split.new_set:
            return False
        if self._new_set is None:
            new = ev.load_new_set(self.files, self.split.new_set, self.split.new_set_kind, self.encoder,
                                  self.s.train.seq_len, self.s.data.max_line_bytes)
            if new is not None:
                ev.allocate([new], int(self.s.eval.max_tokens) // 2)
            self._new_set = new.chosen if new is not None else []
        if not self._new_set:
            return False
        stopper = self.stopper.deferred() if self.ranks.on else self.stopper
        evaluator = ev.Evaluator(self.model, self.loaded, stopper, batch_size=self.s.eval.batch_size,
                                 pad_id=self.loaded.tokenizer.pad_token_id, autocast=self.precision.autocast)
        loss = ev.figures(self._new_set, evaluator.losses(self._new_set))["mean_loss"]
        best = self.early.observe(self.step, loss)
        self.log.info("eval_step", step=self.step, new_set_loss=loss, best_step=self.early.best_step,
                      best_loss=self.early.best_loss, evals_without_improvement=self.early.bad,
                      early_stopped=self.early.stopped)
        return best

    def _restore_best(self) -> None:
        """Early stopping: the candidate is the best step's adapter, from its kept checkpoint."""
        ckpt.load_adapter(self.model, self.files.checkpoints / f"step-{self.early.best_step:08d}")
        self.log.info("early_stopping_restored_best", step=self.step, best_step=self.early.best_step,
                      best_loss=self.early.best_loss)

    def _evaluate(self, train_tokens: int) -> None:
        """Candidate against champion on every set; eval.json is the supervisor's input to the gate."""
        result = ev.evaluate_candidate(self.model, self.loaded, self.stopper, self.files, self.s,
                                       split=self.split, champion=self.init_adapter,
                                       train_tokens=train_tokens, encoder=self.encoder,
                                       precision=self.precision, log=self.log)
        result["early_stopping"] = self.early.state() if self.early.every else None
        atomic_write_json(self.files.eval_result, result)
        self.log.info("evaluation_done", seconds=result["seconds"], sets=[
            {"name": r["name"], "kind": r["kind"], "candidate": r["candidate"]["mean_loss"],
             "champion": r["champion"]["mean_loss"], "used": r["used"]} for r in result["sets"]],
            champion_reused_examples=result["champion"]["reused_examples"])
