"""A sweep's results: its finished runs, the learning rate chosen per cell on dev, and the per-cell numbers.

    load_sweep(root, merge=...)   the finished runs (through the sweep's plan when there is one), plus the runs of
                                  other sweeps that share a task and setting with them (a control's baselines)
    select_learning_rates(runs)   per cell, the learning rate with the highest mean dev score over its seeds
                                  (provisional while the cell's planned runs are not all finished)
    SweepResults.from_sweep(data) what the report's tables (``recipes.report``) and plots (``recipes.plots``) read

Model selection: within a run, the train recipe picks the epoch by its ``selection`` setting; across learning
rates, a *cell* (task × method × chain length × ranks × optimizer × extra axes) takes the learning rate with the
highest **mean dev score over its seeds** (ties: more finished seeds, then the smaller rate), and every test
number of that cell comes from that rate. The test set never takes part in a choice. While a cell's planned runs
(every learning rate × seed) are not all finished, its choice is *provisional*: a rate with one lucky seed could
win over a finished one, so the paired comparisons read only the cells whose choice is final
(:attr:`SweepResults.final`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from chainlora import rundir
from chainlora.errors import ConfigError
from chainlora.recipes.grid import RunSpec, cell_tag, run_name
from chainlora.recipes.stats import mean_std


class Variant(NamedTuple):
    """A row of the tables: a method as trained. ``lr_schedule`` is set only for a schedule that belongs to the
    method: 'jagged' (the linear decay restarted at every knot) exists only for COLA, so a jagged chain is a
    variant of its own beside the linear one and the LoRA baseline; other schedules are settings (the group).
    ``optimizer_reset`` likewise: set only for a chain whose knots keep optimizer state (``chain.optimizer_reset``
    below 1; None = the paper's full reset), whether a grid axis or the sweep's base set it."""

    method: str
    chain_length: int | None
    ranks: tuple[int, ...] | None
    lr_schedule: str | None = None
    optimizer_reset: float | None = None


Group = tuple[str | None, tuple[tuple[str, Any], ...]]  # (optimizer, extra axes)
SCHEDULE_AXIS = "lr_schedule"
RESET_AXIS = "chain.optimizer_reset"  # a COLA variant below 1 (see Variant), never a setting group
# 'jagged' is COLA's per-link form of 'linear' (for one link they are the same schedule): runs with either share
# a group, and the schedule names the variant instead
LINEAR_FAMILY = ("linear", "jagged")
Cell = tuple[str, Variant, Group]  # (task, variant, group)
METHOD_ORDER = {"lora": 0, "cola": 1, "full": 2}
LOWER_IS_BETTER = ("perplexity", "loss")  # metrics a learning rate is chosen to minimise


@dataclass(frozen=True)
class EndOfBudget:
    """A run at its last optimizer step, whatever its checkpoint selection picked: the training loss averaged
    over the last epoch's logged steps, and the dev loss and dev score evaluated at the last step (None where
    ``metrics.json`` does not hold them: no loss log, or no dev evaluation at the last step)."""

    train_loss: float | None
    dev_loss: float | None
    dev_score: float | None


@dataclass
class RunResult:
    """One finished run: its place in the grid and what its ``metrics.json`` says."""

    name: str
    task: str
    method: str
    chain_length: int | None
    ranks: tuple[int, ...] | None
    optimizer: str | None
    lr: float
    seed: int
    extras: tuple[tuple[str, Any], ...]
    dev_score: float | None
    test_score: float | None
    train_flops: float | None = None
    train_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dev_loss: float | None = None
    joined_from: str | None = None  # the other sweep folder it was joined from (load_sweep's merge)

    @property
    def dev_rank(self) -> float | None:
        """What learning rates are chosen by, higher is better: the dev score (negated for a metric where lower
        is better, e.g. perplexity), else the negated dev loss (data with no dev score)."""
        if self.dev_score is not None:
            return -self.dev_score if self.metrics.get("metric") in LOWER_IS_BETTER else self.dev_score
        return -self.dev_loss if self.dev_loss is not None else None

    @property
    def end_of_budget(self) -> EndOfBudget:
        """The run at its last step (see :class:`EndOfBudget`), from ``train_loss`` and ``dev_history``."""
        steps, epochs = self.metrics.get("train_steps"), self.metrics.get("epochs")
        train_loss = None
        if isinstance(steps, int) and steps > 0 and isinstance(epochs, int | float) and epochs > 0:
            last_epoch_from = steps - math.ceil(steps / epochs)
            last_epoch = [
                loss
                for entry in self.metrics.get("train_loss") or []
                if isinstance(entry, list | tuple) and len(entry) == 2
                and (step := _float(entry[0])) is not None and step > last_epoch_from
                and (loss := _float(entry[1])) is not None
            ]  # fmt: skip
            train_loss = statistics.fmean(last_epoch) if last_epoch else None
        history = [e for e in self.metrics.get("dev_history") or [] if isinstance(e, dict)]
        last = history[-1] if history and history[-1].get("step") == steps else {}
        return EndOfBudget(train_loss, _float(last.get("dev_loss")), _float(last.get("dev_score")))

    @classmethod
    def from_spec(cls, spec: RunSpec, metrics: dict[str, Any], config: dict[str, Any]) -> RunResult:
        """A run at its grid position ``spec``, with what its ``metrics.json`` and ``config.yaml`` hold (both
        empty for a run still to finish)."""
        return cls(
            name=spec.name,
            task=spec.task,
            method=spec.method,
            chain_length=spec.chain_length,
            ranks=spec.ranks,
            optimizer=spec.optimizer,
            lr=spec.lr,
            seed=spec.seed,
            extras=spec.extras,
            dev_score=_float(metrics.get("dev_score")),
            dev_loss=_float(metrics.get("dev_loss")),
            test_score=_float(metrics.get("test_score")),
            train_flops=_float(metrics.get("train_flops")),
            train_seconds=_float(metrics.get("train_seconds")),
            metrics=metrics,
            config=config,
        )

    @property
    def variant(self) -> Variant:
        jagged = dict(self.extras).get(SCHEDULE_AXIS) == "jagged"
        reset = _float(
            dict(self.extras).get(RESET_AXIS, (self.config.get("chain") or {}).get("optimizer_reset"))
        )
        kept = reset if self.method == "cola" and reset is not None and reset < 1.0 else None
        return Variant(self.method, self.chain_length, self.ranks, "jagged" if jagged else None, kept)

    @property
    def group(self) -> Group:
        return setting_group(self.optimizer, self.extras)

    @property
    def cell(self) -> tuple[str, Variant, Group]:
        return (self.task, self.variant, self.group)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / rundir.CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML: as if absent
        return {}
    return data if isinstance(data, dict) else {}


def _result(spec: RunSpec, run_dir: Path) -> RunResult:
    return RunResult.from_spec(spec, _read_json(run_dir / rundir.METRICS_FILE), _read_config(run_dir))


def spec_from_run_dir(run_dir: Path) -> RunSpec:
    """Rebuild a run's grid position from its own ``metrics.json`` and ``config.yaml`` (no sweep plan)."""
    metrics = _read_json(run_dir / rundir.METRICS_FILE)
    config = _read_config(run_dir)
    method = str(metrics.get("method") or config.get("method"))
    chain = config.get("chain") or {}
    lora = config.get("lora") or {}
    length = None if method == "full" else int(chain.get("length") or 1)
    ranks = None
    if method != "full":
        ranks = tuple(chain.get("ranks") or ()) or ((int(lora["r"]),) if lora.get("r") else None)
        if method == "cola" and length and ranks and len(set(ranks)) == 1:
            ranks = ranks[:1]
    optimizer = config.get("optimizer")
    lr = _float(config.get("lr", metrics.get("lr")))
    if lr is None:
        raise ConfigError(f"{run_dir}: no learning rate in config.yaml or metrics.json")
    seed = int(metrics.get("seed", config.get("seed", 0)))
    task = str(metrics.get("task") or config.get("task"))
    jagged = config.get("lr_schedule") == "jagged"  # a COLA variant of its own (see Variant)
    extras: tuple[tuple[str, Any], ...] = ((SCHEDULE_AXIS, "jagged"),) if jagged else ()
    reset = _float((config.get("chain") or {}).get("optimizer_reset"))
    if method == "cola" and reset is not None and reset < 1.0:  # so is a chain that keeps optimizer state
        extras += ((RESET_AXIS, reset),)
    name = run_name(task, method, length, ranks, optimizer, lr, seed, extras)
    return RunSpec(
        name=name,
        cell=name.rsplit("/", 2)[0] + f"/{optimizer}",
        task=task,
        method=method,
        chain_length=length,
        ranks=ranks,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        extras=extras,
    )


