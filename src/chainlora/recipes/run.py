"""One training run of ``chainlora train``: what ``setup`` prepares (:class:`Run`) and what the run reports
(``metrics.json``, :func:`run_metrics`, and the lines ``chainlora train`` prints, :func:`train_summary`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerState, TrainingArguments

from chainlora import tasks
from chainlora.chain import KnotRecord
from chainlora.config import TrainConfig
from chainlora.perf import Speed
from chainlora.provenance import code_version
from chainlora.schedules import KnotSchedule


@dataclass
class Run:
    """Everything ``setup`` prepared and checked; nothing of it is on disk yet."""

    config: TrainConfig
    run_dir: Path
    task: tasks.Task
    splits: tasks.TaskSplits
    model: PreTrainedModel  # PEFT-wrapped for lora/cola once fit() starts
    tokenizer: PreTrainedTokenizerBase
    train_set: Any  # tasks.TrainingDataset, or its tasks.shared_prompt.SharedPromptDataset view
    dev_set: Any | None
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]  # batches of train_set / dev_set
    speed: Speed
    args: TrainingArguments
    schedule: KnotSchedule | None  # lora/cola (lora: no knots)
    total_steps: int
    checkpoint: Path | None = None  # resume from here
    resuming: bool = False
    zero_shot_score: float | None = None
    lora_bias: bool | None = None  # resolved lora.bias (null: on for OPT)
    trainable_params: int | None = None  # at the start of training (a rank step-down lowers it later)
    started: float = 0.0  # perf_counter() when setup began (for session_seconds)


def run_metrics(
    run: Run,
    state: TrainerState,
    selected_step: int,
    test: dict[str, Any] | None,
    knots: Sequence[KnotRecord],
    adapter: dict[str, Any] | None,
    train_seconds: float,
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run's identity, its scores at the selected step, budget, chain and data."""
    config = run.config
    dev_history = [
        {"step": e["step"], "epoch": e.get("epoch"), "dev_loss": e["eval_loss"], "dev_score": e["eval_score"]}
        for e in state.log_history
        if "eval_loss" in e
    ]
    selected = next((e for e in dev_history if e["step"] == selected_step), None)
    knot_rows = [
        {"step": k.step, "link": k.link, "next_rank": k.next_rank, "delta_norm": k.delta_norm} for k in knots
    ]
    return {
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
        "ranks": [config.lora.r] + [k.next_rank for k in knots] if run.schedule else None,  # per link
        "knot_decisions": [dataclasses.asdict(d) for d in (run.schedule.decisions if run.schedule else [])],
        "lora_bias": run.lora_bias,
        "speed": dataclasses.asdict(run.speed),
        "knots": knot_rows,
        "skipped_steps": [e["step"] for e in state.log_history if "skipped" in e],  # non-finite, not applied
        "num_train": len(run.splits.train),
        "num_dev": len(run.splits.dev),
        "num_eval": len(run.splits.test),
        "data_source": run.splits.source.description,
        "trainable_params": run.trainable_params,
        "train_loss": [(e["step"], e["loss"]) for e in state.log_history if "loss" in e],
        "dev_history": dev_history,
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        "run_dir": str(run.run_dir),
        "adapter_bytes": adapter["bytes"] if adapter else None,
        "adapter": adapter,
        "code": code_version(),
    }


def train_summary(metrics: dict[str, Any]) -> str:
    """The lines ``chainlora train`` prints at the end: scores, selection, budget, knots, where the run is."""
    metric = metrics.get("metric") or "score"
    lines = [
        f"{metrics['task']} · {metrics['method']} · {metrics['model']} · {metrics['num_eval']} test examples"
    ]
    if metrics.get("zero_shot_test_score") is not None:
        lines.append(f"  0-shot     test {metric}: {metrics['zero_shot_test_score']:.4f}")
    if metrics.get("test_score") is not None:
        selected = f"step {metrics['selected_step']}"
        if metrics.get("dev_score") is not None:
            selected += f", by {metrics['selection']}; dev {metric} {metrics['dev_score']:.4f}"
        lines.append(f"  fine-tuned test {metric}: {metrics['test_score']:.4f}   ({selected})")
    lines.append(
        f"  trained {metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s, "
        f"{metrics['train_flops']:.3g} FLOPs; knots at {[k['step'] for k in metrics['knots']] or 'none'}"
    )
    lines.append(f"  run: {metrics['run_dir']} (final/ = merged model, metrics.json, loss.png, tb/)")
    return "\n".join(lines)
