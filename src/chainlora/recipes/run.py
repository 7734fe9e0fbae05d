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

from chainlora.chain import KnotRecord
from chainlora.config import TrainConfig
from chainlora.perf import Speed
from chainlora.provenance import code_version
from chainlora.recipes.workload import Workload, improvement_line, scalar_metrics
from chainlora.schedules import KnotSchedule


@dataclass
class Run:
    """Everything ``setup`` prepared and checked; nothing of it is on disk yet."""

    config: TrainConfig
    run_dir: Path
    workload: Workload  # what it trains on and how it is scored: a task, or your data
    model: PreTrainedModel  # PEFT-wrapped for lora/cola once fit() starts
    tokenizer: PreTrainedTokenizerBase
    train_set: Any  # tasks.TrainingDataset (or its shared-prompt view), or data.EncodedDataset
    dev_set: Any | None
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]  # batches of train_set / dev_set
    speed: Speed
    args: TrainingArguments
    schedule: KnotSchedule | None  # lora/cola (lora: no knots)
    total_steps: int
    checkpoint: Path | None = None  # resume from here
    resuming: bool = False
    zero_shot: dict[str, Any] | None = None  # {"test_score", "metric", "metrics"} of the pretrained model
    lora_bias: bool | None = None  # resolved lora.bias (null: on for OPT)
    trainable_params: int | None = None  # at the start of training (a rank step-down lowers it later)
    # the dtype of final/, the model the test score is computed on (no autocast)
    test_precision: str | None = None
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
        {
            "step": e["step"],
            "epoch": e.get("epoch"),
            "dev_loss": e["eval_loss"],
            "dev_score": e.get("eval_score"),
        }
        | {
            f"dev_{k[5:]}": v
            for k, v in e.items()
            if k.startswith("eval_") and k not in ("eval_loss", "eval_score")
        }
        for e in state.log_history
        if "eval_loss" in e
    ]
    selected = next((e for e in dev_history if e["step"] == selected_step), None)
    # QLoRA knots; the optimizer state a knot zeroed (absent: the optimizer held none yet)
    optional = (
        "quantized_merge", "residual_rank", "compression_errors", "requantize_errors", "optimizer_state_zeroed"
    )  # fmt: skip
    knot_rows = [
        {"step": k.step, "link": k.link, "next_rank": k.next_rank, "delta_norm": k.delta_norm}
        | {f: getattr(k, f) for f in optional if getattr(k, f) is not None}
        for k in knots
    ]
    workload = run.workload
    zero_shot = run.zero_shot or {}
    return {
        "task": workload.name,
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "train_seed": config.train_seed,
        "metric": workload.metric,
        "selection": config.selection,
        "selected_step": selected_step,
        "dev_score": selected["dev_score"] if selected else None,
        "dev_loss": selected["dev_loss"] if selected else None,
        "test_score": float(test["score"]) if test and test.get("score") is not None else None,
        "test_metrics": scalar_metrics(test) if test else None,
        "test_precision": run.test_precision if test else None,  # final/'s dtype: `chainlora eval` scores so
        "zero_shot_test_score": zero_shot.get("test_score"),
        "zero_shot_test_metrics": zero_shot.get("metrics"),
        "zero_shot_precision": run.speed.base_dtype if run.zero_shot is not None else None,
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
        "num_train": len(workload.train),
        "num_dev": len(workload.dev),
        "num_eval": len(workload.test),
        "data_source": workload.source,
        "data": workload.describe(),
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
    improved = improvement_line(metric, metrics.get("zero_shot_test_score"), metrics.get("test_score"))
    if metrics.get("test_score") is not None:
        selected = f"step {metrics['selected_step']}"
        if metrics.get("dev_score") is not None:
            selected += f", by {metrics['selection']}; dev {metric} {metrics['dev_score']:.4f}"
        precision = f", {metrics['test_precision']}" if metrics.get("test_precision") else ""
        lines.append(f"  fine-tuned test {metric}: {metrics['test_score']:.4f}   ({selected}{precision})")
    lines.append(
        f"  trained {metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s, "
        f"{metrics['train_flops']:.3g} FLOPs; knots at {[k['step'] for k in metrics['knots']] or 'none'}"
    )
    test_metrics = metrics.get("test_metrics") or {}
    if "loss" in test_metrics:
        lines.append(
            f"  test loss {test_metrics['loss']:.4f}, perplexity {test_metrics.get('perplexity', float('nan')):.4g}"
        )
    quantized = metrics.get("quantized")
    if quantized and quantized.get("final") is None:  # QLoRA: no final/ unless asked for
        lines.append(
            f"  run: {metrics['run_dir']} (adapter/ = the chain for the {quantized['scheme']} base, metrics.json)"
        )
    else:
        lines.append(f"  run: {metrics['run_dir']} (final/ = merged model, metrics.json, loss.png, tb/)")
    if improved is not None:
        lines.append(f"{metrics['method'].upper()} fine-tuning: {improved}")
    return "\n".join(lines)