@dataclass(frozen=True)
class JoinedSweep:
    """Runs another sweep folder added to a sweep's report (``merge`` of :func:`load_sweep`), and the settings
    in which the two sweeps' ``base`` blocks differ: key -> (this sweep's value, theirs; None = the default)."""

    root: str
    runs: int
    base_differences: dict[str, tuple[Any, Any]]


@dataclass
class SweepData:
    """Everything the report needs: finished runs, the plan (when the sweep wrote one) and the run states."""

    root: Path
    results: list[RunResult]
    planned: list[RunSpec]
    state: dict[str, Any]
    plan: dict[str, Any]
    merged: list[JoinedSweep] = field(default_factory=list)  # other sweep folders whose runs joined
    # per cell, planned runs still to run (neither finished nor failed)
    pending: Counter[Cell] = field(default_factory=Counter)

    @property
    def missing(self) -> list[RunSpec]:
        done = {r.name for r in self.results if r.joined_from is None}
        return [s for s in self.planned if s.name not in done]

    @property
    def failed(self) -> dict[str, dict[str, Any]]:
        done = {r.name for r in self.results if r.joined_from is None}
        runs = self.state.get("runs", {})
        return {n: e for n, e in runs.items() if e.get("status") == "failed" and n not in done}

    @property
    def to_run(self) -> list[RunSpec]:
        """The planned runs still to run: neither finished nor failed."""
        failed = self.failed
        return [s for s in self.missing if s.name not in failed]


