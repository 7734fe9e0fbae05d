"""Grid sweeps of ``chainlora train`` runs, one subprocess per run, resumable, on one or several devices.

A sweep YAML has three blocks::

    base:                     # a train config (the fields of ``chainlora train``); ``config:`` names a file to
      config: configs/x.yaml  #   start from, the other keys override it
      model: smollm2-135m
    grid:                     # axes, crossed; a list of such mappings is a union of grids
      task: [sst2, rte]
      method: [lora, cola, full]
      chain_length: [3]       # COLA only (LoRA is chain length 1; a COLA of length 1 *is* LoRA and is merged)
      ranks: [[8], [8, 4]]    # rank of each link; [8, 4] is a rank step-down (Table 4)
      optimizer: [adamw]
      learning_rate: {lora: [5e-4], cola: [5e-4], full: [1e-5]}   # a list, or a grid per method/optimizer
      seed: [0, 1, 2]
    sweep:                    # how to run it (every key can be overridden on the command line)
      output_dir: runs/table1
      workers: 1

Every other grid key (``num_train``, ``lora.alpha``, ...) is an extra axis passed to the train CLI as is and
named in the run folder (``-n100``). Grid axes map to train fields: ``learning_rate`` → ``lr``,
``chain_length`` → ``chain.length``, ``ranks`` → ``lora.r`` (first link) and ``chain.ranks`` (step-down).
The base config must stay fixed for a sweep folder (run names encode grid axes only); the grid may grow.

Invariants:

* Run names are a pure function of the cell: ``<task>/<method tag>/<optimizer>-lr<lr>/seed<seed>``, e.g.
  ``sst2/cola-L3-r8/adamw-lr5e-4/seed0``; a cell is everything except learning rate and seed.
* A run is finished iff its folder holds ``metrics.json`` (the train recipe writes it last); finished runs are
  never started again, so a killed sweep is continued by running the same command.
* An unfinished run folder is resumed with the train CLI's ``--resume <run dir>`` when it holds the run's
  ``config.yaml`` (the recipe continues from its newest checkpoint), and otherwise cleared and restarted.
* Each run holds an exclusive ``flock`` on ``<output_dir>/.locks/<name>.lock``, inherited by its subprocess, so
  two sweep processes (or a sweep and the orphan of a killed one) never run the same run at once.
* A failed run (non-zero exit, timeout, no ``metrics.json``) is recorded in ``sweep_state.json`` with its log
  path and the sweep continues; running the sweep again retries it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from chainlora.errors import ConfigError
from chainlora.io import atomic_path, write_json_atomic

METRICS_FILE = "metrics.json"
PLAN_FILE = "sweep_plan.json"
STATE_FILE = "sweep_state.json"
BASE_FILE = "sweep_base.yaml"
LOCK_DIR = ".locks"
LOG_DIR = "logs"

METHODS = ("lora", "cola", "full")
CORE_AXES = ("task", "method", "chain_length", "ranks", "optimizer", "learning_rate", "seed")
# Short names of common extra axes in run names (others appear as ``<key>-<value>``).
EXTRA_SHORT = {
    "num_train": "n",
    "num_dev": "dev",
    "num_eval": "test",
    "lora.alpha": "a",
    "lr_schedule": "sched",
    "epochs": "ep",
    "max_length": "len",
    "batch_size": "bs",
}
RUN_CONFIG_FILE = "config.yaml"  # written first into a run folder by the train recipe

ResumeMode = Literal["auto", "restart"]


# ------------------------------------------------------------------------------------------------ options


@dataclass
class SweepOptions:
    """How a sweep runs (the YAML's ``sweep:`` block; each field can be overridden on the command line)."""

    output_dir: str = "runs/sweep"  # root of the run folders, plan, state and logs
    workers: int = 1  # runs at once (subprocesses)
    devices: list[str] | None = None  # GPU ids; worker i gets CUDA_VISIBLE_DEVICES=devices[i % len]
    # CPU threads per run. Default: 1 for CPU runs (on shared cores a 2-thread torch job beside another one
    # waits on OpenMP barriers and runs 5-15x slower), usable cores // workers for GPU runs (``devices``)
    threads_per_worker: int | None = None
    resume: ResumeMode = "auto"  # "auto": continue an unfinished run from its checkpoint; "restart": clear it
    resume_args: list[str] = field(default_factory=lambda: ["--resume", "{run_dir}"])  # how train resumes
    run_timeout_s: float | None = None  # kill a run after this long (recorded as failed)
    max_attempts: int = 1  # tries per run within one sweep invocation
    python: str | None = None  # interpreter for the runs (default: this one)
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables for every run
    report: bool = True  # write the report (``chainlora report``) when the sweep ends
    cleanup: list[str] = field(default_factory=list)  # run subfolders deleted once a run is done ("final")
    # train_seed = seed, so LoRA init and batch order vary with the seed too (False: the harness's fixed 42)
    vary_train_seed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"sweep.workers must be a positive integer, got {self.workers!r}")
        if self.resume not in ("auto", "restart"):
            raise ConfigError(f"sweep.resume must be 'auto' or 'restart', got {self.resume!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"sweep.max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(f"sweep.threads_per_worker must be >= 1, got {self.threads_per_worker!r}")
        if isinstance(self.devices, str):
            self.devices = parse_devices(self.devices)
        if self.devices is not None:
            self.devices = [str(d) for d in self.devices]
            if not self.devices:
                raise ConfigError("sweep.devices is empty: name at least one device id, or leave it unset")
        self.env = {str(k): str(v) for k, v in (self.env or {}).items()}


def parse_devices(devices: str | Sequence[str | int] | None) -> list[str] | None:
    """``"0,1"`` or ``[0, 1]`` → ``["0", "1"]``; ``None``/``""`` → ``None`` (no GPU pinning)."""
    if devices is None or devices == "":
        return None
    if isinstance(devices, str):
        items = [d.strip() for d in devices.split(",") if d.strip()]
    else:
        items = [str(d) for d in devices]
    return items or None


# ------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its cell (every axis but learning rate and seed), LR and seed, and CLI overrides."""

    name: str  # <task>/<tag>/<optimizer>-lr<lr>/seed<seed>
    cell: str  # <task>/<tag>/<optimizer>
    task: str
    method: str
    chain_length: int | None  # None for full fine-tuning
    ranks: tuple[int, ...] | None
    optimizer: str | None
    learning_rate: float
    seed: int
    extras: tuple[tuple[str, Any], ...] = ()  # other grid axes, in grid order
    overrides: tuple[tuple[str, Any], ...] = ()  # what is passed to ``chainlora train`` besides the base

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = list(self.ranks) if self.ranks is not None else None
        d["extras"] = dict(self.extras)
        d["overrides"] = dict(self.overrides)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunSpec:
        return cls(
            name=d["name"],
            cell=d["cell"],
            task=d["task"],
            method=d["method"],
            chain_length=d.get("chain_length"),
            ranks=tuple(d["ranks"]) if d.get("ranks") is not None else None,
            optimizer=d.get("optimizer"),
            learning_rate=float(d["learning_rate"]),
            seed=int(d["seed"]),
            extras=tuple(dict(d.get("extras") or {}).items()),
            overrides=tuple(dict(d.get("overrides") or {}).items()),
        )


def format_number(value: float) -> str:
    """A short, exact, path-safe spelling of a number: ``5e-4``, ``1e-5``, ``2.5e-3``, ``0.1`` → ``1e-1``."""
    value = float(value)
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    mantissa, exponent = f"{value:.12e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_slug(v) for v in value)
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_")
    return text or "none"


def method_tag(method: str, chain_length: int | None, ranks: Sequence[int] | None) -> str:
    """``lora``, ``lora-r8``, ``cola-L3``, ``cola-L2-r8-4`` (rank step-down), ``full``."""
    if method == "full":
        return "full"
    tag = method if method == "lora" else f"cola-L{chain_length}"
    if ranks:
        tag += "-r" + "-".join(str(int(r)) for r in ranks)
    return tag


def cell_tag(
    method: str, chain_length: int | None, ranks: Sequence[int] | None, extras: Iterable[tuple[str, Any]]
) -> str:
    """The method tag plus one ``-<short><value>`` segment per extra axis (e.g. ``cola-L3-r8-n1000``)."""
    tag = method_tag(method, chain_length, ranks)
    for key, value in extras:
        short = EXTRA_SHORT.get(key)
        tag += f"-{short}{_slug(value)}" if short else f"-{_slug(key)}-{_slug(value)}"
    return tag


def run_name(
    task: str,
    method: str,
    chain_length: int | None,
    ranks: Sequence[int] | None,
    optimizer: str | None,
    learning_rate: float,
    seed: int,
    extras: Iterable[tuple[str, Any]] = (),
) -> str:
    """Deterministic run folder name, e.g. ``sst2/cola-L3-r8/adamw-lr5e-4/seed0``."""
    return (
        f"{_slug(task)}/{cell_tag(method, chain_length, ranks, extras)}/"
        f"{_slug(optimizer or 'default')}-lr{format_number(learning_rate)}/seed{int(seed)}"
    )


def _lr_grid(spec: Any, method: str, optimizer: str | None) -> list[float]:
    """The learning rates for one (method, optimizer): a list, or a mapping keyed by ``method/optimizer``,
    ``method``, ``optimizer`` or ``default`` (first match wins)."""
    if isinstance(spec, Mapping):
        for key in (f"{method}/{optimizer}", method, str(optimizer), "default"):
            if key in spec:
                spec = spec[key]
                break
        else:
            raise ConfigError(
                f"grid.learning_rate has no entry for method {method!r} / optimizer {optimizer!r} "
                f"(keys: {sorted(spec)}); add '{method}' or 'default'"
            )
    values = spec if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"learning rate {v!r} is not a number") from None
        if out[-1] <= 0:
            raise ConfigError(f"learning rate must be positive, got {v!r}")
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _ranks_list(value: Any) -> list[tuple[int, ...] | None]:
    """``ranks`` axis values: ``[[8], [8, 4]]`` or ``[8, 4]`` (two plain ranks) or ``8``."""
    if value is None:
        return [None]
    out: list[tuple[int, ...] | None] = []
    for item in _as_list(value):
        if item is None:
            out.append(None)
            continue
        ranks = tuple(int(r) for r in _as_list(item))
        if not ranks or any(r <= 0 for r in ranks):
            raise ConfigError(f"ranks {item!r} must be a non-empty list of positive integers")
        out.append(ranks)
    return out


