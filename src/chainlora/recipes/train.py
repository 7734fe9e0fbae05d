"""``chainlora train``: one recipe for LoRA, COLA and full fine-tuning, as plain functions.

    setup(config)            validate everything (config, output dir, task data, model, knot schedule): no writes
    start_run_dir(run)       create (or clear) the run directory and write config.yaml
    zero_shot(run)           score the pretrained model on the test set (cached in the run dir for --resume)
    fit(run)                 HF Trainer (+ ChainOfLoRACallback for lora/cola), dev evaluation every epoch
    finish(run, trainer)     restore the best-dev state, merge the chain, test, export final/, plots, metrics.json

Invariants:

* Nothing is written before every check has passed; every file is written atomically; ``metrics.json`` is
  written last, so its presence means the run is complete.
* LoRA is a chain of one link: the same code path (Trainer + ChainOfLoRACallback without knots) serves both;
  full fine-tuning drops PEFT and the callback.
* The selected state (lowest dev loss / highest dev score / last) is what is tested and exported: the test score
  is computed on the merged model, which is then saved in ``final/``, so ``final/`` scores exactly the same.
* A checkpoint is complete once sealed (``seal_checkpoint``: every file fsync'ed, then a marker listing them,
  written last by the last callback); the Trainer writes ``checkpoint-N`` in place, so an unsealed one is torn
  and never resumed from. A non-finite loss/gradient never reaches the weights (``chainlora.guards``).
* ``--resume`` continues from the newest complete checkpoint (for lora/cola: one that holds the chain state) and
  ends with the same weights as an uninterrupted run, wherever the previous session was killed: the LR
  schedule is a pure function of the step, the chain state is restored by the callback, the best-dev record
  is derived from the restored log history, and every step after the checkpoint is replayed exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_model, save_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import TensorBoardCallback

from chainlora import distributed, perf, tasks
from chainlora.adapter import export_adapter
from chainlora.callback import ChainOfLoRACallback
from chainlora.chain import ChainSchedule, merge_chain
from chainlora.config import TrainConfig
from chainlora.errors import ChainLoRAError, ConfigError
from chainlora.faults import maybe_crash
from chainlora.guards import NonFiniteGuard
from chainlora.io import TEMP_PREFIX, atomic_dir, atomic_path, fsync_tree, remove_temps, write_json_atomic
from chainlora.provenance import code_version
from chainlora.recipes.flops import flop_model, step_flops
from chainlora.recipes.plots import plot_loss
from chainlora.state import CHAIN_STATE_FILE, load_chain_state, save_chain_state
from chainlora.tasks.shared_prompt import SharedPromptCollator, batch_loss, shared_prompt_view

logger = logging.getLogger("chainlora")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ZERO_SHOT_FILE = "zero_shot.json"
BEST_DIR = "best"  # the selected state so far: chain state (lora/cola) or all weights (full)
BEST_RECORD = "best.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"
TIME_FILE = "chainlora_time.json"  # training seconds up to a checkpoint, so a resumed run's total is right
COMPLETE_MARKER = "chainlora_complete.json"  # written last into a checkpoint: every file in it and its size
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "adagrad": "adagrad"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything ``setup`` prepared and checked; nothing of it is on disk yet."""

    config: TrainConfig
    run_dir: Path
    task: Any  # chainlora.tasks.Task
    splits: Any  # chainlora.tasks.TaskSplits
    model: PreTrainedModel  # PEFT-wrapped for lora/cola
    tokenizer: PreTrainedTokenizerBase
    train_set: (
        Any  # chainlora.tasks.TrainingDataset, or its chainlora.tasks.shared_prompt.SharedPromptDataset view
    )
    dev_set: Any | None
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]  # batches of train_set / dev_set
    speed: Speed
    args: TrainingArguments
    schedule: ChainSchedule | None  # lora/cola (lora: no knots)
    total_steps: int
    steps_per_epoch: int
    checkpoint: Path | None = None  # resume from here
    resuming: bool = False
    zero_shot_score: float | None = None
    lora_bias: bool | None = None  # resolved lora.bias (null: on for OPT)
    trainable_params: int | None = None  # at the start of training (a rank step-down lowers it later)
    started: float = 0.0  # perf_counter() when setup began (for session_seconds)