def setting_group(optimizer: str | None, extras: Iterable[tuple[str, Any]]) -> Group:
    """The setting a run belongs to: its optimizer and extra axes, less an ``lr_schedule`` of the linear family
    and ``chain.optimizer_reset`` (which the variant carries, see :class:`Variant`)."""
    return (
        optimizer,
        tuple(
            (k, v) for k, v in extras if not (k == SCHEDULE_AXIS and v in LINEAR_FAMILY) and k != RESET_AXIS
        ),
    )


def load_sweep(root: str | Path, merge: Iterable[str | Path] = ()) -> SweepData:
    """Collect a sweep's finished runs: through its plan when present, else every ``*/metrics.json`` below.
    ``merge``: other sweep folders whose finished runs join where they share a task and setting (group) with a
    planned or finished run of ``root``, e.g. the LoRA and COLA runs a control sweep is compared with (first
    folder first). A run is not joined where ``root`` has its namesake of the same variant, or a planned run of
    that name still to finish; a namesake of another variant joins (a control that keeps optimizer state, set in
    its base, has the paper's COLA run names)."""
    data = _load_one_sweep(root)
    cells = {(r.task, r.group) for r in data.results}
    cells |= {(s.task, setting_group(s.optimizer, s.extras)) for s in data.planned}
    taken = {(r.name, r.variant) for r in data.results}
    unfinished = {s.name for s in data.missing}
    base = data.plan.get("base") or {}
    for other in merge:
        other_data = _load_one_sweep(other)
        joined = [
            replace(r, joined_from=str(other))
            for r in other_data.results
            if (r.task, r.group) in cells and (r.name, r.variant) not in taken and r.name not in unfinished
        ]
        taken |= {(r.name, r.variant) for r in joined}
        data.results += joined
        joined_cells = {r.cell for r in joined}
        data.pending.update({cell: n for cell, n in other_data.pending.items() if cell in joined_cells})
        theirs = other_data.plan.get("base") or {}
        differences = {
            k: (base.get(k), theirs.get(k)) for k in sorted({*base, *theirs}) if base.get(k) != theirs.get(k)
        }
        data.merged.append(JoinedSweep(str(other), len(joined), differences))
    return data


def _load_one_sweep(root: str | Path) -> SweepData:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"sweep folder {root} does not exist")
    plan: dict[str, Any] = {}
    planned: list[RunSpec] = []
    if (root / rundir.SWEEP_PLAN_FILE).is_file():
        plan = _read_json(root / rundir.SWEEP_PLAN_FILE)
        planned = [RunSpec.from_json(r) for r in plan.get("runs", [])]
    results: list[RunResult] = []
    if planned:
        for spec in planned:
            if (root / spec.name / rundir.METRICS_FILE).is_file():
                results.append(_result(spec, root / spec.name))
    else:
        for metrics in sorted(root.rglob(rundir.METRICS_FILE)):
            if any(part.startswith(".") for part in metrics.relative_to(root).parts):
                continue
            results.append(_result(spec_from_run_dir(metrics.parent), metrics.parent))
    state = _read_json(root / rundir.SWEEP_STATE_FILE) if (root / rundir.SWEEP_STATE_FILE).is_file() else {}
    data = SweepData(root=root, results=results, planned=planned, state=state, plan=plan)
    data.pending.update(planned_cell(spec, plan.get("base") or {}) for spec in data.to_run)
    return data


def planned_cell(spec: RunSpec, base: dict[str, Any]) -> Cell:
    """The cell a planned run falls in once it finishes: its grid position, read with the sweep's ``base``
    config as the run's own config (a base may set ``chain.optimizer_reset``, which makes a variant)."""
    return RunResult.from_spec(spec, {}, base).cell


