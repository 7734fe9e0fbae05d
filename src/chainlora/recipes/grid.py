"""Sweep grids: the sweep YAML, its axes (named like ``TrainConfig``'s fields), and the runs they expand to.

A sweep YAML has three blocks::

    base:                     # a train config (the fields of ``chainlora train``); ``config:`` names a file to
      config: configs/x.yaml  #   start from, the other keys override it
      model: smollm2-135m
    grid:                     # axes, crossed; a list of such mappings is a union of grids
      task: [sst2, rte]
      method: [lora, cola, full]
      chain.length: [3]       # COLA only (LoRA is chain length 1; a COLA of length 1 *is* LoRA and is merged)
      ranks: [[8], [8, 4]]    # rank of each link; [8, 4] is a rank step-down (Table 4)
      optimizer: [adamw]
      lr: {lora: [5e-4], cola: [5e-4], full: [1e-5]}   # a list, or a grid per method/optimizer
      seed: [0, 1, 2]
    sweep:                    # how to run it: chainlora.config.SweepOptions (the command line overrides it)
      output_dir: runs/table1
      workers: 1

The core axes are ``task``, ``method``, ``chain.length``, ``ranks`` (``lora.r`` of the first link, and
``chain.ranks`` for a step-down), ``optimizer``, ``lr`` and ``seed``; ``learning_rate`` and ``chain_length``, the
names of older sweep files, are read as ``lr`` and ``chain.length`` (:data:`AXIS_ALIASES`, the one place that
knows them). Every other grid key (``num_train``, ``lora.alpha``, ...) is an extra axis passed to the train CLI
as is and named in the run folder (``-n100``). The base config must stay fixed for a sweep folder (run names
encode grid axes only); the grid may grow.

Invariant: run names are a pure function of the cell: ``<task>/<method tag>/<optimizer>-lr<lr>/seed<seed>``,
e.g. ``sst2/cola-L3-r8/adamw-lr5e-4/seed0``; a cell is everything except learning rate and seed. The same run
gets the same name whatever the axes were called, so a resumed sweep finds its runs.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from chainlora.config import SweepOptions
from chainlora.errors import ConfigError

METHODS = ("lora", "cola", "full")
CORE_AXES = ("task", "method", "chain.length", "ranks", "optimizer", "lr", "seed")
AXIS_ALIASES = {"learning_rate": "lr", "chain_length": "chain.length"}  # old axis names -> TrainConfig's
# Short names of common extra axes in run names (others appear as ``<key>-<value>``).
EXTRA_SHORT = {
    "num_train": "n",
    "num_dev": "dev",
    "num_eval": "test",
    "lora.alpha": "a",
    "lr_schedule": "sched",
    "chain.optimizer_reset": "optreset",
    "epochs": "ep",
    "max_length": "len",
    "batch_size": "bs",
}


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its cell (every axis but learning rate and seed), LR and seed, and CLI overrides.

    ``sweep_plan.json`` lists every run as :meth:`to_json`; :meth:`from_json` also reads plans written before the
    axes were renamed (``learning_rate`` for ``lr``)."""

    name: str  # <task>/<tag>/<optimizer>-lr<lr>/seed<seed>
    cell: str  # <task>/<tag>/<optimizer>
    task: str
    method: str
    chain_length: int | None  # None for full fine-tuning
    ranks: tuple[int, ...] | None
    optimizer: str | None
    lr: float
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
            lr=float(d["lr"] if "lr" in d else d["learning_rate"]),
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
    lr: float,
    seed: int,
    extras: Iterable[tuple[str, Any]] = (),
) -> str:
    """Deterministic run folder name, e.g. ``sst2/cola-L3-r8/adamw-lr5e-4/seed0``."""
    return (
        f"{_slug(task)}/{cell_tag(method, chain_length, ranks, extras)}/"
        f"{_slug(optimizer or 'default')}-lr{format_number(lr)}/seed{int(seed)}"
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
                f"grid.lr has no entry for method {method!r} / optimizer {optimizer!r} "
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
    task: str | None,
    method: str,
    chain_length: int | None,
    ranks: Sequence[int] | None,
    optimizer: str | None,
    lr: float,
    seed: int,
    extras: Iterable[tuple[str, Any]] = (),
    vary_train_seed: bool = True,
) -> dict[str, Any]:
    """The ``chainlora train`` fields of one run (TrainConfig names: ``lr``, ``chain.length``, ``lora.r``,
    ``chain.ranks``); ``ranks[0]`` is the first link's rank (``lora.r``), a longer list is a step-down."""
    out: dict[str, Any] = {"method": method} if task is None else {"task": task, "method": method}
    if method == "cola":
        out["chain.length"] = int(chain_length or 1)
    if ranks:
        out["lora.r"] = int(ranks[0])
        if method == "cola" and len(ranks) > 1:
            out["chain.ranks"] = [int(r) for r in ranks]
    if optimizer is not None:
        out["optimizer"] = optimizer
    out["lr"] = float(lr)
    out["seed"] = int(seed)
    if vary_train_seed:
        out["train_seed"] = int(seed)
    out.update(extras)
    return out