def default_run_dir(config: TrainConfig) -> Path:
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model
    return Path("runs") / f"{config.task}-{config.method}-{model}-s{config.seed}"


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The config a run directory was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"resume: {path} not found: {run_dir} is not a chainlora run directory")
    return TrainConfig.from_dict(yaml.safe_load(path.read_text()) or {})


def setup(config: TrainConfig) -> Run:
    """Check everything a run needs, in the order that fails fastest, and build the model and datasets.

    Raises a ``ChainLoRAError`` (one line) for a bad output dir, task, data row, model, target module or knot
    schedule. Writes nothing.
    """
    from chainlora import models

    started = time.perf_counter()
    run_dir, resuming = _check_output_dir(config)
    task = tasks.get_task(config.task)
    data = tasks.load_task_data(task, data=config.data)  # logs which source it used
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

    speed = resolve_speed(config)
    args = _training_args(config, run_dir, speed)
    model, tokenizer = models.load(config.model, dtype=DTYPES[speed.base_dtype])
    train_set = tasks.build_training_dataset(task, splits.train, tokenizer, max_length=config.max_length)
    dev_set = (
        tasks.build_training_dataset(task, splits.dev, tokenizer, max_length=config.max_length)
        if splits.dev
        else None
    )
    collator: Callable = tasks.TrainingCollator(tokenizer)
    if config.shared_prompt:
        train_view = shared_prompt_view(train_set)
        dev_view = shared_prompt_view(dev_set) if dev_set is not None else None
        if train_view is not None and (dev_set is None or dev_view is not None):
            train_set, dev_set, collator = train_view, dev_view, SharedPromptCollator(tokenizer)
            speed = dataclasses.replace(speed, batching="shared_prompt")
    logger.info(
        "speed: %s autocast, %s base, %s, %s batches%s%s",
        speed.precision,
        speed.base_dtype,
        speed.optim,
        speed.batching,
        ", length-grouped" if config.group_by_length else "",
        ", compiled" if speed.compiled else "",
    )
    steps_per_epoch = _steps_per_epoch(len(train_set), config.batch_size, config.grad_accum, args.world_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    schedule = _chain_schedule(config, total_steps, steps_per_epoch) if config.method != "full" else None
    if config.method != "full":
        _check_target_modules(model, config.lora.target_modules)
        _check_ranks(model, config)
        distributed.check_rank_schedule(schedule, config.lora.r, processes=args.world_size)
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # the best-state snapshot and the final merge/save assume replicated weights
        raise ConfigError(
            "FSDP is not supported by `chainlora train` (use DDP: torchrun/accelerate launch); FSDP2 knots work "
            "through the library API, see docs/distributed.md"
        )
    run = Run(
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
        steps_per_epoch=steps_per_epoch,
        resuming=resuming,
        started=started,
    )
    if resuming:
        run.checkpoint = latest_checkpoint(run_dir / CHECKPOINTS_DIR, chain=config.method != "full")
    return run


def _check_output_dir(config: TrainConfig) -> tuple[Path, bool]:
    """The run directory and whether this is a resume. Refuses to mix a new run into an existing one."""
    if config.resume is not None:
        run_dir = Path(config.resume).expanduser()
        saved = load_run_config(run_dir)
        given, stored = config.comparable(), saved.comparable()
        given.pop("output_dir"), stored.pop("output_dir")
        for key, value in _flatten(given).items():
            if _flatten(stored).get(key) != value:
                raise ConfigError(
                    f"{key}: {value!r} differs from the run's config.yaml ({_flatten(stored).get(key)!r}); "
                    "a resumed run must keep its config (start a new run instead)"
                )
        _check_writable(run_dir)
        return run_dir, True
    run_dir = Path(config.output_dir).expanduser() if config.output_dir else default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir: {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(not p.name.startswith(TEMP_PREFIX) for p in run_dir.iterdir()):
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(
                f"output_dir: {run_dir} is not empty and holds no chainlora run; refusing to write into it"
            )
        if not config.overwrite:
            raise ConfigError(
                f"output_dir: {run_dir} already holds a run; pass --overwrite to replace it "
                f"or --resume {run_dir} to continue it"
            )
    _check_writable(run_dir)
    return run_dir, False


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {existing} is not writable")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _steps_per_epoch(examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps per epoch, as the HF Trainer counts them (last partial batch and accumulation kept)."""
    micro_batches = math.ceil(math.ceil(examples / batch_size) / world_size)
    return max(micro_batches // grad_accum + int(micro_batches % grad_accum > 0), 1)


def _chain_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> ChainSchedule:
    """The knots in optimizer steps; errors name ``chain.*`` and the budget they overran."""
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


def _check_target_modules(model: torch.nn.Module, targets: list[str] | str) -> None:
    if targets == "all-linear":
        return
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linear):
            examples = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"lora.target_modules: {target!r} matches no linear layer of the model "
                f"(its linear layers are named {', '.join(examples)})"
            )


def _check_ranks(model: torch.nn.Module, config: TrainConfig) -> None:
    """Every link's rank fits every targeted layer (a rank step-up would otherwise fail at its knot)."""
    targets = config.lora.target_modules
    ranks = [("lora.r", config.lora.r)] + [("chain.ranks", r) for r in config.chain.ranks or []]
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (
            targets != "all-linear" and not any(name == t or name.endswith("." + t) for t in targets)
        ):
            continue
        for field_name, rank in ranks:
            if rank > min(module.in_features, module.out_features):
                raise ConfigError(
                    f"{field_name}: rank {rank} is larger than layer {name} "
                    f"({module.out_features}×{module.in_features})"
                )


@dataclass(frozen=True)
class Speed:
    """The speed settings a run resolved (``auto`` made concrete for this machine); saved in metrics.json."""

    precision: str  # autocast dtype: fp32, bf16 or fp16
    base_dtype: str  # dtype of the frozen base weights (fp32 for full fine-tuning)
    optim: str  # TrainingArguments.optim
    compiled: bool = False  # torch.compile of the model (TrainingArguments.torch_compile)
    batching: str = "rows"  # "rows" (one per candidate, the harness) or "shared_prompt" (one per example)


def resolve_speed(config: TrainConfig) -> Speed:
    """``precision``/``base_dtype``/``compile`` ``auto`` → ``chainlora.perf.speed_defaults`` of the training
    device; AdamW fused where torch has the kernel. Refuses a precision the device cannot run, in one line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = perf.speed_defaults(device)
    precision = defaults.precision if config.precision == "auto" else config.precision
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision: fp16 autocast needs a GPU; use bf16 or fp32 on the CPU")
    if config.method == "full":
        base_dtype = "fp32"  # the trained weights and their AdamW state stay fp32
    else:
        base_dtype = precision if config.base_dtype == "auto" else config.base_dtype
    optim = OPTIMIZERS[config.optimizer]
    if config.optimizer == "adamw" and defaults.optim == "adamw_torch_fused":
        optim = "adamw_torch_fused"
    compiled = defaults.torch_compile if config.compile == "auto" else config.compile == "on"
    return Speed(precision=precision, base_dtype=base_dtype, optim=optim, compiled=compiled)


def _training_args(config: TrainConfig, run_dir: Path, speed: Speed) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir / CHECKPOINTS_DIR),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "optim": speed.optim,
        "eval_strategy": "epoch" if config.num_dev != 0 else "no",
        "save_strategy": "steps" if config.save_steps else "epoch",
        "save_total_limit": 2,  # the newest can be incomplete (killed while saving): keep one more
        "logging_strategy": "steps",
        "logging_steps": config.logging_steps,
        "report_to": [],
        "seed": config.train_seed,
        "data_seed": config.train_seed,
        "bf16": speed.precision == "bf16",
        "fp16": speed.precision == "fp16",
        "torch_compile": speed.compiled,
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


# ------------------------------------------------------------------------------------------ run directory


def start_run_dir(run: Run) -> None:
    """Create the run directory (replacing an old run with ``overwrite``) and write config.yaml first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # several processes: all have checked the output dir before it changes
    if not run.args.should_save:
        return
    if run.resuming:
        remove_temps(run.run_dir)  # what a killed write left behind
        if run.checkpoint is None:  # interrupted before the first checkpoint: start over in place
            for name in ("tb", BEST_DIR, CHECKPOINTS_DIR):
                shutil.rmtree(run.run_dir / name, ignore_errors=True)
        else:  # newer checkpoints are torn: drop them before the Trainer writes the same names again
            step = int(run.checkpoint.name.rsplit("-", 1)[1])
            for path in run.checkpoint.parent.iterdir():
                if (m := CHECKPOINT_RE.match(path.name)) and int(m.group(1)) > step:
                    shutil.rmtree(path)
        return
    if run.run_dir.is_dir() and any(run.run_dir.iterdir()):  # overwrite (checked in setup)
        # move the old run away in one rename, so a crash never leaves half of it looking like a run
        old = run.run_dir.with_name(f"{TEMP_PREFIX}{run.run_dir.name}.replaced-{os.getpid()}")
        os.replace(run.run_dir, old)
        shutil.rmtree(old)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    saved = run.config.to_dict() | {"output_dir": str(run.run_dir), "overwrite": False, "resume": None}
    with atomic_path(run.run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(saved, sort_keys=False))


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(folder: Path, *, chain: bool) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None. Complete: sealed by :func:`seal_checkpoint`
    (its marker is written last) and every file the marker lists still there with its size; it holds HF's
    trainer state and, for a chain, the chain state. A torn checkpoint (killed while the Trainer wrote it in
    place, or while an old one was being deleted) is never returned."""
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    )
    for _, path in reversed(found):
        required = ["trainer_state.json", *([CHAIN_STATE_FILE] if chain else [])]
        if _is_sealed(path) and all((path / name).is_file() for name in required):
            return path
    return None


def seal_checkpoint(folder: Path) -> None:
    """Mark ``folder`` complete: fsync every file in it, then write the marker (atomically, last) listing
    every file and its size. Call it after everything else of the checkpoint is written."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(TEMP_PREFIX)
    }
    fsync_tree(folder)
    maybe_crash("checkpoint_write")
    write_json_atomic(folder / COMPLETE_MARKER, {"step": int(folder.name.rsplit("-", 1)[1]), "files": files})


