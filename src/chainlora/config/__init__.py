"""Typed, validated configs of the ``chainlora`` commands, and the parser from command lines into them.

    TrainConfig (+ LoRASettings, ChainSettings, AutoKnotSettings)   chainlora train           (config.train)
    DataSpec                                                          its data: block: your own data (config.data)
    EvalConfig, ExportConfig, SweepOptions, ReportConfig              eval, export, sweep, report (config.commands)
    parse_config(cls, argv)                                           --config FILE --field value (config.parse)

A config that exists is a valid one: each dataclass validates in ``__post_init__`` and a bad value raises a
:class:`~chainlora.errors.ConfigError` with one line naming the field. This package imports nothing of chainlora
but its errors: the recipes and the CLI build on it, never the other way round.
"""

from chainlora.config.commands import (
    ChatConfig,
    CompareConfig,
    EvalConfig,
    ExportConfig,
    ReportConfig,
    SweepOptions,
    parse_devices,
)
from chainlora.config.data import DataSpec
from chainlora.config.parse import parse_config, read_yaml_mapping
from chainlora.config.train import AutoKnotSettings, ChainSettings, LoRASettings, TrainConfig

__all__ = [
    "AutoKnotSettings",
    "ChainSettings",
    "ChatConfig",
    "CompareConfig",
    "DataSpec",
    "EvalConfig",
    "ExportConfig",
    "LoRASettings",
    "ReportConfig",
    "SweepOptions",
    "TrainConfig",
    "parse_config",
    "parse_devices",
    "read_yaml_mapping",
]
