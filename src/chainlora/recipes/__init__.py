"""Recipes: plain functions over typed configs (``chainlora train``, ``chainlora eval``); the CLI is thin.

from chainlora.recipes import TrainConfig, train
metrics = train(TrainConfig(task="sst2", method="cola", num_train=64, epochs=2))
"""

from chainlora.config import ChainSettings, EvalConfig, LoRASettings, TrainConfig
from chainlora.recipes.evaluate import evaluate_model
from chainlora.recipes.train import train

__all__ = ["ChainSettings", "EvalConfig", "LoRASettings", "TrainConfig", "evaluate_model", "train"]
