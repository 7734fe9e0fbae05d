"""``chainlora eval``: score any model folder (a run's ``final/``) or registry model (0-shot) on a task.

    evaluate_model(config)     the score of ``config.model`` on the task's test (or dev) draw
    score_adapters(run_dir)    the test score of PEFT adapters on a run's original base (``chainlora export``)

The examples are the same per-seed draw as ``chainlora train`` (test = the first ``num_eval`` of a seeded
permutation of the validation split), so ``chainlora eval RUN/final --task T --seed S --num_eval N`` reproduces
the run's ``test_score``.
"""

from __future__ import annotations

from typing import Any

import torch

from chainlora.config import EvalConfig
from chainlora.errors import ConfigError
from chainlora.io import write_json_atomic
from chainlora.perf import DTYPES


def evaluate_model(config: EvalConfig) -> dict[str, Any]:
    """Load the task's examples and the model, score, and return (and optionally write) the result."""
    from chainlora import models, tasks

    task = tasks.get_task(config.task)
    data = tasks.load_task_data(task, data=config.data)  # logs which source it used
    if config.split == "test":
        splits = data.sample(config.seed, num_train=0, num_dev=0, num_eval=config.num_eval)
        examples = splits.test
    else:
        splits = data.sample(config.seed, num_train=config.num_train, num_dev=config.num_dev, num_eval=0)
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
        "num_examples": len(examples),
        "data_source": splits.source.description,
    }
    if config.output:
        write_json_atomic(config.output, summary)
    return summary


def eval_command(config: EvalConfig) -> int:
    """``chainlora eval``: score and print one line."""
    result = evaluate_model(config)
    print(
        f"{result['task']} {result['split']} {result['metric']}: {result['score']:.4f} "
        f"({result['num_examples']} examples, model {result['model']})"
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