def train_overrides(
    task: str,
    method: str,
    chain_length: int | None,
    ranks: Sequence[int] | None,
    optimizer: str | None,
    learning_rate: float,
    seed: int,
    extras: Iterable[tuple[str, Any]] = (),
    vary_train_seed: bool = True,
) -> dict[str, Any]:
    """The ``chainlora train`` fields of one run (TrainConfig names: ``lr``, ``chain.length``, ``lora.r``,
    ``chain.ranks``); ``ranks[0]`` is the first link's rank (``lora.r``), a longer list is a step-down."""
    out: dict[str, Any] = {"task": task, "method": method}
    if method == "cola":
        out["chain.length"] = int(chain_length or 1)
    if ranks:
        out["lora.r"] = int(ranks[0])
        if method == "cola" and len(ranks) > 1:
            out["chain.ranks"] = [int(r) for r in ranks]
    if optimizer is not None:
        out["optimizer"] = optimizer
    out["lr"] = float(learning_rate)
    out["seed"] = int(seed)
    if vary_train_seed:
        out["train_seed"] = int(seed)
    out.update(extras)
    return out


def expand_grid(
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    base: Mapping[str, Any],
    *,
    vary_train_seed: bool = True,
) -> list[RunSpec]:
    """All runs of a grid (a mapping of axes, or a list of them = union), deduplicated by run name, in order.

    Normalisation (so equal runs get equal names): COLA of chain length 1 is LoRA; LoRA has chain length 1;
    equal ranks on every link (``[8, 8]``) are one rank (``[8]``);
    full fine-tuning has no chain length or ranks; a LoRA step-down list keeps only its first rank; axes not in
    the grid fall back to the base config (``task``, ``method``, ``chain.length``, ``optimizer``, ``lr``,
    ``seed``). ``lr`` is accepted as an alias of the ``learning_rate`` axis. With ``vary_train_seed`` the
    trainer seed (LoRA init, batch order) follows the sampling seed; the MeZO harness keeps it at 42.
    """
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    if not grids:
        raise ConfigError("the sweep grid is empty")
    specs: dict[str, RunSpec] = {}
    for g in grids:
        if not isinstance(g, Mapping):
            raise ConfigError(f"a grid must be a mapping of axis -> values, got {type(g).__name__}")
        for key in ("task", "method", "seed"):
            if key not in g and key not in base:
                raise ConfigError(f"grid axis {key!r} is missing (and the base config does not set it)")
        tasks = _as_list(g.get("task", base.get("task")))
        methods = _as_list(g.get("method", base.get("method", "cola")))
        chain_lengths = _as_list(g.get("chain_length", (base.get("chain") or {}).get("length") or 3))
        ranks_axis = _ranks_list(g.get("ranks")) if "ranks" in g else [None]
        optimizers = _as_list(g.get("optimizer", base.get("optimizer")))
        lr_spec = g.get("learning_rate", g.get("lr", base.get("lr")))
        if lr_spec is None:
            raise ConfigError("no learning rate: set grid.learning_rate or base.lr")
        seeds = _as_list(g.get("seed", base.get("seed")))
        extra_keys = [k for k in g if k not in (*CORE_AXES, "lr")]
        used_stepdowns: set[tuple[int, ...]] = set()
        extra_values = [_as_list(g[k]) for k in extra_keys]
        for task, method, length, ranks, optimizer, extra in itertools.product(
            tasks, methods, chain_lengths, ranks_axis, optimizers, itertools.product(*extra_values)
        ):
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
            length = int(length)
            if length < 1:
                raise ConfigError(f"chain_length must be >= 1, got {length}")
            if method == "cola" and length == 1:
                method = "lora"
            if ranks is not None and len(set(ranks)) == 1:
                ranks = ranks[:1]  # [8, 8] is no step-down: the same run as [8]
            if method == "lora":
                length = 1
                ranks = ranks[:1] if ranks else ranks
            elif method == "full":
                length, ranks = None, None
            elif ranks is not None and len(ranks) not in (1, length):
                continue  # a step-down list fits only the chain length with as many links
            if ranks is not None and len(ranks) > 1:
                used_stepdowns.add(ranks)
            extras = tuple(zip(extra_keys, extra, strict=True))
            for lr in _lr_grid(lr_spec, method, optimizer):
                for seed in seeds:
                    name = run_name(task, method, length, ranks, optimizer, lr, int(seed), extras)
                    if name in specs:
                        continue
                    overrides = train_overrides(
                        task, method, length, ranks, optimizer, lr, int(seed), extras, vary_train_seed
                    )
                    specs[name] = RunSpec(
                        name=name,
                        cell=name.rsplit("/", 2)[0] + f"/{_slug(optimizer or 'default')}",
                        task=str(task),
                        method=method,
                        chain_length=length,
                        ranks=ranks,
                        optimizer=optimizer,
                        learning_rate=lr,
                        seed=int(seed),
                        extras=extras,
                        overrides=tuple(overrides.items()),
                    )
        for ranks in ranks_axis:
            if ranks is not None and len(set(ranks)) > 1 and ranks not in used_stepdowns:
                raise ConfigError(
                    f"ranks {list(ranks)} (one rank per link) fits no COLA chain of this grid: add "
                    f"chain_length {len(ranks)} (chain lengths here: {chain_lengths})"
                )
    return list(specs.values())


