"""Typed, validated configs of the ``chainlora`` commands; the YAML files mirror them."""

from chainlora.config.train import (
    AutoKnotSettings,
    ChainSettings,
    EvalConfig,
    LoRASettings,
    TrainConfig,
)

__all__ = ["AutoKnotSettings", "ChainSettings", "EvalConfig", "LoRASettings", "TrainConfig"]