@dataclass
class CellSelection:
    """The learning rate chosen for one cell and the runs (one per seed) at that rate."""

    task: str
    variant: Variant
    group: Group
    dev_by_lr: dict[float, tuple[float | None, int]]  # lr -> (mean dev score over seeds, finished seeds)
    chosen_lr: float
    runs: list[RunResult]
    pending: int = 0  # planned runs of the cell still to run: while > 0 the choice is provisional

    def test_scores(self) -> dict[int, float]:
        return {r.seed: r.test_score for r in self.runs if r.test_score is not None}


def select_learning_rates(
    results: Iterable[RunResult], pending: dict[Cell, int] | None = None
) -> dict[tuple[str, Variant, Group], CellSelection]:
    """Per cell, the learning rate with the best mean dev score over its seeds (:attr:`RunResult.dev_rank`: the
    lowest perplexity for a metric where lower is better; the lowest dev loss for data with no dev score; ties:
    more seeds, then the smaller rate; a rate whose runs have neither ranks last). The test score takes no part.
    ``pending``: per cell, planned runs still to run; such a cell's choice is provisional (``CellSelection.pending``)."""
    by_cell: dict[tuple[str, Variant, Group], dict[float, list[RunResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in results:
        by_cell[r.cell][r.lr].append(r)
    out = {}
    for cell, by_lr in by_cell.items():
        dev_by_lr: dict[float, tuple[float | None, int]] = {}
        for lr, runs in by_lr.items():
            devs = [r.dev_rank for r in runs if r.dev_rank is not None]
            dev_by_lr[lr] = (statistics.fmean(devs) if devs else None, len(runs))

        def key(lr: float, dev_by_lr: dict[float, tuple[float | None, int]] = dev_by_lr) -> tuple:
            dev, n = dev_by_lr[lr]
            return (dev is not None, dev if dev is not None else 0.0, n, -lr)

        chosen = max(dev_by_lr, key=key)
        runs = sorted(by_lr[chosen], key=lambda r: r.seed)
        out[cell] = CellSelection(
            cell[0],
            cell[1],
            cell[2],
            dict(sorted(dev_by_lr.items())),
            chosen,
            runs,
            (pending or {}).get(cell, 0),
        )
    return out


# ------------------------------------------------------------------------------------------------ labels


def variant_label(variant: Variant, show_rank: bool = True) -> str:
    """``LoRA (r=8)``, ``COLA (L=3, r=8)``, ``COLA (L=2, r=8→4)``, ``COLA (L=3, jagged LR)``,
    ``COLA (L=3, optimizer reset 0.9)``, ``Full FT``."""
    method, length, ranks, schedule, reset = variant
    if method == "full":
        return "Full FT"
    rank = ""
    if ranks and show_rank:
        rank = "r=" + "→".join(str(r) for r in ranks)
    if method == "lora":
        return f"LoRA ({rank})" if rank else "LoRA"
    parts = [f"L={length}"] + ([rank] if rank else []) + ([f"{schedule} LR"] if schedule else [])
    parts += [f"optimizer reset {reset:g}"] if reset is not None else []
    return f"COLA ({', '.join(parts)})"


def variant_order(variant: Variant) -> tuple:
    method, length, ranks, schedule, reset = variant
    return (
        METHOD_ORDER.get(method, 9),
        ranks[0] if ranks else 0,
        length or 0,
        tuple(-r for r in ranks or ()),
        schedule or "",
        -(1.0 if reset is None else reset),  # the paper's full reset first, then keeping more and more
    )


def group_label(group: Group) -> str:
    optimizer, extras = group
    parts = [f"optimizer {optimizer}"] if optimizer else []
    parts += [f"{k} = {v}" for k, v in extras]
    return ", ".join(parts) or "all runs"


def group_slug(group: Group) -> str:
    optimizer, extras = group
    return cell_tag("full", None, None, extras).replace("full", str(optimizer or "default"), 1)


def lora_baseline(variant: Variant, variants: Iterable[Variant]) -> Variant | None:
    """The LoRA variant a COLA variant is compared with: same first-link rank (or both unranked); a jagged chain
    meets LoRA under the linear schedule (one link of it)."""
    if variant.method != "cola":
        return None
    want = variant.ranks[:1] if variant.ranks else variant.ranks
    for v in variants:
        if v.method == "lora" and (v.ranks or None) == (want or None):
            return v
    return None


# ------------------------------------------------------------------------------------------------ results


@dataclass
class CellStats:
    """Test score of one cell over its seeds."""

    mean: float
    std: float | None  # sample sd (ddof=1); None for one seed
    n: int  # seeds
    # the cell's learning rate may still change: some of its planned runs are still to run
    provisional: bool = False


@dataclass
class SweepResults:
    """What every table and plot reads: the finished runs, each cell at its chosen learning rate, the score
    scale (×100 for fractions), and the tasks and groups in report order."""

    data: SweepData
    selected: dict[Cell, CellSelection]
    scale: float
    tasks: list[str]
    groups: list[Group]

    @classmethod
    def from_sweep(cls, data: SweepData, *, percent: bool | None = None) -> SweepResults:
        """Choose each cell's learning rate (on dev) and the scale: ×100 with ``percent``, or by default when
        every score is a fraction in [0, 1]."""
        selected = select_learning_rates(data.results, data.pending)
        scores = [r.test_score for r in data.results if r.test_score is not None]
        scores += [r.dev_score for r in data.results if r.dev_score is not None]
        scale = 100.0 if (percent if percent is not None else bool(scores) and max(scores) <= 1.0) else 1.0
        groups = sorted({c[2] for c in selected}, key=lambda g: (str(g[0]), str(g[1])))
        return cls(data, selected, scale, _ordered_tasks(data), groups)

    def stats(self, task: str, variant: Variant, group: Group) -> CellStats | None:
        """Test score of a cell at its chosen learning rate over its seeds (scaled), or None."""
        sel = self.selected.get((task, variant, group))
        if sel is None:
            return None
        scores = [s * self.scale for s in sel.test_scores().values()]
        if not scores:
            return None
        mean, std = mean_std(scores)
        return CellStats(mean, std, len(scores), sel.pending > 0)

    @property
    def final(self) -> dict[Cell, CellSelection]:
        """The cells whose learning-rate choice is final (every planned run finished or failed): the only ones
        a paired comparison reads, so that no cell enters it through a rate with fewer seeds than planned."""
        return {cell: sel for cell, sel in self.selected.items() if not sel.pending}

    def zero_shot(self, task: str) -> CellStats | None:
        """The pretrained model's test score (``zero_shot_test_score``, computed by runs with ``zero_shot``),
        one value per seed (the test set depends on the seed only), mean ± sd over seeds."""
        by_seed: dict[int, float] = {}
        for r in self.data.results:
            z = _float(r.metrics.get("zero_shot_test_score"))
            if r.task == task and z is not None:
                by_seed.setdefault(r.seed, z * self.scale)
        if not by_seed:
            return None
        mean, std = mean_std(list(by_seed.values()))
        return CellStats(mean, std, len(by_seed))

    def variants(self, group: Group) -> list[Variant]:
        """The variants with a chosen cell in ``group``, in table order."""
        return sorted({c[1] for c in self.selected if c[2] == group}, key=variant_order)

    def expected_seeds(self) -> int:
        """Seeds per cell the plan asks for (or the finished runs show)."""
        seeds = {r.seed for r in self.data.results}
        planned = {s.seed for s in self.data.planned}
        return len(planned or seeds)

    def chain_length_series(self, group: Group) -> dict[tuple[int, ...] | None, list[Variant]]:
        """Per first-link rank, the single-rank chain variants (LoRA = length 1) under the group's schedule, when
        ≥ 2 lengths exist."""
        by_rank: dict[tuple[int, ...] | None, list[Variant]] = defaultdict(list)
        for v in self.variants(group):
            plain = v.lr_schedule is None and v.optimizer_reset is None
            if v.method in ("lora", "cola") and not (v.ranks and len(v.ranks) > 1) and plain:
                by_rank[v.ranks].append(v)
        return {
            r: sorted(vs, key=lambda v: v[1] or 0) for r, vs in by_rank.items() if len({v[1] for v in vs}) > 1
        }

    def stepdown_variants(self, group: Group) -> list[Variant]:
        """The COLA variants of ``group`` whose links change rank."""
        return [v for v in self.variants(group) if v[0] == "cola" and v[2] and len(v[2]) > 1]

    def flops(self, task: str, variant: Variant, group: Group) -> float | None:
        """Mean training FLOPs of a cell at its chosen learning rate."""
        sel = self.selected.get((task, variant, group))
        vals = [r.train_flops for r in sel.runs if r.train_flops] if sel else []
        return statistics.fmean(vals) if vals else None


def _ordered_tasks(data: SweepData) -> list[str]:
    order: list[str] = []
    for s in data.planned or []:
        if s.task not in order:
            order.append(s.task)
    for r in data.results:
        if r.task not in order:
            order.append(r.task)
    return order