# ------------------------------------------------------------------------------------------------ config


@dataclass
class SweepConfig:
    """A parsed sweep YAML: the resolved base train config, the grid, and the options."""

    base: dict[str, Any]
    grid: dict[str, Any] | list[dict[str, Any]]
    options: SweepOptions
    source: str | None = None  # the YAML file it came from

    def runs(self) -> list[RunSpec]:
        return expand_grid(self.grid, self.base, vary_train_seed=self.options.vary_train_seed)


def _resolve_base(base: Mapping[str, Any], origin: Path | None) -> dict[str, Any]:
    """Load ``base.config`` (a train YAML, relative to the sweep file's folder or the working directory) and
    apply the other base keys over it."""
    base = dict(base or {})
    path = base.pop("config", None)
    resolved: dict[str, Any] = {}
    if path:
        candidates = [Path(path)]
        if origin is not None and not Path(path).is_absolute():
            candidates.insert(0, origin.parent / path)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"base.config {path!r} not found (looked in {', '.join(map(str, candidates))})")
        loaded = yaml.safe_load(found.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"base.config {found} is not a mapping of train config fields")
        resolved.update(loaded)
    resolved.update(base)
    return resolved


def load_sweep_config(path: str | Path, **option_overrides: Any) -> SweepConfig:
    """Parse a sweep YAML; ``option_overrides`` (non-None values) replace fields of its ``sweep:`` block."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep config {path} must be a mapping with base/grid/sweep blocks")
    unknown = set(raw) - {"base", "grid", "sweep"}
    if unknown:
        raise ConfigError(
            f"sweep config {path}: unknown top-level key(s) {sorted(unknown)} (base, grid, sweep)"
        )
    if "grid" not in raw:
        raise ConfigError(f"sweep config {path} has no 'grid' block")
    return sweep_config_from_dict(raw, origin=path, **option_overrides)


def sweep_config_from_dict(
    raw: Mapping[str, Any], *, origin: Path | None = None, **option_overrides: Any
) -> SweepConfig:
    """Build a :class:`SweepConfig` from the three YAML blocks (already parsed)."""
    opts = dict(raw.get("sweep") or {})
    known = {f.name for f in fields(SweepOptions)}
    bad = set(opts) - known
    if bad:
        raise ConfigError(f"unknown sweep option(s) {sorted(bad)}; known: {sorted(known)}")
    opts.update({k: v for k, v in option_overrides.items() if v is not None})
    options = SweepOptions(**opts)
    base = _resolve_base(raw.get("base") or {}, origin)
    config = SweepConfig(
        base=base, grid=copy.deepcopy(raw["grid"]), options=options, source=str(origin) if origin else None
    )
    config.runs()  # validate the grid now, not halfway through a sweep
    return config


# ------------------------------------------------------------------------------------------------ state


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished iff its folder holds ``metrics.json`` (written last by the train recipe)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether an unfinished run folder is one ``chainlora train --resume`` can continue: it holds the run's
    ``config.yaml`` (written first by the train recipe). The recipe itself resumes from the newest complete
    checkpoint, or starts over in place when the run was killed before its first one."""
    return (Path(run_dir) / RUN_CONFIG_FILE).is_file()


