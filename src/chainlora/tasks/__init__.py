"""The benchmark task suite of the COLA paper, run as the MeZO harness runs it, on real data.

Typical use (a training recipe)::

    from chainlora.tasks import get_task, load_task_data, build_training_dataset, TrainingCollator, compute_loss, evaluate

    task = get_task("rte")
    data = load_task_data(task, data=args.data, data_dir=config.data_dir)   # checks every row, logs the source
    splits = data.sample(seed)                                               # train / dev / test Examples
    train_set = build_training_dataset(task, splits.train, tokenizer)
    ... Trainer(train_dataset=train_set, data_collator=TrainingCollator(tokenizer), ...)  # loss: compute_loss
    result = evaluate(model, tokenizer, task, splits.test, batch_size=8)      # {"score": ..., ...}

Modules: ``base`` (Task, Example), ``templates`` (each task's prompts and verbalizers), ``registry`` (the tasks by
name), ``data`` (where rows come from, checked), ``sampling`` (the per-seed draw), ``encoding``, ``scoring``
(candidate log-likelihoods, generation, ``evaluate``), ``training`` (training views and the loss),
``shared_prompt`` (one row per example for verbalized tasks), ``metrics``, ``table`` (``chainlora tasks``).
"""

from chainlora.tasks.base import POOLS, Example, Pool, RowProblem, Task
from chainlora.tasks.data import (
    DATA_ENV_VAR,
    DataSource,
    TaskData,
    TaskSplits,
    load_task,
    load_task_data,
    resolve_source,
)
from chainlora.tasks.encoding import EncodedExample, encode_examples, encode_prompts
from chainlora.tasks.metrics import accuracy, exact_match, normalize_answer, squad_f1, token_f1
from chainlora.tasks.registry import TASKS, get_task
from chainlora.tasks.sampling import SplitIndices, sample_indices
from chainlora.tasks.scoring import evaluate, generate_answers, score_candidates, score_candidates_naive
from chainlora.tasks.table import TaskInfo, list_tasks, print_tasks_table
from chainlora.tasks.training import (
    TaskTrainer,
    TrainingCollator,
    TrainingDataset,
    build_training_dataset,
    compute_loss,
    length_grouped_sampler,
    option_token_log_probs,
)

__all__ = [
    "DATA_ENV_VAR",
    "POOLS",
    "TASKS",
    "DataSource",
    "EncodedExample",
    "Example",
    "Pool",
    "RowProblem",
    "SplitIndices",
    "Task",
    "TaskData",
    "TaskInfo",
    "TaskSplits",
    "TaskTrainer",
    "TrainingCollator",
    "TrainingDataset",
    "accuracy",
    "build_training_dataset",
    "compute_loss",
    "encode_examples",
    "encode_prompts",
    "evaluate",
    "exact_match",
    "generate_answers",
    "get_task",
    "length_grouped_sampler",
    "list_tasks",
    "load_task",
    "load_task_data",
    "normalize_answer",
    "option_token_log_probs",
    "print_tasks_table",
    "resolve_source",
    "sample_indices",
    "score_candidates",
    "score_candidates_naive",
    "squad_f1",
    "token_f1",
]
