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
* ``--quantize nf4|fp4|int8`` (QLoRA) loads the base quantized by bitsandbytes; every knot folds the link into a
  frozen residual beside the quantized weight (``chainlora.quantized``), ``adapter/`` loads onto the quantized
  base, and the test score is the trained model's (``final/`` only on request: the chain merged into the
  dequantized base in bf16, the error of the cast recorded).
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
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback

from chainlora import distributed, models, quantized, rundir
from chainlora.adapter import export_adapter
from chainlora.callback import ChainOfLoRACallback
from chainlora.chain import check_ranks_fit
from chainlora.config import TrainConfig
from chainlora.errors import ConfigError
from chainlora.guards import NonFiniteGuard
from chainlora.io import write_json_atomic
from chainlora.perf import DTYPES, resolve_speed
from chainlora.recipes.export import adapter_reference, final_model
from chainlora.recipes.plots import plot_loss
from chainlora.recipes.run import Run, run_metrics, train_summary
from chainlora.recipes.trainer import (
    SELECTION_KEYS,
    CheckpointSeal,
    LinkLR,
    RunCallback,
    RunTrainer,
    SampleGenerations,
    knot_schedule,
    steps_per_epoch,
    training_arguments,
)
from chainlora.recipes.workload import Workload, load_workload, scalar_metrics
from chainlora.schedules import ChainSchedule

logger = logging.getLogger("chainlora")


# ------------------------------------------------------------------------------------------------- setup


def setup(config: TrainConfig) -> Run:
    """Check everything a run needs, in the order that fails fastest, and build the model and datasets.

    Raises a ``ChainLoRAError`` (one line) for a bad output dir, task, data file or row, model, target module or
    knot schedule. Writes nothing.
    """
    started = time.perf_counter()
    run_dir, resuming = rundir.check_run_dir(config)
    workload = load_workload(config)  # every row read and checked, the seed's splits drawn
    speed = resolve_speed(config)
    args = training_arguments(config, run_dir, speed)
    bnb = None  # QLoRA: 4-bit layers compute in the autocast dtype
    if config.quantize != "none":
        bnb = quantized.bnb_config(config.quantize, DTYPES[speed.precision])  # refuses a missing bitsandbytes
    model, tokenizer = models.load(
        config.model, dtype=speed.torch_base_dtype, quantization_config=bnb, device=args.device
    )
    quantized.disable_cpu_bf16_repack(model)  # before the first eval-mode forward (the 0-shot score)
    train_set, dev_set, collator, batching = workload.datasets(tokenizer, config)
    speed = dataclasses.replace(speed, batching=batching)
    logger.info("speed: %s", speed.describe())
    reset = config.chain.optimizer_reset
    if 0 < reset < 1 and not (config.lr_schedule == "jagged" and config.warmup > 0):
        logger.warning(
            "warning: chain.optimizer_reset %g keeps the optimizer's step count with pruned moments: without a "
            "warmup after each knot (--lr_schedule jagged with --warmup, as ReLoRA) a link's first updates can "
            "diverge (measured in docs/beyond_the_paper.md, section 3)",
            reset,
        )
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
    checkpoint = None
    if resuming:  # the newest intact checkpoint whose best/ is intact too (one warning line otherwise)
        checkpoint = rundir.resume_checkpoint(
            run_dir,
            chain=schedule is not None,
            key=SELECTION_KEYS.get(config.selection),
            lower_is_better=config.selection == "dev_loss",
        )
    return Run(
        config=config,
        run_dir=run_dir,
        workload=workload,
        model=model,
        tokenizer=tokenizer,
        train_set=train_set,
        dev_set=dev_set,
        collator=collator,
        speed=speed,
        args=args,
        schedule=schedule,
        total_steps=total_steps,
        checkpoint=checkpoint,
        resuming=resuming,
        started=started,
    )


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
    # with quantize, a knot folds into a quantized layer's residual; PEFT's all-linear skips the head
    if config.quantize != "none":
        head = model.get_output_embeddings()
        plain = [
            n
            for n, m in linear
            if quantized.quantization(m) is None and (targets != "all-linear" or m is not head)
        ]
        if plain:
            raise ConfigError(
                f"lora.target_modules: {plain[0]} is not quantized by bitsandbytes (it keeps output heads and "
                f"unsupported layers in full precision); target quantized layers only with --quantize {config.quantize}"
            )


# ------------------------------------------------------------------------------------------ zero-shot


def zero_shot(run: Run) -> dict[str, Any] | None:
    """The pretrained model's test metrics (before any LoRA is added); cached in the run dir for resume."""
    if not run.config.zero_shot or not run.workload.test:
        return None
    cached = run.run_dir / rundir.ZERO_SHOT_FILE
    if run.resuming and cached.is_file():
        run.zero_shot = json.loads(cached.read_text())
        return run.zero_shot
    logger.info("scoring the pretrained model (0-shot) on %d test examples", len(run.workload.test))
    if run.config.quantize == "none":  # a quantized model was loaded onto its device
        run.model.to(run.args.device)
    result = scalar_metrics(run.workload.evaluate(run.model, run.tokenizer, "test"))
    run.zero_shot = {"test_score": result.get("score"), "metric": run.workload.metric, "metrics": result}
    if run.args.should_save:
        write_json_atomic(cached, run.zero_shot)
    if run.zero_shot["test_score"] is not None:
        logger.info("0-shot test %s: %.4f", run.workload.metric, run.zero_shot["test_score"])
    return run.zero_shot


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
        quantized.attach_residuals(run.model)  # QLoRA: each quantized layer's residual, before DDP wraps it
    run.trainable_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return run.model


