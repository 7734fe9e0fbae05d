"""The HF ``Trainer`` of ``chainlora train`` and what it is built from: a ``TrainConfig`` made into training
arguments, a knot schedule and an LR schedule; dev evaluation; the run's callbacks.

    training_arguments(config, ...)   the TrainingArguments of a run (checkpoints under RUN_DIR/checkpoints)
    steps_per_epoch(...)              optimizer steps per epoch, counted as the Trainer counts them
    knot_schedule(config, ...)        where the knots go (``chainlora.schedules``), from ``config.chain``
    LinkLR                            the LR multiplier, a pure function of the optimizer step
    RunTrainer                        the task's loss (``chainlora.tasks``), the pure LR schedule, analytic FLOPs,
                                      dev loss and dev score per evaluation, the non-finite guard per micro-batch,
                                      ``compile: auto``'s fallback to eager when compiling fails
    RunCallback                       the best dev state in best/, knots in TensorBoard, training time across resumes
    EvaluateBeforeSave                a checkpoint at an evaluated step is written after that evaluation
    CheckpointSeal                    the last callback: seals each checkpoint (``chainlora.rundir``)

Everything a run's state depends on is a function of the step or restored from the checkpoint (the LR, the chain,
the best-dev record re-derived from the log history, which holds every evaluation up to the checkpoint's step), so a
resumed run replays an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_compiled_module
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from chainlora import rundir, tasks
from chainlora.callback import ChainOfLoRACallback
from chainlora.config import TrainConfig
from chainlora.errors import ConfigError
from chainlora.faults import maybe_crash
from chainlora.guards import NonFiniteGuard
from chainlora.perf import Speed
from chainlora.recipes.flops import flop_model, sequence_flops
from chainlora.schedules import ChainSchedule, KnotSchedule

logger = logging.getLogger("chainlora")


def training_arguments(config: TrainConfig, run_dir: Path, speed: Speed) -> TrainingArguments:
    """The ``TrainingArguments`` of a run: the config's budget and optimizer, ``speed``'s precision, kernel and
    compilation, dev evaluation and a checkpoint every epoch (or every ``save_steps``)."""
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir / rundir.CHECKPOINTS_DIR),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "eval_strategy": "epoch" if config.num_dev != 0 else "no",
        "save_strategy": "steps" if config.save_steps else "epoch",
        "save_total_limit": 2,  # the newest can be incomplete (killed while saving): keep one more
        "logging_strategy": "steps",
        "logging_steps": config.logging_steps,
        # TensorBoard is the run's own writer (RunCallback, TensorBoardCallback); the Trainer adds the others
        "report_to": [r for r in config.report_to if r not in ("tensorboard", "none")],
        "seed": config.train_seed,
        "data_seed": config.train_seed,
        **speed.training_arguments(),
        "train_sampling_strategy": "group_by_length" if config.group_by_length else "random",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "use_cpu": not torch.cuda.is_available(),
    }
    if config.save_steps:
        kwargs["save_steps"] = config.save_steps
    try:
        return TrainingArguments(**kwargs)
    except ValueError as err:  # e.g. a precision this machine cannot run
        raise ConfigError(f"training arguments: {str(err).splitlines()[0]}") from None


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps per epoch, as the HF Trainer counts them (last partial batch and accumulation kept)."""
    micro_batches = math.ceil(math.ceil(examples / batch_size) / world_size)
    return max(micro_batches // grad_accum + int(micro_batches % grad_accum > 0), 1)


def knot_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> KnotSchedule:
    """The knot schedule ``config.chain`` asks for, in optimizer steps: adaptive (``knots: auto``), listed steps,
    fractions of the budget, or ``chain.length`` links split evenly (on epoch boundaries when the run is measured
    in epochs, as in the paper). Errors name ``chain.*`` and the budget they overran."""
    chain = config.chain
    ranks = chain.ranks
    try:
        if chain.knots == "auto":
            auto = chain.auto
            min_link = auto.min_link_steps or max(1, total_steps // (4 * chain.links))
            return ChainSchedule.auto(
                total_steps,
                max_links=chain.links,
                min_link_steps=min_link,
                patience=auto.patience or max(1, min_link // 2),
                threshold=auto.threshold,
                ema=auto.ema,
                ranks=list(ranks) if ranks else auto.rank_rule,
                rank=config.lora.r,
                signal=auto.signal,
            )
        if chain.knots is not None and all(isinstance(k, int) for k in chain.knots):
            return ChainSchedule(tuple(chain.knots), total_steps, tuple(ranks) if ranks else None)
        if chain.knots is not None:
            return ChainSchedule.from_fractions(chain.knots, total_steps, ranks=ranks)
        by_epoch = config.max_steps is None and chain.links <= config.epochs
        return ChainSchedule.even(
            chain.links, total_steps, steps_per_epoch=steps_per_epoch if by_epoch else None, ranks=ranks
        )
    except ConfigError as err:
        field_name = "chain.knots" if chain.knots is not None else "chain.length"
        budget = "" if "steps" in str(err) else f" (the run has {total_steps} optimizer steps)"
        raise ConfigError(f"{field_name}: {err}{budget}") from None


@dataclass(frozen=True)
class LinkLR:
    """The LR multiplier as a pure function of the optimizer step (so a resumed run gets exactly the same LR).

    ``linear``: warmup then linear decay to 0 over the whole run (HF's ``linear``); ``constant``: warmup then 1;
    ``jagged``: the linear schedule restarted at every knot, with its own warmup per link. ``warmup`` < 1 is a
    fraction (of the run, or of each link for ``jagged``), else a number of steps.
    """

    kind: str
    total_steps: int
    warmup: float = 0.0
    knots: tuple[int, ...] = ()

    def __call__(self, step: int) -> float:
        start, end = 0, self.total_steps
        if self.kind == "jagged":
            start = max((k for k in self.knots if k <= step), default=0)
            end = min((k for k in self.knots if k > step), default=self.total_steps)
        length, t = end - start, step - start
        warmup = math.ceil(self.warmup * length) if self.warmup < 1 else min(int(self.warmup), length)
        if t < warmup:
            return t / max(1, warmup)
        if self.kind == "constant":
            return 1.0
        return max(0.0, (length - t) / max(1, length - warmup))


class RunTrainer(tasks.TaskTrainer):
    """``tasks.TaskTrainer`` (length-grouped batches seeded per epoch) training with the workload's ``loss`` (one
    function per workload, ``chainlora.recipes.workload``), the pure LR schedule ``lr_lambda``, analytic FLOPs,
    dev evaluation (``evaluate_dev(model)``: ``loss``, and ``score`` and more where measured, logged as
    ``eval_<name>``) and ``nonfinite_guard`` fed every micro-batch loss.

    ``compile_fallback`` (``compile: auto`` resolved to on): when compiling, or a compiled step, raises, the
    run goes on eagerly: one warning line, the step redone on the uncompiled model, and ``compile_failure``
    says why (``chainlora train`` records it in metrics.json). Without it a compile error propagates."""

    def __init__(
        self,
        *args: Any,
        lr_lambda: LinkLR,
        nonfinite_guard: NonFiniteGuard,
        loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
        evaluate_dev: Callable[[torch.nn.Module], dict[str, float]],
        compile_fallback: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(EvaluateBeforeSave())  # after DefaultFlowCallback, whose save decision it defers
        self.lr_lambda = lr_lambda
        self.nonfinite_guard = nonfinite_guard
        self.loss = loss
        self.evaluate_dev = evaluate_dev
        self.model_accepts_loss_kwargs = False  # the loss ignores num_items_in_batch
        self.compile_fallback = compile_fallback
        self.compile_failure: str | None = None  # why compile: auto fell back to eager
        self._eager_model: torch.nn.Module | None = None  # the uncompiled model, once fallen back
        self._forward_done = False

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._eager_model is not None:
            model = self._eager_model
        if self.compile_fallback and is_compiled_module(model):
            loss = self._compiled_step_or_eager(model, inputs, num_items_in_batch)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        maybe_crash("mid_step")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.loss(model, inputs)
        self._forward_done = True  # a failure after this may have written gradients
        return (loss, {"loss": loss}) if return_outputs else loss

    def _compiled_step_or_eager(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """The step on the compiled ``model``; if it raises, the same step on the uncompiled model, from the same
        gradients: untouched when the forward failed, none when this is the first micro-batch of the step. A
        backward failing after earlier micro-batches' gradients cannot be undone and propagates."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        no_grads_yet = all(p.grad is None for p in trainable)
        self._forward_done = False
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except Exception as error:
            if self._forward_done and not no_grads_yet:
                raise
            if self._forward_done:
                for p in trainable:
                    p.grad = None
            message = " ".join(str(error).split("\n\n")[0].split())  # without torch's "Set TORCH_LOGS" advice
            self.compile_failure = f"{type(error).__name__}: {message}"[:300]
            logger.warning("compile: auto: torch.compile failed, training eagerly: %s", self.compile_failure)
            self._eager_model = self.model_wrapped = model._orig_mod
            return super().training_step(self._eager_model, inputs, num_items_in_batch)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if num_training_steps != self.lr_lambda.total_steps:
            raise ConfigError(
                f"the LR schedule was built for {self.lr_lambda.total_steps} steps, the Trainer runs {num_training_steps}"
            )
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.lr_lambda)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Analytic training FLOPs of this micro-batch at the current link's rank, counted on its real (unpadded)
        tokens (see recipes.flops): the same global work gives the same total on any number of processes (the
        Trainer sums the processes' counts) and with any split into micro-batches."""
        mask = inputs.get("attention_mask")
        if mask is None:
            sequences, seq_len = inputs["input_ids"].shape
            return sequence_flops(flop_model(self.model), [seq_len] * sequences)
        return sequence_flops(flop_model(self.model), mask.sum(-1).tolist())

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Dev evaluation: ``eval_loss`` (the training loss on dev), ``eval_score`` (the metric) where measured,
        and the workload's other numbers (e.g. ``eval_perplexity``)."""
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_dev(self.model).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


SELECTION_KEYS = {"dev_loss": "eval_loss", "dev_score": "eval_score"}  # what each `selection` compares


class RunCallback(TrainerCallback):
    """Keeps the best dev state in ``best/``, logs knots as TensorBoard scalars, and times training across resumes.

    ``selection`` (``dev_loss``, ``dev_score`` or ``last``) says which state is best; the best record is
    re-derived from the (restored) log history at the start of every session, so it needs no file of its own.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        selection: str,
        full: bool,
        chain: ChainOfLoRACallback | None,
        tb_writer: Any = None,
        resumed_from: Path | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.key = SELECTION_KEYS.get(selection)  # None: the last state is tested, nothing to keep
        self.lower_is_better = selection == "dev_loss"
        self.full = full  # full fine-tuning: best/ holds every weight, not the chain
        self.chain = chain
        self.tb_writer = tb_writer
        self.resumed_from = resumed_from
        self.best: float | None = None
        self.best_step: int | None = None
        self.knots_logged = 0
        self.seconds_before = 0.0
        self.started = time.perf_counter()

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.lower_is_better else value > self.best

    def on_train_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()
        self.best, self.best_step = rundir.best_in_history(
            state.log_history, self.key, lower_is_better=self.lower_is_better
        )
        self.knots_logged = len(self.chain.knots) if self.chain else 0
        self.seconds_before = rundir.train_seconds_at(self.resumed_from)

    @property
    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def on_step_end(self, args, state, control, **kw):
        """Knots as TensorBoard scalars at their exact step (``trainer.log`` here would swallow the step's loss)."""
        if self.chain is None:
            return
        for record in self.chain.knots[self.knots_logged :]:
            if self.tb_writer is not None:
                self.tb_writer.add_scalar("chain/knot_link", record.link, record.step)
                self.tb_writer.add_scalar("chain/next_rank", record.next_rank, record.step)
                self.tb_writer.add_scalar("chain/knot_delta_norm", record.delta_norm, record.step)
                if record.optimizer_state_zeroed is not None:
                    self.tb_writer.add_scalar(
                        "chain/optimizer_state_zeroed", record.optimizer_state_zeroed, record.step
                    )
        self.knots_logged = len(self.chain.knots)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        if self.key is None or not metrics or not self._is_better(metrics[self.key]):
            return
        self.best, self.best_step = metrics[self.key], state.global_step
        if args.should_save:
            rundir.save_best_state(self.run_dir, model, state.global_step, metrics, full=self.full)

    def on_save(self, args, state, control, **kw):
        if args.should_save:
            rundir.save_train_seconds(
                rundir.checkpoint_dir(args.output_dir, state.global_step), self.train_seconds
            )


class SampleGenerations(TrainerCallback):
    """At every dev evaluation, a few answers to look at (prompt, reference, output) from the model as it is: in
    TensorBoard (``samples`` text) and in ``RUN_DIR/samples/step-N.jsonl`` (rewritten if a resumed run replays
    the step). ``workload.samples`` decides which (none for the benchmark tasks)."""

    def __init__(self, workload: Any, tokenizer: Any, run_dir: Path, tb_writer: Any, main: bool) -> None:
        self.workload, self.tokenizer, self.run_dir, self.tb_writer, self.main = (
            workload,
            tokenizer,
            run_dir,
            tb_writer,
            main,
        )

    def on_evaluate(self, args, state, control, model=None, **kw):
        if model is None or not self.main:
            return
        samples = self.workload.samples(model, self.tokenizer)
        if not samples:
            return
        rundir.write_samples(self.run_dir, state.global_step, samples)
        if self.tb_writer is not None:
            text = "\n\n".join(
                f"**prompt**\n\n```\n{s['prompt']}\n```\n\n**reference** {s['reference']}\n\n**output** {s['output']}"
                for s in samples
            )
            self.tb_writer.add_text("samples", text, state.global_step)


class EvaluateBeforeSave(TrainerCallback):
    """A checkpoint at a step that is also evaluated is written after the evaluation, so every sealed checkpoint's
    ``trainer_state.json`` holds every evaluation up to its step and a run resumed from it selects exactly the
    state an uninterrupted run selects.

    With ``save_steps`` the Trainer saves in ``on_step_end`` and evaluates (``eval_strategy="epoch"``) only in
    ``on_epoch_end``: at the last step of an epoch (or the last step of the run) the checkpoint came first. This
    callback, after HF's ``DefaultFlowCallback``, takes the save away at such a step and gives it back in
    ``on_epoch_end``, where the Trainer evaluates, then saves.
    """

    def __init__(self) -> None:
        self.deferred = False

    def on_step_end(self, args, state, control, **kwargs):
        epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        evaluated = args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= (state.epoch or 0)
        if control.should_save and evaluated and (epoch_end or control.should_training_stop):
            control.should_save, self.deferred = False, True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.deferred:
            control.should_save, self.deferred = True, False


class CheckpointSeal(TrainerCallback):
    """Seals each checkpoint (``rundir.seal_checkpoint``); must be the Trainer's last callback, so that it
    runs after the chain state and the run's files are written into the checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part (e.g. its RNG state)
        if args.should_save:
            rundir.seal_checkpoint(rundir.checkpoint_dir(args.output_dir, state.global_step))
