"""The ``chainlora`` command: thin wrappers over the recipes, one function per subcommand.

Adding a subcommand is one small function::

    @command("sweep")
    def sweep_command(argv: list[str]) -> int | None:
        \"\"\"Run a grid of training runs (first docstring line = the help line).\"\"\"
        config = parse_config(SweepConfig, argv, prog="chainlora sweep")   # a typed, documented dataclass
        run_sweep(config)                                                   # a plain recipe function

``main`` dispatches on the first argument; a :class:`~chainlora.errors.ChainLoRAError` (bad config, data,
model, output dir) becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from chainlora.errors import ChainLoRAError, ConfigError

T = TypeVar("T")
Command = Callable[[list[str]], "int | None"]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register ``fn(argv) -> exit code | None`` as ``chainlora <name>``; its docstring's first line is its help."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


def parse_config(cls: type[T], argv: Sequence[str], *, prog: str) -> T:
    """Parse ``--config FILE`` (YAML) and ``--field value`` / ``--group.field value`` overrides into dataclass
    ``cls`` (validated by its ``__post_init__``). ``--help`` documents every field from its docstring."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False)  # cls's docstring titles its group of options
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML config file; later arguments override it."
    )
    parser.add_class_arguments(cls, None, sub_configs=True)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            _check_yaml_file(argv[i + 1])
    try:
        namespace = parser.parse_args(_bare_flags_true(cls, argv))
    except OverflowError as err:  # an integer beyond the float range given to a float field
        pairs = itertools.pairwise(argv)
        option = next((a for a, v in pairs if a.startswith("--") and _overflows(v)), "--?")
        raise ConfigError(f"{option[2:]}: {_one_line(err)}") from None
    except Exception as err:  # jsonargparse's ArgumentError, or a YAML/type error while reading --config
        raise ConfigError(_one_line(err)) from None
    values = _strip_meta(namespace.as_dict())
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


def _overflows(text: str) -> bool:
    """An integer literal too large for a float."""
    try:
        float(int(text))
    except (ValueError, OverflowError) as err:
        return isinstance(err, OverflowError)
    return False


def _bool_options(cls: type, prefix: str = "--") -> set[str]:
    """``--name`` of every bool field of dataclass ``cls``, nested dataclasses included (``--lora.rslora``)."""
    options = set()
    for name, hint in typing.get_type_hints(cls).items():
        if hint is bool:
            options.add(prefix + name)
        elif dataclasses.is_dataclass(hint):
            options |= _bool_options(hint, f"{prefix}{name}.")
    return options


def _bare_flags_true(cls: type, argv: Sequence[str]) -> list[str]:
    """Let a bool field be given as a bare flag: ``--overwrite`` means ``--overwrite true``."""
    flags, out = _bool_options(cls), []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


def _strip_meta(data: dict[str, Any]) -> dict[str, Any]:
    """Drop jsonargparse's bookkeeping keys (``config``, ``__path__``) at every level."""
    return {
        k: _strip_meta(v) if isinstance(v, dict) else v
        for k, v in data.items()
        if k not in ("config", "__path__") and not k.startswith("__")
    }


