"""``chainlora train``: one recipe for LoRA, COLA and full fine-tuning, as plain functions.

    setup(config)          check everything a run needs and build the model and datasets; writes nothing
    start_run_dir(...)     create (or clear) the run directory, config.yaml first          (chainlora.rundir)
    zero_shot(run)         score the pretrained model on the test set (cached in the run dir for --resume)
    fit(run)               add the first link; HF Trainer + ChainOfLoRACallback; dev evaluation every epoch
                           (``compile: auto`` trains eagerly if compiling fails: ``speed.compile`` says why)
    finish(run, trainer)   restore the best dev state, export adapter/, merge, test, final/, metrics.json last

The run directory's names and rules are ``chainlora.rundir``; the Trainer, its LR schedule and callbacks are
``chainlora.recipes.trainer``; the knots are ``chainlora.callback`` over ``chainlora.chain``.

Invariants:

* Nothing is written before every check has passed; ``metrics.json`` is written last, so its presence means the
  run is complete.
* LoRA is a chain of one link: the same code path (Trainer + ChainOfLoRACallback without knots) serves both;
  full fine-tuning drops PEFT and the callback.
* The selected state (lowest dev loss / highest dev score / last) is what is tested and exported: the test score
  is computed on the merged model, which is then saved in ``final/``, so ``final/`` scores exactly the same.
* ``--resume`` continues from the newest complete checkpoint (for lora/cola: one that holds the chain state) and
  ends with the same weights as an uninterrupted run, wherever the previous session was killed: the LR
  schedule is a pure function of the step, the chain state is restored by the callback, the best-dev record
  is derived from the restored log history, and every step after the checkpoint is replayed exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback

from chainlora import distributed, models, rundir, tasks
from chainlora.adapter import export_adapter
from chainlora.callback import ChainOfLoRACallback
from chainlora.chain import check_ranks_fit, merge_chain
from chainlora.config import TrainConfig
from chainlora.errors import ConfigError
from chainlora.guards import NonFiniteGuard
from chainlora.io import write_json_atomic
from chainlora.perf import Speed, resolve_speed
from chainlora.recipes.plots import plot_loss
from chainlora.recipes.run import Run, run_metrics, train_summary
from chainlora.recipes.trainer import (
    CheckpointSeal,
    LinkLR,
    RunCallback,
    RunTrainer,
    knot_schedule,
    steps_per_epoch,
    training_arguments,
)
from chainlora.schedules import ChainSchedule
from chainlora.tasks.shared_prompt import SharedPromptCollator, shared_prompt_view

logger = logging.getLogger("chainlora")


# ------------------------------------------------------------------------------------------------- setup


def setup(config: TrainConfig) -> Run:
    """Check everything a run needs, in the order that fails fastest, and build the model and datasets.

    Raises a ``ChainLoRAError`` (one line) for a bad output dir, task, data row, model, target module or knot
    schedule. Writes nothing.
    """
    started = time.perf_counter()
    run_dir, resuming = rundir.check_run_dir(config)
    task = tasks.get_task(config.task)
    splits = _draw_splits(config, task)
    speed = resolve_speed(config)
    args = training_arguments(config, run_dir, speed)
    model, tokenizer = models.load(config.model, dtype=speed.torch_base_dtype)
    train_set, dev_set, collator, speed = _datasets(config, task, splits, tokenizer, speed)
    logger.info("speed: %s", speed.describe())
    epoch_steps = steps_per_epoch(len(train_set), config.batch_size, config.grad_accum, args.world_size)
    total_steps = config.max_steps or epoch_steps * config.epochs
    schedule = None
    if config.method != "full":
        schedule = knot_schedule(config, total_steps, epoch_steps)
        _check_lora_targets(model, config)
        distributed.check_rank_schedule(schedule, config.lora.r, processes=args.world_size)
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # the best-state snapshot and the final merge/save assume replicated weights
        raise ConfigError(
            "FSDP is not supported by `chainlora train` (use DDP: torchrun/accelerate launch); FSDP2 knots work "
            "through the library API, see docs/distributed.md"
        )
    checkpoints = run_dir / rundir.CHECKPOINTS_DIR
    return Run(
        config=config,
        run_dir=run_dir,
        task=task,
        splits=splits,
        model=model,
        tokenizer=tokenizer,
        train_set=train_set,
        dev_set=dev_set,
        collator=collator,
        speed=speed,
        args=args,
        schedule=schedule,
        total_steps=total_steps,
        checkpoint=rundir.latest_checkpoint(checkpoints, chain=schedule is not None) if resuming else None,
        resuming=resuming,
        started=started,
    )


def _draw_splits(config: TrainConfig, task: tasks.Task) -> tasks.TaskSplits:
    """The seed's train/dev/test examples (the data source is logged); refuses an empty split the run needs."""
    data = tasks.load_task_data(task, data=config.data)
    splits = data.sample(
        config.seed,
        num_train=config.num_train,
        num_dev=config.num_dev,
        num_eval=config.num_eval,
        harness_quirks=config.harness_quirks,
    )
    if not splits.train:
        raise ConfigError(f"num_train: task {task.name} drew no training examples")
    if config.selection != "last" and not splits.dev:
        raise ConfigError(f"selection: {config.selection!r} needs a dev set, but task {task.name} drew none")
    if config.num_eval and not splits.test:
        raise ConfigError(f"num_eval: task {task.name} drew no test examples")
    return splits


