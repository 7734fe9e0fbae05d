"""The ``chainlora`` command: one table from each subcommand to its config class and its recipe function.

    chainlora NAME [FIRST] [--config FILE] [--field value ...]
        → config = parse_config(Config, argv)     a typed, documented dataclass (chainlora.config; --help)
        → recipe(config)                         a plain function of the recipes; returns the exit code

Adding a subcommand is one row of :data:`COMMANDS`. A :class:`~chainlora.errors.ChainLoRAError` (bad config,
data, model, output dir) becomes one ``error: ...`` line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainlora.config import (
    ChatConfig,
    CompareConfig,
    EvalConfig,
    ExportConfig,
    ReportConfig,
    SweepOptions,
    TrainConfig,
    parse_config,
    read_yaml_mapping,
)
from chainlora.config.parse import Base
from chainlora.errors import ChainLoRAError, ConfigError


@dataclass(frozen=True)
class Command:
    """``chainlora NAME``: its help line, what its command line is parsed into, and the function that runs it."""

    help: str  # the line in `chainlora --help`
    config: type | None  # the dataclass the command line is parsed into; None: the command takes no arguments
    recipe: str  # "module:function", imported when the command runs (so `chainlora --help` starts fast)
    first: str | None = None  # the field a bare first argument fills (`eval MODEL` is `eval --model MODEL`)
    base: Base | None = None  # values beneath the command line (see chainlora.config.parse_config)


def _resumed_run(given: dict[str, Any]) -> dict[str, Any] | None:
    """``train --resume RUN_DIR``: the run's own config.yaml is the base the command line overrides."""
    from chainlora.rundir import CONFIG_FILE

    saved = Path(given["resume"]) / CONFIG_FILE if given.get("resume") else None
    return read_yaml_mapping(saved, name="resume:") if saved is not None and saved.is_file() else None


def _run_of_model(given: dict[str, Any]) -> dict[str, Any] | None:
    """``eval RUN_DIR/final``: how the run scored its final model is the base the command line overrides."""
    from chainlora.recipes.evaluate import run_eval_settings

    return run_eval_settings(given.get("model"))


def _sweep_block(given: dict[str, Any]) -> dict[str, Any] | None:
    """``sweep SWEEP_YAML``: the YAML's ``sweep:`` block is the base the command line overrides."""
    path = Path(given["sweep"]) if given.get("sweep") else None
    if path is None or not path.is_file():
        return None  # the recipe names the missing file
    block = read_yaml_mapping(path).get("sweep")
    return block if isinstance(block, dict) else None


COMMANDS: dict[str, Command] = {
    "train": Command(
        "Fine-tune a causal LM on a task with LoRA, COLA or full fine-tuning (--config FILE, --help).",
        TrainConfig,
        "chainlora.recipes.train:train_command",
        base=_resumed_run,
    ),
    "eval": Command(
        "Score a model folder (e.g. a run's final/) or a registry model (0-shot) on a task: eval MODEL --task T.",
        EvalConfig,
        "chainlora.recipes.evaluate:eval_command",
        first="model",
        base=_run_of_model,
    ),
    "models": Command(
        "List the registry's pretrained models (installed, cached, how to install).",
        None,
        "chainlora.models:print_models_table",
    ),
    "tasks": Command(
        "List the tasks, their metric and where their data is found.",
        None,
        "chainlora.tasks:print_tasks_table",
    ),
    "export": Command(
        "Export a run's whole chain as one PEFT LoRA adapter: export RUN_DIR --adapter [--rank R].",
        ExportConfig,
        "chainlora.recipes.export:export_command",
        first="run_dir",
    ),
    "sweep": Command(
        "Run a grid of train runs from a sweep YAML, resumable: sweep CONFIG [--workers N] [--devices 0,1].",
        SweepOptions,
        "chainlora.recipes.sweep:sweep_command",
        first="sweep",
        base=_sweep_block,
    ),
    "chat": Command(
        "Talk to what you trained (streamed, multi-turn): chat RUN_DIR [--prompt TEXT] [--adapter].",
        ChatConfig,
        "chainlora.recipes.chat:chat_command",
        first="run_dir",
    ),
    "compare": Command(
        "Does COLA help on my data? Paired seeds per method, then differences with CI: compare --data FILE.",
        CompareConfig,
        "chainlora.recipes.compare:compare_command",
    ),
    "report": Command(
        "Tables (paper layout), plots and paired tests of a sweep: report SWEEP_DIR [--output FILE].",
        ReportConfig,
        "chainlora.recipes.report:report_command",
        first="sweep_dir",
    ),
}


def run_command(name: str, argv: list[str]) -> int:
    """Parse ``argv`` into the command's config and run its recipe; returns the exit code."""
    command = COMMANDS[name]
    module, function = command.recipe.split(":")
    if command.config is None:
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: chainlora {name}\n\n{command.help}")
            raise SystemExit(0)  # as every other command's --help
        if argv:
            raise ConfigError(f"chainlora {name} takes no arguments, got {' '.join(argv)}")
        getattr(importlib.import_module(module), function)()
        return 0
    if command.first and argv and not argv[0].startswith("-"):
        argv = [f"--{command.first}", argv[0], *argv[1:]]
    config = parse_config(command.config, argv, prog=f"chainlora {name}", base=command.base)
    return getattr(importlib.import_module(module), function)(config) or 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``chainlora`` and ``python -m chainlora``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    _configure_logging()
    try:
        return run_command(name, rest)
    except ChainLoRAError as err:
        _close_progress_bars()  # a run halted mid-epoch: the error goes on its own line, not after the bar
        print(f"error: {err}", file=sys.stderr)
        return 2


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = [f"  {name.ljust(width)}  {command.help}" for name, command in COMMANDS.items()]
    return "usage: chainlora COMMAND [--help] [options]\n\ncommands:\n" + "\n".join(rows)


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (so redirection and capture work)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """Progress lines of chainlora (``chainlora.*`` loggers) on stderr, once."""
    logger = logging.getLogger("chainlora")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