def _check_yaml_file(path: str) -> None:
    """A ``--config`` file must exist and hold a YAML mapping; else one line naming the file and the spot."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"--config {path}: invalid YAML{where}: {getattr(err, 'problem', None) or err}"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of fields, got a {type(data).__name__}")


def _type_name(text: str) -> str:
    """``<class 'float'>`` → ``float``, ``<class 'NoneType'>`` → ``null``, Literal[...] → its values."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text.strip()).replace("NoneType", "null")
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def _one_line(err: BaseException) -> str:
    """jsonargparse's multi-line error as ``field: expected TYPE, got VALUE``."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
    field, problem = (match.group(1), match.group(2)) if match else (None, text)
    problem = problem.split(' - Parser key "')[0]  # jsonargparse repeats nested errors
    union = re.search(r"Subtypes: \[(.*?)\] Errors: .* Given value: (.*)$", problem)
    single = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", problem)
    if union:
        types = " or ".join(_type_name(t) for t in re.split(r", (?![^\[]*\])", union.group(1)))
        problem = f"expected {types}, got {union.group(2)}"
    elif single:
        problem = f"expected {_type_name(single.group(1))}, got {single.group(2)}"
    return f"{field}: {problem}" if field else problem


# --------------------------------------------------------------------------------------------- commands


@command("train")
def train_command(argv: list[str]) -> int | None:
    """Fine-tune a causal LM on a task with LoRA, COLA or full fine-tuning (--config FILE, --help)."""
    from chainlora.config import TrainConfig
    from chainlora.recipes.train import train_command
    from chainlora.rundir import CONFIG_FILE

    resume = _option_value(argv, "--resume")
    if resume is not None and (Path(resume) / CONFIG_FILE).is_file():
        argv = ["--config", str(Path(resume) / CONFIG_FILE), *argv]  # the run's own config is the base
    return train_command(parse_config(TrainConfig, argv, prog="chainlora train"))


@command("eval")
def eval_command(argv: list[str]) -> int | None:
    """Score a model folder (e.g. a run's final/) or a registry model (0-shot) on a task: eval MODEL --task T."""
    from chainlora.config import EvalConfig
    from chainlora.recipes.evaluate import evaluate_model

    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    result = evaluate_model(parse_config(EvalConfig, argv, prog="chainlora eval"))
    print(
        f"{result['task']} {result['split']} {result['metric']}: {result['score']:.4f} "
        f"({result['num_examples']} examples, model {result['model']})"
    )
    return 0


@command("models")
def models_command(argv: list[str]) -> int | None:
    """List the registry's pretrained models (installed, cached, how to install)."""
    from chainlora.models import print_models_table

    _no_arguments("models", argv)
    print_models_table()
    return 0


@command("tasks")
def tasks_command(argv: list[str]) -> int | None:
    """List the tasks, their metric and where their data is found."""
    from chainlora.tasks import print_tasks_table

    _no_arguments("tasks", argv)
    print_tasks_table()
    return 0


@dataclasses.dataclass
class ExportArgs:
    """chainlora export RUN_DIR --adapter [--rank R]: the run's whole chain as one standard PEFT LoRA adapter."""

    run_dir: str
    """A `chainlora train` run folder (or a checkpoint / chain folder inside it)."""
    adapter: bool = True
    """Export the chain as a PEFT adapter (the only export there is; accepted for clarity)."""
    rank: int | None = None
    """Compress every layer's summed update to this rank by SVD (reports the relative error per layer)."""
    out: str | None = None
    """Output folder (default: RUN_DIR/adapter, or RUN_DIR/adapter-r{R} with --rank)."""
    overwrite: bool = False
    """Replace an existing, different adapter folder."""
    score: bool = True
    """With --rank: also score the full and the truncated adapter on the run's task and test draw."""


@command("export")
def export_command(argv: list[str]) -> int | None:
    """Export a run's whole chain as one PEFT LoRA adapter: export RUN_DIR --adapter [--rank R]."""
    import json

    from chainlora.adapter import export_run_adapter

    if argv and not argv[0].startswith("-"):
        argv = ["--run_dir", argv[0], *argv[1:]]
    args = parse_config(ExportArgs, argv, prog="chainlora export")
    result = export_run_adapter(args.run_dir, rank=args.rank, out=args.out, overwrite=args.overwrite)
    if args.rank is not None and args.score:
        from chainlora.recipes.evaluate import score_adapters

        full = export_run_adapter(args.run_dir)  # the whole chain, uncompressed (adapter/; reused if present)
        result["test_score"] = score_adapters(
            args.run_dir, {"full": full["path"], f"rank {args.rank}": result["path"]}
        )
    print(json.dumps(result, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------ helpers


def _option_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _no_arguments(name: str, argv: Sequence[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: chainlora {name}\n\n{(COMMANDS[name].__doc__ or '').strip()}")
        raise SystemExit(0)
    if argv:
        raise ConfigError(f"chainlora {name} takes no arguments, got {' '.join(argv)}")


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = [
        f"  {name.ljust(width)}  {(fn.__doc__ or '').strip().splitlines()[0]}"
        for name, fn in COMMANDS.items()
    ]
    return "usage: chainlora COMMAND [--help] [options]\n\ncommands:\n" + "\n".join(rows)


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
        return COMMANDS[name](rest) or 0
    except ChainLoRAError as err:
        _close_progress_bars()  # a run halted mid-epoch: the error goes on its own line, not after the bar
        print(f"error: {err}", file=sys.stderr)
        return 2


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


@command("sweep")
def sweep_command(argv: list[str]) -> int | None:
    """Run a grid of train runs from a sweep YAML, resumable: sweep CONFIG [--workers N] [--devices 0,1]."""
    from chainlora.recipes.sweep import sweep_main

    return sweep_main(argv)


@command("report")
def report_command(argv: list[str]) -> int | None:
    """Tables (paper layout), plots and paired tests of a sweep: report SWEEP_DIR [--output FILE]."""
    from chainlora.recipes.report import report_main

    return report_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