def _datasets(
    config: TrainConfig,
    task: tasks.Task,
    splits: tasks.TaskSplits,
    tokenizer: PreTrainedTokenizerBase,
    speed: Speed,
) -> tuple[Any, Any | None, Callable, Speed]:
    """Train and dev sets in the task's training view and their collator: one row per example (the shared
    prompt) where every example qualifies and ``shared_prompt`` is on, else the harness's rows."""
    train_set = tasks.build_training_dataset(task, splits.train, tokenizer, max_length=config.max_length)
    dev_set = None
    if splits.dev:
        dev_set = tasks.build_training_dataset(task, splits.dev, tokenizer, max_length=config.max_length)
    collator: Callable = tasks.TrainingCollator(tokenizer)
    if config.shared_prompt:
        train_view = shared_prompt_view(train_set)
        dev_view = shared_prompt_view(dev_set) if dev_set is not None else None
        if train_view is not None and (dev_set is None or dev_view is not None):
            train_set, dev_set, collator = train_view, dev_view, SharedPromptCollator(tokenizer)
            speed = dataclasses.replace(speed, batching="shared_prompt")
    return train_set, dev_set, collator, speed


def _check_lora_targets(model: torch.nn.Module, config: TrainConfig) -> None:
    """Every target module names a linear layer of the model, and every link's rank fits every targeted layer
    (a rank step-up would otherwise fail only at its knot)."""
    targets = config.lora.target_modules
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if targets != "all-linear":
        for target in targets:
            if not any(name == target or name.endswith("." + target) for name, _ in linear):
                examples = sorted({name.rsplit(".", 1)[-1] for name, _ in linear})
                raise ConfigError(
                    f"lora.target_modules: {target!r} matches no linear layer of the model "
                    f"(its linear layers are named {', '.join(examples)})"
                )
        linear = [(n, m) for n, m in linear if any(n == t or n.endswith("." + t) for t in targets)]
    ranks = [("lora.r", config.lora.r)] + [("chain.ranks", r) for r in config.chain.ranks or []]
    check_ranks_fit(linear, ranks)


# ------------------------------------------------------------------------------------------ zero-shot


def score(run: Run, model: torch.nn.Module, examples: Sequence[tasks.Example]) -> dict[str, Any]:
    """The task's metric of ``model`` on ``examples`` (eval mode; the model's mode is restored)."""
    return tasks.evaluate(
        model,
        run.tokenizer,
        run.task,
        examples,
        batch_size=run.config.eval_batch_size,
        max_length=run.config.max_length,
    )


def zero_shot(run: Run) -> float | None:
    """Test score of the pretrained model (before any LoRA is added); cached in the run dir for resume."""
    if not run.config.zero_shot or not run.splits.test:
        return None
    cached = run.run_dir / rundir.ZERO_SHOT_FILE
    if run.resuming and cached.is_file():
        run.zero_shot_score = float(json.loads(cached.read_text())["test_score"])
        return run.zero_shot_score
    logger.info("scoring the pretrained model (0-shot) on %d test examples", len(run.splits.test))
    run.model.to(run.args.device)
    result = score(run, run.model, run.splits.test)
    run.zero_shot_score = float(result["score"])
    if run.args.should_save:
        write_json_atomic(cached, {"test_score": run.zero_shot_score, "metric": result["metric"]})
    logger.info("0-shot test %s: %.4f", result["metric"], run.zero_shot_score)
    return run.zero_shot_score


# ------------------------------------------------------------------------------------------------- fit


def wrap_model(run: Run) -> torch.nn.Module:
    """Add the first LoRA link (lora/cola), seeded by ``train_seed``; full fine-tuning trains the model as is."""
    config = run.config
    set_seed(config.train_seed)
    if config.method != "full":
        lora = config.lora
        run.lora_bias = lora.bias if lora.bias is not None else run.model.config.model_type == "opt"
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            lora_bias=run.lora_bias,
            use_rslora=lora.rslora,
            init_lora_weights="gaussian" if lora.init == "gaussian" else True,
            task_type="CAUSAL_LM",
        )
        run.model = get_peft_model(run.model, peft_config)
    run.trainable_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return run.model