def finished_seconds(run_dir: str | Path) -> float | None:
    """Wall seconds a finished run took (``session_seconds`` of its ``metrics.json``; the last session only for
    a resumed run), or None."""
    try:
        value = json.loads((Path(run_dir) / METRICS_FILE).read_text()).get("session_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def estimate_seconds_left(
    left: Sequence[RunSpec], finished: Mapping[str, tuple[RunSpec, float]], workers: int
) -> float | None:
    """Seconds until the runs in ``left`` are done on ``workers`` workers, from the runs already finished:
    each run is predicted by the mean time of finished runs of its cell (every axis but LR and seed), else of
    its task with the same extra axes, else of its task, else of all. None before any run has finished."""
    if not finished:
        return None
    by_key: dict[tuple[Any, ...], list[float]] = {}
    for spec, seconds in finished.values():
        for key in (("cell", spec.cell), ("task", spec.task, spec.extras), ("task", spec.task), ("all",)):
            by_key.setdefault(key, []).append(seconds)
    total = 0.0
    for spec in left:
        for key in (("cell", spec.cell), ("task", spec.task, spec.extras), ("task", spec.task), ("all",)):
            if key in by_key:
                total += sum(by_key[key]) / len(by_key[key])
                break
    return total / max(1, workers)


def format_duration(seconds: float) -> str:
    """``3h 05m``, ``12m``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


@dataclass
class RunOutcome:
    """What happened to one run in this sweep invocation (stored in ``sweep_state.json``)."""

    name: str
    status: Literal["done", "skipped", "failed", "busy", "pending"]
    returncode: int | None = None
    seconds: float | None = None
    attempts: int = 0
    resumed: bool = False
    log: str | None = None
    error: str | None = None


@dataclass
class SweepSummary:
    """The result of :func:`run_sweep`: every run's outcome and the sweep's wall time."""

    output_dir: Path
    outcomes: dict[str, RunOutcome]
    wall_seconds: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    @property
    def ok(self) -> bool:
        return all(o.status in ("done", "skipped") for o in self.outcomes.values())


class _State:
    """``sweep_state.json``: the per-run outcome, the invocation history; written atomically under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"invocations": [], "runs": {}}
        if path.is_file():
            # a torn file cannot happen (atomic writes); a broken hand-edited one is replaced
            with contextlib.suppress(json.JSONDecodeError):
                self.data = json.loads(path.read_text())
            self.data.setdefault("invocations", [])
            self.data.setdefault("runs", {})

    def record(self, outcome: RunOutcome) -> None:
        with self.lock:
            previous = self.data["runs"].get(outcome.name, {})
            entry = asdict(outcome)
            entry["total_attempts"] = int(previous.get("total_attempts", 0)) + outcome.attempts
            entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.data["runs"][outcome.name] = entry
            write_json_atomic(self.path, self.data)

    def start(self, info: dict[str, Any]) -> None:
        with self.lock:
            self.data["invocations"].append(info)
            write_json_atomic(self.path, self.data)

    def finish(self, info: dict[str, Any]) -> None:
        with self.lock:
            if self.data["invocations"]:
                self.data["invocations"][-1].update(info)
            write_json_atomic(self.path, self.data)


