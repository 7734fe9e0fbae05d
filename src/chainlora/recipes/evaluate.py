"""``chainlora eval``: score any model folder (a run's ``final/``) or registry model (0-shot) on a task.

    evaluate_model(config)     the score of ``config.model`` on the task's test (or dev) draw
    score_adapters(run_dir)    the test score of PEFT adapters on a run's original base (``chainlora export``)

The examples are the same per-seed draw as ``chainlora train`` (test = the first ``num_eval`` of a seeded
permutation of the validation split). Given a run's ``final/``, ``chainlora eval RUN/final`` scores it as the run
did (the run's task, data, seed, ``num_eval``, ``max_length``, batch size and the precision of its test score,
unless given: :func:`run_eval_settings`), so it reproduces the run's ``test_score``; the result says which
precision it was computed in.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from chainlora import rundir
from chainlora.config import EvalConfig
from chainlora.errors import ConfigError, OutputError
from chainlora.io import output_problem, write_json_atomic
from chainlora.perf import DTYPES

logger = logging.getLogger("chainlora")


def run_eval_settings(model: str | None) -> dict[str, Any] | None:
    """When ``model`` is the ``final/`` of a finished ``chainlora train`` run: how the run scored it (task, data,
    sampling seed and sizes, ``max_length``, batch size, the precision of its test score), as ``EvalConfig``
    fields; else None. ``chainlora eval`` takes them as the base its command line overrides."""
    if not model:
        return None
    folder = Path(model).expanduser()
    run_dir = folder.parent
    if folder.name != rundir.FINAL_DIR or not (rundir.is_finished(run_dir) and rundir.is_started(run_dir)):
        return None
    config = rundir.load_run_config(run_dir)
    metrics = rundir.read_metrics(run_dir)
    settings = {
        "task": config.task,
        "data": dataclasses.asdict(config.data),
        "seed": config.seed,
        "num_eval": config.num_eval,
        "num_train": config.num_train,
        "num_dev": config.num_dev,
        "max_length": config.max_length,
        "batch_size": config.eval_batch_size,
        "precision": metrics.get("test_precision") or "fp32",
    }
    logger.info(
        "%s is the final model of run %s: scored as the run scored it, unless told otherwise", folder, run_dir
    )
    return settings


def evaluate_model(config: EvalConfig) -> dict[str, Any]:
    """Load the examples (a task's, or your data's: the same per-seed split as ``chainlora train``) and the model,
    score, and return (and optionally write) the result. The output path is checked first, before any work."""
    from chainlora import models, tasks

    if config.output:
        problem = output_problem(config.output)
        if problem is not None:
            raise ConfigError(f"output: {problem}")
    if config.task is None:
        return _evaluate_user_data(config)
    task = tasks.get_task(config.task)
    data = tasks.load_task_data(task, data=config.data.path)  # logs which source it used
    if config.split == "test":
        splits = data.sample(config.seed, num_train=0, num_dev=0, num_eval=config.num_eval or 1000)
        examples = splits.test
    else:
        num_train = config.num_train if config.num_train is not None else 1000
        splits = data.sample(config.seed, num_train=num_train, num_dev=config.num_dev, num_eval=0)
        examples = splits.dev
    if not examples:
        raise ConfigError(f"split: task {task.name} drew no {config.split} examples with these sizes")
    model, tokenizer = models.load(config.model, dtype=DTYPES[config.precision])
    if torch.cuda.is_available():
        model.to("cuda")
    result = tasks.evaluate(
        model, tokenizer, task, examples, batch_size=config.batch_size, max_length=config.max_length
    )
    summary = {
        "model": config.model,
        "task": task.name,
        "split": config.split,
        "seed": config.seed,
        "metric": result["metric"],
        "score": float(result["score"]),
        "precision": config.precision,  # the weights' dtype while scoring (no autocast)
        "num_examples": len(examples),
        "data_source": splits.source.description,
    }
    _write_output(config, summary)
    return summary


def _write_output(config: EvalConfig, summary: dict[str, Any]) -> None:
    """``summary`` as JSON in ``config.output`` (when given); a failed write is one ``OutputError`` line."""
    if config.output:
        try:
            write_json_atomic(config.output, summary)
        except OSError as err:
            raise OutputError(f"output: cannot write {config.output} ({err.strerror or err})") from None


def _evaluate_user_data(config: EvalConfig) -> dict[str, Any]:
    """Your data: the split ``chainlora train`` draws with the same seed and sizes, scored by its workload
    (accuracy for choices data; held-out loss, perplexity and, with references, generated EM/F1)."""
    from chainlora import models
    from chainlora.config import TrainConfig
    from chainlora.recipes.workload import load_workload, scalar_metrics

    train_config = TrainConfig(
        model=config.model,
        data=config.data,
        seed=config.seed,
        num_train=config.num_train,
        num_dev=config.num_dev,
        num_eval=config.num_eval,
        max_length=config.max_length,
        eval_batch_size=config.batch_size,
        selection="dev_loss",
    )
    workload = load_workload(train_config)
    if not (workload.test if config.split == "test" else workload.dev):
        raise ConfigError(
            f"split: {workload.name} has no {config.split} rows (no {config.split} file; --num_eval N holds "
            "out N rows as the test set)"
        )
    model, tokenizer = models.load(config.model, dtype=DTYPES[config.precision])
    if torch.cuda.is_available():
        model.to("cuda")
    workload.datasets(tokenizer, train_config)
    result = workload.evaluate(model, tokenizer, config.split)
    numbers = scalar_metrics(result)
    summary = {
        "model": config.model,
        "task": workload.name,
        "split": config.split,
        "seed": config.seed,
        "metric": result["metric"],
        "score": float(numbers["score"]) if "score" in numbers else None,
        "metrics": numbers,
        "precision": config.precision,  # the weights' dtype while scoring (no autocast)
        "num_examples": len(workload.test if config.split == "test" else workload.dev),
        "data_source": workload.source,
    }
    _write_output(config, summary)
    return summary


def eval_command(config: EvalConfig) -> int:
    """``chainlora eval``: score and print one line."""
    result = evaluate_model(config)
    others = {k: v for k, v in result.get("metrics", {}).items() if k != "score"}
    extra = "".join(f", {k} {v:.4g}" for k, v in others.items())
    score = f"{result['score']:.4f}" if result["score"] is not None else "–"
    print(
        f"{result['task']} {result['split']} {result['metric']}: {score}{extra} "
        f"({result['num_examples']} examples, model {result['model']}, {result['precision']})"
    )
    return 0


def score_adapters(run_dir: str, adapters: dict[str, str], *, batch_size: int = 8) -> dict[str, float]:
    """Test score of each PEFT adapter folder in ``adapters`` (label → path) on the run's own task and test draw,
    loaded with plain PEFT onto the run's *original* base model: e.g. the full chain vs its SVD-truncated copy."""
    import copy

    from peft import PeftModel

    from chainlora import models
    from chainlora.recipes.workload import load_workload
    from chainlora.rundir import load_run_config

    config = load_run_config(run_dir)
    workload = load_workload(config)  # the run's own task or data, and its seed's test draw
    base, tokenizer = models.load(config.model, dtype=torch.float32)
    workload.datasets(tokenizer, config)
    scores = {}
    for label, path in adapters.items():
        model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        scores[label] = float(workload.evaluate(model, tokenizer, "test")["score"])
    return scores