def build_trainer(run: Run, callbacks: Sequence[TrainerCallback] = ()) -> tuple[RunTrainer, RunCallback]:
    """The Trainer of this run: the non-finite guard, the chain callback (lora/cola), the run callback,
    TensorBoard, the caller's ``callbacks``, and the checkpoint seal last."""
    from torch.utils.tensorboard import SummaryWriter

    config = run.config
    chain = None
    if run.schedule is not None:
        chain = ChainOfLoRACallback(
            run.schedule,
            init=config.lora.init,
            seed=config.train_seed,
            max_relative_delta=config.chain.max_relative_delta,
        )
    tb_writer = SummaryWriter(log_dir=str(run.run_dir / rundir.TB_DIR)) if run.args.should_save else None
    run_callback = RunCallback(
        run.run_dir,
        selection=config.selection,
        full=config.method == "full",
        chain=chain,
        tb_writer=tb_writer,
        resumed_from=run.checkpoint,
    )
    guard = NonFiniteGuard(config.nonfinite, config.max_nonfinite_skips)
    all_callbacks: list[TrainerCallback] = [c for c in (guard, chain, run_callback) if c is not None]
    if tb_writer is not None:
        all_callbacks.append(TensorBoardCallback(tb_writer=tb_writer))
    knots = run.schedule.knots if isinstance(run.schedule, ChainSchedule) else ()  # jagged needs fixed knots
    trainer = RunTrainer(
        model=run.model,
        args=run.args,
        train_dataset=run.train_set,
        eval_dataset=run.dev_set,
        data_collator=run.collator,
        callbacks=[*all_callbacks, *callbacks, CheckpointSeal()],  # the seal last: it completes a checkpoint
        lr_lambda=LinkLR(config.lr_schedule, run.total_steps, config.warmup, knots),
        nonfinite_guard=guard,
        dev_score=lambda model: score(run, model, run.splits.dev)["score"],
        compile_fallback=run.speed.compile == "auto → on",  # compile: on fails loudly instead
    )
    return trainer, run_callback


def fit(run: Run, callbacks: Sequence[TrainerCallback] = ()) -> tuple[RunTrainer, RunCallback]:
    """Wrap the model, build the Trainer and train (from the checkpoint when resuming)."""
    wrap_model(run)
    trainer, run_callback = build_trainer(run, callbacks)
    if run.checkpoint is not None:
        logger.info("resuming from %s", run.checkpoint)
    trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    if trainer.compile_failure is not None:
        run.speed = dataclasses.replace(
            run.speed, compiled=False, compile=f"failed → eager: {trainer.compile_failure}"
        )
    return trainer, run_callback


# ---------------------------------------------------------------------------------------------- finish


def finish(run: Run, trainer: RunTrainer, run_callback: RunCallback) -> dict[str, Any]:
    """Restore the selected state, export the adapter (lora/cola), merge, test, save final/ and the loss plot;
    metrics.json last. Returns the metrics."""
    config = run.config
    train_seconds = run_callback.train_seconds
    trainer.accelerator.wait_for_everyone()
    model = trainer.model
    selected_step = trainer.state.global_step
    if run_callback.best_step is not None:
        selected_step = run_callback.best_step
        rundir.restore_best_state(run.run_dir, model, selected_step, full=config.method == "full")
    adapter = None
    if config.save_adapter and config.method != "full" and run.args.should_save:
        # the whole chain as one PEFT LoRA (rank Σ r_i) on the original base: before the final merge
        adapter = export_adapter(model, run.run_dir / rundir.ADAPTER_DIR, overwrite=True).to_dict()
    if config.method != "full":
        model = merge_chain(model)
    model.eval()
    test = score(run, model, run.splits.test) if run.splits.test else None
    knots = run_callback.chain.knots if run_callback.chain else []
    metrics = run_metrics(run, trainer.state, selected_step, test, knots, adapter, train_seconds)
    if run.args.should_save:
        rundir.write_final_model(run.run_dir, model, run.tokenizer)
        plot_loss(
            run.run_dir / rundir.LOSS_PLOT,
            metrics["train_loss"],
            dev_loss=[(e["step"], e["dev_loss"]) for e in metrics["dev_history"]],
            knots=[k["step"] for k in metrics["knots"]],
            title=f"{run.task.name} · {config.method} · {config.model}",
        )
        rundir.write_metrics(run.run_dir, metrics)  # last: the run is complete
    trainer.accelerator.wait_for_everyone()  # no process may still be reading best/ or a checkpoint
    if run.args.should_save:
        rundir.remove_training_state(run.run_dir, keep_checkpoints=config.keep_checkpoints)
    return metrics


# ------------------------------------------------------------------------------------------------ main


def train(config: TrainConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run end to end and return its metrics (also in ``metrics.json``)."""
    if config.resume is not None and rundir.is_finished(config.resume):
        logger.info("%s is already complete", config.resume)
        return rundir.read_metrics(config.resume)
    run = setup(config)
    rundir.start_run_dir(
        run.run_dir, config, resuming=run.resuming, checkpoint=run.checkpoint, main=run.args.should_save
    )
    zero_shot(run)
    trainer, run_callback = fit(run, callbacks)
    return finish(run, trainer, run_callback)


def train_command(config: TrainConfig) -> int:
    """``chainlora train``: train, then print a summary (once under torchrun/accelerate: on rank 0)."""
    metrics = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(train_summary(metrics))
    return 0