# ------------------------------------------------------------------------------------------------ running


def _cli_value(value: Any) -> str:
    """How a value is spelled for jsonargparse: lists as JSON, numbers exactly, booleans lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def train_command(
    spec: RunSpec, base_file: Path, run_dir: Path, python: str | None = None, resume_args: Sequence[str] = ()
) -> list[str]:
    """``python -m chainlora train --config <base> --key value ... --output_dir <dir> [--resume <dir>]``."""
    cmd = [python or sys.executable, "-m", "chainlora", "train", "--config", str(base_file)]
    for key, value in spec.overrides:
        cmd += [f"--{key}", _cli_value(value)]
    cmd += ["--output_dir", str(run_dir), *resume_args]
    return cmd


def usable_cpus() -> int:
    """Cores this process may run on (cgroup/affinity aware where the platform says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def worker_env(slot: int, options: SweepOptions, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a run on worker ``slot``: GPU pinning from ``devices``; CPU threads
    ``threads_per_worker``, by default one per CPU run (see :class:`SweepOptions`) and the usable cores split
    evenly between GPU runs."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(options.env)
    if options.devices:
        env["CUDA_VISIBLE_DEVICES"] = options.devices[slot % len(options.devices)]
    threads = options.threads_per_worker
    if threads is None:
        threads = max(1, usable_cpus() // options.workers) if options.devices else 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class _Interrupted(Exception):
    """Raised in the main thread by SIGTERM/SIGINT: stop launching, terminate the running children."""


class SweepRunner:
    """Runs the unfinished runs of a sweep on ``options.workers`` workers; see the module docstring."""

    def __init__(
        self, config: SweepConfig, *, echo: Callable[[str], None] | None = None, only: str | None = None
    ) -> None:
        self.config = config
        self.options = config.options
        self.root = Path(self.options.output_dir)
        self.echo = echo or (lambda msg: print(msg, flush=True))
        self.specs = config.runs()
        if only:
            pattern = re.compile(only)
            self.specs = [s for s in self.specs if pattern.search(s.name)]
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._children_lock = threading.Lock()
        self._stop = threading.Event()
        self._slots: list[int] = list(range(self.options.workers))
        self._slots_lock = threading.Lock()

    # -- files
    def run_dir(self, spec: RunSpec) -> Path:
        return self.root / spec.name

    def log_path(self, spec: RunSpec) -> Path:
        return self.root / LOG_DIR / f"{spec.name}.log"

    def write_plan(self) -> Path:
        """Write the resolved base config and the plan (every run's cell, axes and overrides).

        The plan of an existing sweep folder is extended, never shrunk: runs planned by an earlier grid stay
        listed (a report shows them as not yet run). The base config must not change, because run names only
        encode grid axes: a finished run would silently stand for other settings.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        plan_path = self.root / PLAN_FILE
        previous: list[dict[str, Any]] = []
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if json.loads(json.dumps(old.get("base"))) != json.loads(json.dumps(self.config.base)):
                raise ConfigError(
                    f"the base config differs from the one this sweep folder was started with "
                    f"({plan_path}); finished runs would not match it: use another output_dir"
                )
            previous = old.get("runs", [])
        runs = [s.to_json() for s in self.config.runs()]  # the whole grid, even under --only
        names = {r["name"] for r in runs}
        runs = [r for r in previous if r["name"] not in names] + runs
        base_file = self.root / BASE_FILE
        with atomic_path(base_file) as tmp:
            tmp.write_text(
                "# Resolved base train config of this sweep (written by `chainlora sweep`).\n"
                + yaml.safe_dump(self.config.base, sort_keys=False)
            )
        plan = {
            "source": self.config.source,
            "base": self.config.base,
            "grid": self.config.grid,
            "options": asdict(self.options),
            "runs": runs,
        }
        write_json_atomic(plan_path, plan)
        return base_file

    # -- one run
    def _acquire_slot(self) -> int:
        with self._slots_lock:
            return self._slots.pop(0)

    def _release_slot(self, slot: int) -> None:
        with self._slots_lock:
            self._slots.append(slot)
            self._slots.sort()

    def _execute(self, spec: RunSpec, base_file: Path) -> RunOutcome:
        run_dir = self.run_dir(spec)
        log = self.log_path(spec)
        outcome = RunOutcome(name=spec.name, status="pending", log=str(log))
        if is_finished(run_dir):
            outcome.status = "skipped"
            return outcome
        lock_path = self.root / LOCK_DIR / f"{spec.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                outcome.status = "busy"
                outcome.error = "another process holds this run's lock (still running?)"
                return outcome
            if is_finished(run_dir):  # finished while we waited for the lock
                outcome.status = "skipped"
                return outcome
            slot = self._acquire_slot()
            try:
                for attempt in range(1, self.options.max_attempts + 1):
                    if self._stop.is_set():
                        outcome.status = "pending"
                        break
                    outcome.attempts = attempt
                    self._run_once(spec, base_file, run_dir, log, slot, lock_fd, outcome)
                    if outcome.status == "done":
                        break
            finally:
                self._release_slot(slot)
        finally:
            os.close(lock_fd)  # the child keeps its inherited copy: the lock lives until both are gone
        return outcome

    def _run_once(
        self,
        spec: RunSpec,
        base_file: Path,
        run_dir: Path,
        log: Path,
        slot: int,
        lock_fd: int,
        outcome: RunOutcome,
    ) -> None:
        resume_args: list[str] = []
        if run_dir.exists():
            if self.options.resume == "auto" and has_checkpoint(run_dir):
                resume_args = [a.replace("{run_dir}", str(run_dir)) for a in self.options.resume_args]
                outcome.resumed = True
            else:
                shutil.rmtree(run_dir)  # unfinished and nothing to resume from: start clean
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = train_command(spec, base_file, run_dir, self.options.python, resume_args)
        env = worker_env(slot, self.options)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "ab") as out:
            header = (
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {outcome.attempts} slot {slot}"
                f"{' (resume)' if resume_args else ''}\n$ {shlex.join(cmd)}\n"
            )
            out.write(header.encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(lock_fd,),
                start_new_session=True,  # its own process group: we terminate it (and its children) as one
            )
            with self._children_lock:
                self._children[spec.name] = proc
            try:
                rc = proc.wait(timeout=self.options.run_timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _terminate(proc)
                rc = proc.wait()
                timed_out = True
            finally:
                with self._children_lock:
                    self._children.pop(spec.name, None)
        outcome.seconds = round(time.perf_counter() - start, 1)
        outcome.returncode = rc
        if rc == 0 and is_finished(run_dir):
            outcome.status, outcome.error = "done", None
            # e.g. final/ (the merged model, 0.5 GB for 135M params): the report needs metrics.json only
            for sub in self.options.cleanup:
                target = (run_dir / sub).resolve()
                if run_dir.resolve() in target.parents:
                    shutil.rmtree(target, ignore_errors=True)
        elif self._stop.is_set():
            outcome.status, outcome.error = "pending", "interrupted (the sweep was stopped)"
        else:
            outcome.status = "failed"
            if timed_out:
                outcome.error = f"timed out after {self.options.run_timeout_s} s"
            elif rc == 0:
                outcome.error = f"exited 0 but wrote no {METRICS_FILE}"
            else:
                outcome.error = f"exit code {rc}: " + (_tail(log, 5).replace("\n", " | ")[-600:])

    # -- the sweep
    def terminate_children(self) -> None:
        with self._children_lock:
            procs = list(self._children.values())
        for proc in procs:
            _terminate(proc)

    def run(self, dry_run: bool = False) -> SweepSummary:
        """Run every unfinished run; return their outcomes. Safe to call again after a kill."""
        start = time.perf_counter()
        base_file = self.write_plan()
        state = _State(self.root / STATE_FILE)
        todo = [s for s in self.specs if not is_finished(self.run_dir(s))]
        outcomes = {s.name: RunOutcome(s.name, "skipped") for s in self.specs if s not in todo}
        self.echo(
            f"sweep {self.config.source or ''} -> {self.root}: {len(self.specs)} runs, "
            f"{len(self.specs) - len(todo)} finished, {len(todo)} to run on {self.options.workers} worker(s)"
            + (f", devices {','.join(self.options.devices)}" if self.options.devices else "")
        )
        if dry_run:
            for s in todo:
                self.echo(shlex.join(train_command(s, base_file, self.run_dir(s), self.options.python)))
            return SweepSummary(self.root, outcomes, time.perf_counter() - start)
        state.start(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv,
                "workers": self.options.workers,
                "devices": self.options.devices,
                "todo": len(todo),
            }
        )
        previous = _install_signal_handlers()
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="sweep")
        futures: dict[Future[RunOutcome], RunSpec] = {}
        done_count = 0
        durations = {
            s.name: (s, seconds)
            for s in self.specs
            if s not in todo and (seconds := finished_seconds(self.run_dir(s))) is not None
        }
        left = {s.name: s for s in todo}
        try:
            for spec in todo:
                futures[pool.submit(self._execute, spec, base_file)] = spec
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = futures[fut]
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # a bug in the runner itself: record, keep going
                        outcome = RunOutcome(spec.name, "failed", error=f"runner error: {exc!r}")
                    outcomes[spec.name] = outcome
                    if outcome.status != "pending":
                        state.record(outcome)
                    done_count += 1
                    secs = f" in {outcome.seconds:.0f} s" if outcome.seconds is not None else ""
                    note = f" ({outcome.error})" if outcome.error else ""
                    resumed = " [resumed]" if outcome.resumed else ""
                    if outcome.status != "pending":
                        left.pop(spec.name, None)
                    if outcome.status == "done" and outcome.seconds:
                        durations[spec.name] = (spec, outcome.seconds)
                    eta = estimate_seconds_left(list(left.values()), durations, self.options.workers)
                    eta_note = f"; ~{format_duration(eta)} left" if eta is not None and left else ""
                    self.echo(
                        f"[{done_count}/{len(todo)}] {outcome.status:7s} {spec.name}{secs}{resumed}{note}"
                        f"{eta_note}"
                    )
        except _Interrupted:
            self._stop.set()
            self.echo("sweep interrupted: stopping running runs (continue later with the same command)")
            for fut in futures:
                fut.cancel()
            self.terminate_children()
            pool.shutdown(wait=True)
            for fut, spec in futures.items():  # runs that ended while we were being stopped
                if spec.name in outcomes or fut.cancelled() or fut.exception() is not None:
                    continue
                outcome = fut.result()
                if outcome.status not in ("pending", "skipped"):
                    state.record(outcome)
                    self.echo(f"[stopped] {outcome.status:7s} {spec.name}")
            raise
        finally:
            _restore_signal_handlers(previous)
            pool.shutdown(wait=True)
            wall = time.perf_counter() - start
            state.finish({"ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": round(wall, 1)})
        summary = SweepSummary(self.root, outcomes, time.perf_counter() - start)
        self.echo(
            f"sweep done in {summary.wall_seconds:.0f} s: {summary.count('done')} ran, "
            f"{summary.count('skipped')} already finished, {summary.count('failed')} failed, "
            f"{summary.count('busy')} busy elsewhere"
        )
        for o in outcomes.values():
            if o.status == "failed":
                self.echo(f"  FAILED {o.name}: {o.error} (log: {o.log})")
        return summary


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the run's process group, then SIGKILL it if it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_sweep(
    config: SweepConfig | str | Path,
    *,
    dry_run: bool = False,
    only: str | None = None,
    echo: Callable[[str], None] | None = None,
    **option_overrides: Any,
) -> SweepSummary:
    """Run (or continue) a sweep; ``config`` is a :class:`SweepConfig` or a sweep YAML path."""
    if not isinstance(config, SweepConfig):
        config = load_sweep_config(config, **option_overrides)
    elif option_overrides:
        opts = {k: v for k, v in option_overrides.items() if v is not None}
        config = replace(config, options=replace(config.options, **opts))
    summary = SweepRunner(config, echo=echo, only=only).run(dry_run=dry_run)
    if config.options.report and not dry_run and summary.count("done") + summary.count("skipped"):
        from chainlora.recipes.report import write_report

        out = write_report(summary.output_dir)
        (echo or print)(f"report: {out}")
    return summary


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class SweepArgs:
    """chainlora sweep SWEEP_YAML: run a grid of `chainlora train` runs, one subprocess each; resumable (run
    the same command again to continue a killed sweep). See configs/sweeps/ for the paper's tables."""

    sweep: str
    """The sweep YAML (blocks base, grid, sweep). Also accepted as the first positional argument."""
    output_dir: str | None = None
    """Root folder of the runs (default: the YAML's sweep.output_dir)."""
    workers: int | None = None
    """Runs at once, each in its own subprocess (default: sweep.workers, else 1)."""
    devices: str | None = None
    """Comma-separated GPU ids, e.g. 0,1: worker i gets CUDA_VISIBLE_DEVICES=devices[i % len]."""
    threads_per_worker: int | None = None
    """CPU threads per run (default: 1 for CPU runs, usable cores // workers with --devices)."""
    resume: ResumeMode | None = None
    """auto: continue an unfinished run with `train --resume`; restart: clear it and start over."""
    run_timeout_s: float | None = None
    """Kill a run after this many seconds and record it as failed."""
    only: str | None = None
    """Regular expression: run only the runs whose name matches (e.g. '^sst2/')."""
    dry_run: bool = False
    """Print the train commands of the unfinished runs and exit."""
    report: bool | None = None
    """Write report.md and plots when the sweep ends (default: sweep.report, else true)."""


def sweep_command(
    config: str,
    output_dir: str | None = None,
    workers: int | None = None,
    devices: str | None = None,
    threads_per_worker: int | None = None,
    resume: ResumeMode | None = None,
    run_timeout_s: float | None = None,
    only: str | None = None,
    dry_run: bool = False,
    report: bool | None = None,
) -> int:
    """Run (or continue) the sweep in YAML file ``config``; the other arguments override its ``sweep:`` block
    (see :class:`SweepArgs`). Returns 0 when every selected run is finished, 1 when some failed (they are
    retried on the next call), 130 when interrupted (SIGINT/SIGTERM; running runs are stopped)."""
    try:
        summary = run_sweep(
            config,
            dry_run=dry_run,
            only=only,
            output_dir=output_dir,
            workers=workers,
            devices=parse_devices(devices),
            threads_per_worker=threads_per_worker,
            resume=resume,
            run_timeout_s=run_timeout_s,
            report=report,
        )
    except _Interrupted:
        return 130
    return 0 if summary.ok or dry_run else 1


def sweep_main(argv: list[str]) -> int:
    """``chainlora sweep SWEEP_YAML [--workers N] [--devices 0,1] ...`` (argv without the subcommand)."""
    from chainlora.cli import parse_config

    if argv and not argv[0].startswith("-"):
        argv = ["--sweep", argv[0], *argv[1:]]
    args = parse_config(SweepArgs, argv, prog="chainlora sweep")
    kwargs = asdict(args)
    return sweep_command(kwargs.pop("sweep"), **kwargs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(sweep_main(sys.argv[1:]))