def _is_sealed(folder: Path) -> bool:
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class CheckpointSeal(TrainerCallback):
    """Seals each checkpoint (:func:`seal_checkpoint`); must be the Trainer's last callback, so that it
    runs after the chain state and the run's files are written into the checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part (e.g. its RNG state)
        if args.should_save:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


# -------------------------------------------------------------------------------------------- evaluation


def score(run: Run, model: torch.nn.Module, examples: Sequence[Any]) -> dict[str, Any]:
    """The task's metric of ``model`` on ``examples`` (fp32, eval mode; the model's mode is restored)."""
    return tasks.evaluate(
        model,
        run.tokenizer,
        run.task,
        examples,
        batch_size=run.config.eval_batch_size,
        max_length=run.config.max_length,
    )


@torch.no_grad()
def dataset_loss(model: torch.nn.Module, dataset: Any, collator: Callable, batch_size: int) -> float:
    """The training loss over ``dataset`` (the dev loss), averaged over examples; the model's mode is kept."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(items).items()}
            total += float(batch_loss(model, batch)) * len(items)
            count += len(items)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def zero_shot(run: Run) -> float | None:
    """Test score of the pretrained model (before any LoRA is added); cached in the run dir for resume."""
    if not run.config.zero_shot or not run.splits.test:
        return None
    cached = run.run_dir / ZERO_SHOT_FILE
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


