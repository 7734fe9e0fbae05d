"""Recipes: plain functions over typed configs, one module per ``chainlora`` command; the CLI is thin.

    train.py       chainlora train: setup → fit → finish (run.py: the Run and its metrics; trainer.py: the Trainer)
    evaluate.py    chainlora eval: score a model folder or a registry model on a task
    export.py      chainlora export: a run's whole chain as one PEFT adapter
    sweep.py       chainlora sweep: a grid of train runs (grid.py: the sweep YAML and the runs it expands to)
    report.py      chainlora report: the paper's tables (results.py: the numbers; stats.py; plots.py)
    flops.py       the analytic training FLOPs of a step

For example::

    from chainlora.recipes import TrainConfig, train
    metrics = train(TrainConfig(task="sst2", method="cola", num_train=64, epochs=2))
"""

from chainlora.config import ChainSettings, EvalConfig, LoRASettings, TrainConfig
from chainlora.recipes.evaluate import evaluate_model
from chainlora.recipes.train import train

__all__ = ["ChainSettings", "EvalConfig", "LoRASettings", "TrainConfig", "evaluate_model", "train"]