def build_trainer(run: Run, callbacks: Sequence[TrainerCallback] = ()) -> tuple[RunTrainer, RunCallback]:
    """The Trainer of this run: the non-finite guard, the chain callback (lora/cola), the run callback,
    TensorBoard, the caller's ``callbacks``, and the checkpoint seal last."""
    from torch.utils.tensorboard import SummaryWriter

    config = run.config
    # the dev score costs a pass of scoring (generation, for your data): made when it selects, or for a task
    score_on_dev = (
        config.selection == "dev_score" or config.task is not None or run.workload.metric == "accuracy"
    )
    chain = None
    if run.schedule is not None:
        chain = ChainOfLoRACallback(
            run.schedule,
            init=config.lora.init,
            seed=config.train_seed,
            max_relative_delta=config.chain.max_relative_delta,
            quantized_merge=config.chain.quantized_merge,
            max_residual_rank=config.chain.max_residual_rank,
            optimizer_reset=config.chain.optimizer_reset,
        )
    to_tensorboard = "tensorboard" in config.report_to
    tb_writer = (
        SummaryWriter(log_dir=str(run.run_dir / rundir.TB_DIR))
        if run.args.should_save and to_tensorboard
        else None
    )
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
    if config.data.eval_samples and run.workload.samples is not Workload.samples:
        all_callbacks.append(
            SampleGenerations(run.workload, run.tokenizer, run.run_dir, tb_writer, run.args.should_save)
        )
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
        loss=run.workload.loss,
        evaluate_dev=lambda model: scalar_metrics(
            run.workload.evaluate(model, run.tokenizer, "dev", score=score_on_dev)
        ),
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
        base, readme = adapter_reference(config.model)
        if config.quantize != "none":
            readme += _quantized_readme(config)
        adapter = export_adapter(
            model,
            run.run_dir / rundir.ADAPTER_DIR,
            base_model_name_or_path=base,
            readme=readme,
            overwrite=True,
        ).to_dict()
    save_final = config.save_final if config.save_final is not None else config.quantize == "none"
    quantized_info = None
    if config.quantize != "none":
        # the trained model is tested, unless final/ (the chain merged into the dequantized base) is asked for
        model, quantized_info = _finish_quantized(run, model, merge=save_final)
    else:
        # merged, in the base's own dtype: what final/ holds and the test scores
        model = final_model(run, model)
    test = run.workload.evaluate(model, run.tokenizer, "test") if run.workload.test else None
    knots = run_callback.chain.knots if run_callback.chain else []
    metrics = run_metrics(run, trainer.state, selected_step, test, knots, adapter, train_seconds)
    if quantized_info is not None:
        metrics["quantized"] = quantized_info
    if run.args.should_save:
        if save_final:
            rundir.write_final_model(run.run_dir, model, run.tokenizer)
        plot_loss(
            run.run_dir / rundir.LOSS_PLOT,
            metrics["train_loss"],
            dev_loss=[(e["step"], e["dev_loss"]) for e in metrics["dev_history"]],
            knots=[k["step"] for k in metrics["knots"]],
            title=f"{run.workload.name} · {config.method} · {config.model}",
        )
        rundir.write_metrics(run.run_dir, metrics)  # last: the run is complete
    trainer.accelerator.wait_for_everyone()  # no process may still be reading best/ or a checkpoint
    if run.args.should_save:
        rundir.remove_training_state(run.run_dir, keep_checkpoints=config.keep_checkpoints)
    return metrics


def _quantized_readme(config: TrainConfig) -> str:
    """adapter/README.md, for a run on a quantized base: how to load that base, and what the adapter gives."""
    return (
        f"\nThe chain was trained on this base quantized by bitsandbytes ({config.quantize}). On the base "
        "quantized the same way it computes the trained model (every tied link is in the adapter, exactly):\n\n"
        f'```python\nfrom chainlora import quantized\n\nbnb = quantized.bnb_config("{config.quantize}", '
        "torch.bfloat16)  # the compute dtype of your choice\n"
        f'base, tokenizer = models.load("{config.model}", quantization_config=bnb, device="cuda")\n'
        'model = PeftModel.from_pretrained(base, "adapter")\n```\n\n'
        "On the unquantized base (as above) it differs from the trained model by the quantization error only.\n"
    )


def _finish_quantized(
    run: Run, model: torch.nn.Module, *, merge: bool
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What ``metrics.json`` records of a quantized run, and the model to test: the trained one, or with
    ``merge`` the chain merged into the dequantized base in bf16 (the relative error of that cast recorded)."""
    chain = run.config.chain
    info: dict[str, Any] = {
        "scheme": run.config.quantize,
        "bitsandbytes": quantized.bitsandbytes_version(),
        "quantized_merge": chain.quantized_merge,
        "max_residual_rank": chain.max_residual_rank,
        "residual_MiB": round(quantized.residual_memory_bytes(model) / 2**20, 4),
        "final": None,
    }
    run.test_precision = f"{run.config.quantize} base"  # the trained model: quantized base + chain
    if merge:
        model, report = quantized.merge_dequantized(model, torch.bfloat16)
        info["final"] = report.to_dict()
        run.test_precision = "bf16"  # final/: the chain merged into the dequantized base
        logger.info("final/: the chain merged into the dequantized base, %s", report.dtype)
    model.config.use_cache = True  # training switched it off
    return model.eval(), info


# ------------------------------------------------------------------------------------------------ main


def train(config: TrainConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run end to end and return its metrics (also in ``metrics.json``)."""
    if config.resume is not None and rundir.is_finished(config.resume):
        main = int(os.environ.get("RANK", "0")) == 0  # checked before any process group exists
        return rundir.resume_finished(config, main=main)  # the same config check, then the cleanup it missed
    run = setup(config)
    with rundir.storage_errors(run.run_dir, chain=run.schedule is not None):  # a full disk: one line, no loss
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