class TaskTrainer(tasks.TaskTrainer):
    """The HF Trainer with the task's training loss (either batch form, ``chainlora.tasks.shared_prompt.batch_loss``),
    length-grouped batches seeded per epoch (``tasks.TaskTrainer``), a pure LR schedule, analytic FLOPs and task
    dev metrics."""

    # compute_loss returns a per-micro-batch mean: HF must divide it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, run: Run, lr_lambda: LinkLR, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = run
        self.lr_lambda = lr_lambda
        self.model_accepts_loss_kwargs = False  # the loss ignores num_items_in_batch
        self.nonfinite_guard: NonFiniteGuard | None = None  # sees every micro-batch loss (build_trainer)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_guard is not None:
            self.nonfinite_guard.observe_loss(loss)
        maybe_crash("mid_step")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = batch_loss(model, inputs)
        return (loss, None) if return_outputs else loss

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
        """Analytic training FLOPs of this micro-batch at the current link's rank (see recipes.flops)."""
        sequences, seq_len = inputs["input_ids"].shape
        return step_flops(flop_model(self.model), sequences, seq_len)

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Dev evaluation: the task score (``eval_score``) and the training loss on dev (``eval_loss``)."""
        run = self.run
        metrics = {
            f"{metric_key_prefix}_loss": dataset_loss(
                self.model, run.dev_set, self.data_collator, run.config.eval_batch_size
            ),
            f"{metric_key_prefix}_score": float(score(run, self.model, run.splits.dev)["score"]),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _is_better(value: float, best: float | None, selection: str) -> bool:
    return best is None or (value < best if selection == "dev_loss" else value > best)


class RunCallback(TrainerCallback):
    """Keeps the best-dev state in ``best/``, logs knots as scalars, and times training across resumes.

    The best record is re-derived from the (restored) log history at the start of every session, so it never
    needs its own checkpoint file.
    """

    def __init__(self, run: Run, chain: ChainOfLoRACallback | None, tb_writer: Any = None) -> None:
        self.run = run
        self.chain = chain
        self.tb_writer = tb_writer
        self.trainer: Trainer | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.knots_logged = 0
        self.seconds_before = 0.0
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()
        key = _selection_key(self.run.config.selection)
        for entry in state.log_history:
            if key and key in entry and _is_better(entry[key], self.best, self.run.config.selection):
                self.best, self.best_step = entry[key], entry["step"]
        self.knots_logged = len(self.chain.knots) if self.chain else 0
        if self.run.checkpoint is not None and (self.run.checkpoint / TIME_FILE).is_file():
            self.seconds_before = json.loads((self.run.checkpoint / TIME_FILE).read_text())["train_seconds"]

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
        self.knots_logged = len(self.chain.knots)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        key = _selection_key(self.run.config.selection)
        if key is None or not metrics or not _is_better(metrics[key], self.best, self.run.config.selection):
            return
        self.best, self.best_step = metrics[key], state.global_step
        if args.should_save:
            save_best_state(self.run, self.trainer.model, state.global_step, metrics)

    def on_save(self, args, state, control, **kw):
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(checkpoint / TIME_FILE, {"train_seconds": self.train_seconds})


def _selection_key(selection: str) -> str | None:
    return {"dev_loss": "eval_loss", "dev_score": "eval_score"}.get(selection)


def save_best_state(run: Run, model: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
    """Write the selected state to ``best/``: the chain state of the LoRA-targeted layers (merged base + current
    link) for lora/cola, every weight for full fine-tuning; and ``best.json`` naming its step. The folder is
    replaced as a whole (atomic_dir), so the state and its record always belong together."""
    with atomic_dir(run.run_dir / BEST_DIR, overwrite=True) as folder:
        if run.config.method == "full":
            save_model(model, str(folder / "model.safetensors"))
        else:
            save_chain_state(model, folder)
        (folder / BEST_RECORD).write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n")


def restore_best_state(run: Run, model: torch.nn.Module, step: int) -> None:
    """Load ``best/`` into ``model``; refuses a record that is not the expected step."""
    folder = run.run_dir / BEST_DIR
    record = folder / BEST_RECORD
    saved_step = json.loads(record.read_text())["step"] if record.is_file() else None
    if saved_step != step:
        raise ChainLoRAError(
            f"{folder} holds the state of step {saved_step}, but the best dev step is {step}"
        )
    if run.config.method == "full":
        load_model(model, str(folder / "model.safetensors"))
    else:
        load_chain_state(model, folder)


def wrap_model(run: Run) -> torch.nn.Module:
    """Add the first LoRA link (lora/cola), seeded by ``train_seed``; full fine-tuning trains the model as is."""
    config = run.config
    set_seed(config.train_seed)
    if config.method == "full":
        run.trainable_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        return run.model
    lora = config.lora
    bias = lora.bias if lora.bias is not None else run.model.config.model_type == "opt"
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        lora_bias=bias,
        use_rslora=lora.rslora,
        init_lora_weights="gaussian" if lora.init == "gaussian" else True,
        task_type="CAUSAL_LM",
    )
    run.model = get_peft_model(run.model, peft_config)
    run.lora_bias = bias
    run.trainable_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return run.model


def build_trainer(run: Run, callbacks: Sequence[TrainerCallback] = ()) -> tuple[TaskTrainer, RunCallback]:
    """The Trainer of this run, with the chain callback (lora/cola), TensorBoard and the run callback."""
    from torch.utils.tensorboard import SummaryWriter

    config = run.config
    chain = (
        ChainOfLoRACallback(
            run.schedule,
            init=config.lora.init,
            seed=config.train_seed,
            max_relative_delta=config.chain.max_relative_delta,
        )
        if run.schedule is not None
        else None
    )
    tb_writer = SummaryWriter(log_dir=str(run.run_dir / "tb")) if run.args.should_save else None
    run_callback = RunCallback(run, chain, tb_writer)
    guard = NonFiniteGuard(config.nonfinite, config.max_nonfinite_skips)
    all_callbacks: list[TrainerCallback] = [c for c in (guard, chain, run_callback) if c is not None]
    if tb_writer is not None:
        all_callbacks.append(TensorBoardCallback(tb_writer=tb_writer))
    lr_lambda = LinkLR(
        config.lr_schedule, run.total_steps, config.warmup, run.schedule.knots if run.schedule else ()
    )
    trainer = TaskTrainer(
        model=run.model,
        args=run.args,
        train_dataset=run.train_set,
        eval_dataset=run.dev_set,
        data_collator=run.collator,
        callbacks=[*all_callbacks, *callbacks, CheckpointSeal()],  # the seal last: it completes a checkpoint
        run=run,
        lr_lambda=lr_lambda,
    )
    trainer.nonfinite_guard = guard
    run_callback.trainer = trainer
    return trainer, run_callback


def fit(run: Run, callbacks: Sequence[TrainerCallback] = ()) -> tuple[TaskTrainer, RunCallback]:
    """Wrap the model, build the Trainer and train (from the checkpoint when resuming)."""
    wrap_model(run)
    trainer, run_callback = build_trainer(run, callbacks)
    if run.checkpoint is not None:
        logger.info("resuming from %s", run.checkpoint)
    trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    return trainer, run_callback


# ---------------------------------------------------------------------------------------------- finish


def finish(run: Run, trainer: TaskTrainer, run_callback: RunCallback) -> dict[str, Any]:
    """Restore the selected state, export the adapter (lora), merge, test, save final/, plot; metrics.json last."""
    config, state = run.config, trainer.state
    train_seconds = run_callback.train_seconds
    trainer.accelerator.wait_for_everyone()
    model = trainer.model
    selected_step = state.global_step
    if run_callback.best_step is not None:
        selected_step = run_callback.best_step
        restore_best_state(run, model, selected_step)
    adapter = None
    if config.save_adapter and config.method != "full" and run.args.should_save:
        # the whole chain as one PEFT LoRA (rank Σ r_i) on the original base: before the final merge
        adapter = export_adapter(model, run.run_dir / ADAPTER_DIR, overwrite=True).to_dict()
    if config.method != "full":
        model = merge_chain(model)
    model.eval()
    test = score(run, model, run.splits.test) if run.splits.test else None
    dev_history = [
        {"step": e["step"], "epoch": e.get("epoch"), "dev_loss": e["eval_loss"], "dev_score": e["eval_score"]}
        for e in state.log_history
        if "eval_loss" in e
    ]
    selected = next((e for e in dev_history if e["step"] == selected_step), None)
    knots = [
        {"step": k.step, "link": k.link, "next_rank": k.next_rank, "delta_norm": k.delta_norm}
        for k in (run_callback.chain.knots if run_callback.chain else [])
    ]
    train_loss = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e]
    metrics: dict[str, Any] = {
        "task": run.task.name,
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "train_seed": config.train_seed,
        "metric": test["metric"] if test else None,
        "selection": config.selection,
        "selected_step": selected_step,
        "dev_score": selected["dev_score"] if selected else None,
        "dev_loss": selected["dev_loss"] if selected else None,
        "test_score": float(test["score"]) if test else None,
        "zero_shot_test_score": run.zero_shot_score,
        "train_flops": float(state.total_flos),
        "train_seconds": round(
            train_seconds, 2
        ),  # the training loop (dev evaluations included), all sessions
        "session_seconds": round(
            time.perf_counter() - run.started, 2
        ),  # this command: load, 0-shot, train, test
        "train_steps": state.global_step,
        "epochs": config.epochs,
        "lr": config.lr,
        "chain_length": run.schedule.chain_length if run.schedule else None,
        "ranks": [config.lora.r] + [k["next_rank"] for k in knots] if run.schedule else None,  # per link
        "knot_decisions": [dataclasses.asdict(d) for d in getattr(run.schedule, "decisions", [])],
        "lora_bias": run.lora_bias,
        "speed": dataclasses.asdict(run.speed) | {"group_by_length": config.group_by_length},
        "knots": knots,
        "skipped_steps": [e["step"] for e in state.log_history if "skipped" in e],  # non-finite, not applied
        "num_train": len(run.splits.train),
        "num_dev": len(run.splits.dev),
        "num_eval": len(run.splits.test),
        "data_source": run.splits.source.description,
        "trainable_params": run.trainable_params,
        "train_loss": train_loss,
        "dev_history": dev_history,
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        "run_dir": str(run.run_dir),
        "adapter_bytes": adapter["bytes"] if adapter else None,
        "adapter": adapter,
        "code": code_version(),
    }
    if run.args.should_save:
        with atomic_dir(run.run_dir / FINAL_DIR, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
            maybe_crash("final_export")
        plot_loss(
            run.run_dir / "loss.png",
            train_loss,
            dev_loss=[(e["step"], e["dev_loss"]) for e in dev_history],
            knots=[k["step"] for k in knots],
            title=f"{run.task.name} · {config.method} · {config.model}",
        )
        write_json_atomic(run.run_dir / METRICS_FILE, metrics)  # last: the run is complete
    trainer.accelerator.wait_for_everyone()  # no process may still be reading best/ or a checkpoint
    if run.args.should_save:
        if not config.keep_checkpoints:
            shutil.rmtree(run.run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        shutil.rmtree(run.run_dir / BEST_DIR, ignore_errors=True)
    return metrics


# ------------------------------------------------------------------------------------------------ main


def train(config: TrainConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run end to end and return its metrics (also in ``metrics.json``)."""
    if config.resume is not None and (Path(config.resume) / METRICS_FILE).is_file():
        logger.info("%s is already complete", config.resume)
        return json.loads((Path(config.resume) / METRICS_FILE).read_text())
    run = setup(config)
    start_run_dir(run)
    zero_shot(run)
    trainer, run_callback = fit(run, callbacks)
    return finish(run, trainer, run_callback)