def canonical_axes(grid: Mapping[str, Any]) -> dict[str, Any]:
    """``grid`` with the old axis names (:data:`AXIS_ALIASES`) renamed to TrainConfig's; an axis given under
    both names is refused."""
    out: dict[str, Any] = {}
    for key, values in grid.items():
        name = AXIS_ALIASES.get(key, key)
        if name in out:
            raise ConfigError(f"grid axis {name!r} is given twice (as {name!r} and as its old name)")
        out[name] = values
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
    ``seed``). The old axis names (:data:`AXIS_ALIASES`) are read as the new ones. With ``vary_train_seed``
    the trainer seed (LoRA init, batch order) follows the sampling seed; the MeZO harness keeps it at 42.
    """
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    if not grids:
        raise ConfigError("the sweep grid is empty")
    specs: dict[str, RunSpec] = {}
    for g in grids:
        if not isinstance(g, Mapping):
            raise ConfigError(f"a grid must be a mapping of axis -> values, got {type(g).__name__}")
        g = canonical_axes(g)
        for key in ("task", "method", "seed"):
            if key not in g and key not in base:
                raise ConfigError(f"grid axis {key!r} is missing (and the base config does not set it)")
        tasks = _as_list(g.get("task", base.get("task")))
        methods = _as_list(g.get("method", base.get("method", "cola")))
        chain_lengths = _as_list(g.get("chain.length", (base.get("chain") or {}).get("length") or 3))
        ranks_axis = _ranks_list(g.get("ranks")) if "ranks" in g else [None]
        optimizers = _as_list(g.get("optimizer", base.get("optimizer")))
        lr_spec = g.get("lr", base.get("lr"))
        if lr_spec is None:
            raise ConfigError("no learning rate: set grid.lr or base.lr")
        seeds = _as_list(g.get("seed", base.get("seed")))
        extra_keys = [k for k in g if k not in CORE_AXES]
        used_stepdowns: set[tuple[int, ...]] = set()
        extra_values = [_as_list(g[k]) for k in extra_keys]
        for task, method, length, ranks, optimizer, extra in itertools.product(
            tasks, methods, chain_lengths, ranks_axis, optimizers, itertools.product(*extra_values)
        ):
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
            length = int(length)
            if length < 1:
                raise ConfigError(f"chain.length must be >= 1, got {length}")
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
            label = str(task) if task is not None else data_label(base)  # your data: named after its file
            for lr in _lr_grid(lr_spec, method, optimizer):
                for seed in seeds:
                    name = run_name(label, method, length, ranks, optimizer, lr, int(seed), extras)
                    if name in specs:
                        continue
                    overrides = train_overrides(
                        task, method, length, ranks, optimizer, lr, int(seed), extras, vary_train_seed
                    )
                    specs[name] = RunSpec(
                        name=name,
                        cell=name.rsplit("/", 2)[0] + f"/{_slug(optimizer or 'default')}",
                        task=label,
                        method=method,
                        chain_length=length,
                        ranks=ranks,
                        optimizer=optimizer,
                        lr=lr,
                        seed=int(seed),
                        extras=extras,
                        overrides=tuple(overrides.items()),
                    )
        for ranks in ranks_axis:
            if ranks is not None and len(set(ranks)) > 1 and ranks not in used_stepdowns:
                raise ConfigError(
                    f"ranks {list(ranks)} (one rank per link) fits no COLA chain of this grid: add "
                    f"chain.length {len(ranks)} (chain lengths here: {chain_lengths})"
                )
    return list(specs.values())


def data_label(base: Mapping[str, Any]) -> str:
    """The name runs on your own data go by (no ``task``): the data file's (or folder's) name without suffix,
    as ``TrainConfig.workload_name``."""
    data = base.get("data")
    path = data.get("path") if isinstance(data, Mapping) else data
    if not path:
        raise ConfigError("grid: no task and no data: set base.task (or a task axis) or base.data")
    return Path(str(path)).name.split(".")[0] or "data"


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


def load_sweep_config(
    path: str | Path, *, options: SweepOptions | None = None, **option_overrides: Any
) -> SweepConfig:
    """Parse a sweep YAML; ``option_overrides`` (non-None values) replace fields of its ``sweep:`` block, and
    ``options`` (the command line over that block, already merged by the CLI) replaces the block altogether."""
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
    return sweep_config_from_dict(raw, origin=path, options=options, **option_overrides)


def sweep_config_from_dict(
    raw: Mapping[str, Any],
    *,
    origin: Path | None = None,
    options: SweepOptions | None = None,
    **option_overrides: Any,
) -> SweepConfig:
    """Build a :class:`SweepConfig` from the three YAML blocks (already parsed)."""
    if options is None:
        opts = dict(raw.get("sweep") or {})
        opts.update({k: v for k, v in option_overrides.items() if v is not None})
        options = SweepOptions.from_dict(opts)
    base = _resolve_base(raw.get("base") or {}, origin)
    config = SweepConfig(
        base=base, grid=copy.deepcopy(raw["grid"]), options=options, source=str(origin) if origin else None
    )
    config.runs()  # validate the grid now, not halfway through a sweep
    return config
