"""Numerical guards for the HF ``Trainer``: a NaN/inf loss or gradient never reaches the weights.

The HF Trainer only hides a non-finite loss from its *logs* (``logging_nan_inf_filter``); the optimizer still
applies the NaN gradient and the run is silently ruined. :class:`NonFiniteGuard` checks every optimizer step
(after gradient clipping, before the update):

* ``skip``: the update is not applied at all. The optimizer's ``step`` is bypassed, not fed zero gradients
  (Adam with zero gradients still moves by its momentum and advances its step counter); the gradients are
  cleared by the Trainer as usual and the LR schedule, a function of the step, goes on. The skip is logged
  (``{"step": n, "skipped": "non-finite gradient"}`` in the log history) and counted. After ``max_skips``
  consecutive skipped steps the next non-finite step halts the run: a model that keeps producing NaN is broken.
* ``halt``: the first non-finite step raises :class:`NonFiniteError`.

Invariants: a halt happens before the optimizer update, so the weights are the last good ones and nothing of
the bad step is saved (checkpoints written so far are intact; the run can be resumed after a fix). Every
process of a distributed run takes the same decision (the flag is reduced over processes). With fp16 mixed
precision, overflowing gradients are the GradScaler's business (it skips the step and lowers its scale); the
guard then checks the loss only. The count of consecutive skips starts from 0 in each session (after a resume).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from chainlora.errors import ChainLoRAError

logger = logging.getLogger("chainlora")

NonFiniteMode = Literal["skip", "halt"]


class NonFiniteError(ChainLoRAError):
    """Training produced a non-finite loss or gradient and was halted before the update was applied."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (DTensor shards: this process's part)."""
    if not tensors:
        return torch.tensor(True)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return torch.stack([torch.isfinite(t).all() for t in local]).all()


def _any_process(flags: torch.Tensor) -> list[bool]:
    """``flags`` (1-d bool) OR-ed over all processes (one all-reduce under ``torch.distributed``)."""
    value = flags.to(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            value = value.cuda()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in value.cpu().tolist()]


class NonFiniteGuard(TrainerCallback):
    """Skips (``mode="skip"``) or halts on (``mode="halt"``) an optimizer step whose loss or gradient is
    not finite. Feed it every micro-batch loss with :meth:`observe_loss` (the Trainer's ``training_step``);
    gradients are inspected in ``on_pre_optimizer_step``. ``skipped`` lists the skipped optimizer steps."""

    def __init__(self, mode: NonFiniteMode = "skip", max_skips: int = 3) -> None:
        if mode not in ("skip", "halt"):
            raise ValueError(f"mode must be 'skip' or 'halt', got {mode!r}")
        self.mode = mode
        self.max_skips = max_skips
        self.consecutive = 0  # non-finite steps in a row so far
        self.skipped: list[int] = []
        self._loss_ok: torch.Tensor | None = None  # all micro-batch losses of this step finite (no sync)
        self._skip_next_update = False
        self._wrapped: Any = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch loss of the current optimizer step (no device sync here)."""
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and self._wrapped is not optimizer:
            self._bypass_when_skipping(optimizer)

    def _bypass_when_skipping(self, optimizer: Any) -> None:
        """Route ``optimizer.step`` through the guard: a skipped step calls nothing at all."""
        original = optimizer.step

        @functools.wraps(original)  # keeps the LR scheduler's marks on step (no "step overridden" warning)
        def step(*args: Any, **kwargs: Any) -> Any:
            if self._skip_next_update:
                self._skip_next_update = False
                return None
            return original(*args, **kwargs)

        optimizer.step = step
        self._wrapped = optimizer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        self._loss_ok = None
        grads_ok = torch.tensor(True)
        if model is not None and not getattr(args, "fp16", False):
            grads_ok = _all_finite([p.grad for p in model.parameters() if p.grad is not None])
        loss_bad, grads_bad = _any_process(torch.stack([~loss_ok.cpu(), ~grads_ok.cpu()]))
        if not (loss_bad or grads_bad):
            self.consecutive = 0
            return
        what = " and ".join(name for name, bad in (("loss", loss_bad), ("gradient", grads_bad)) if bad)
        self.consecutive += 1
        if self.mode == "halt" or self.consecutive > self.max_skips:
            limit = "" if self.mode == "halt" else f" after {self.max_skips} consecutive skipped step(s)"
            raise NonFiniteError(
                f"step {step}: non-finite {what}{limit}; training halted before the update (weights and "
                "checkpoints are the last good ones): lower lr or check the data"
            )
        self._skip_next_update = True
        self.skipped.append(step)
        state.log_history.append({"step": step, "skipped": f"non-finite {what}"})
        logger.warning(
            "chainlora: step %d skipped: non-finite %s (%d in a row, at most %d)",
            step,
            what,
            self.consecutive,
            self.max_skips,
        )
