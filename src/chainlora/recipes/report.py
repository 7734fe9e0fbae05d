"""Tables, plots and paired tests from a sweep's finished runs, in the COLA paper's layout.

``chainlora report SWEEP_DIR`` reads every finished run (a folder with ``metrics.json``) of a sweep and writes
``report.md`` and ``plots/*.png`` beside them:

* **Main table** (the paper's Tables 1/2/5/6/8): rows are methods, columns tasks, cells ``mean ± sd`` of the test
  score over seeds (sd with ddof=1), the best mean of each column in bold, and a row with the relative gain of
  each COLA variant over the LoRA of the same rank, ``(COLA − LoRA) / LoRA``. One table per optimizer and per
  value of any extra axis (e.g. ``num_train``).
* **Chain length** (Table 3): rows tasks, columns chain lengths (length 1 = LoRA), plus a plot of test score
  against chain length with a ±1 sd band.
* **Rank step-down** (Table 4 / Figure 3): score and training FLOPs saved against LoRA.
* **Paired comparison**: COLA and LoRA runs of the same seed draw the same train/dev/test rows, so they are
  paired: per task and overall, the mean difference, wins/losses, a paired t-test (``scipy.stats.ttest_rel``)
  and an exact two-sided sign test (``scipy.stats.binomtest``, ties dropped).

Model selection, stated in the report: within a run, the train recipe picks the epoch by its ``selection``
setting (read from each run's ``config.yaml``); across learning rates, a *cell* (task × method × chain length ×
ranks × optimizer × extra axes) takes the learning rate with the highest **mean dev score over its seeds**
(ties: more finished seeds, then the smaller rate), and every test number of that cell comes from that rate.
The test set never takes part in a choice.

Scores in ``metrics.json`` in [0, 1] are shown as percentages (×100), like the paper's tables.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chainlora.errors import ConfigError
from chainlora.io import atomic_path
from chainlora.recipes.sweep import (
    METRICS_FILE,
    PLAN_FILE,
    STATE_FILE,
    RunSpec,
    cell_tag,
    format_number,
    run_name,
)

Variant = tuple[str, int | None, tuple[int, ...] | None]  # (method, chain length, ranks)
Group = tuple[str | None, tuple[tuple[str, Any], ...]]  # (optimizer, extra axes)
METHOD_ORDER = {"lora": 0, "cola": 1, "full": 2}


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class RunResult:
    """One finished run: its place in the grid and what its ``metrics.json`` says."""

    name: str
    task: str
    method: str
    chain_length: int | None
    ranks: tuple[int, ...] | None
    optimizer: str | None
    learning_rate: float
    seed: int
    extras: tuple[tuple[str, Any], ...]
    dev_score: float | None
    test_score: float | None
    train_flops: float | None = None
    train_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> Variant:
        return (self.method, self.chain_length, self.ranks)

    @property
    def group(self) -> Group:
        return (self.optimizer, self.extras)

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
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _result(spec: RunSpec, run_dir: Path) -> RunResult:
    metrics = _read_json(run_dir / METRICS_FILE)
    return RunResult(
        name=spec.name,
        task=spec.task,
        method=spec.method,
        chain_length=spec.chain_length,
        ranks=spec.ranks,
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        extras=spec.extras,
        dev_score=_float(metrics.get("dev_score")),
        test_score=_float(metrics.get("test_score")),
        train_flops=_float(metrics.get("train_flops")),
        train_seconds=_float(metrics.get("train_seconds")),
        metrics=metrics,
        config=_read_config(run_dir),
    )


def spec_from_run_dir(run_dir: Path) -> RunSpec:
    """Rebuild a run's grid position from its own ``metrics.json`` and ``config.yaml`` (no sweep plan)."""
    metrics = _read_json(run_dir / METRICS_FILE)
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
    name = run_name(task, method, length, ranks, optimizer, lr, seed)
    return RunSpec(
        name=name,
        cell=name.rsplit("/", 2)[0] + f"/{optimizer}",
        task=task,
        method=method,
        chain_length=length,
        ranks=ranks,
        optimizer=optimizer,
        learning_rate=lr,
        seed=seed,
    )


@dataclass
class SweepData:
    """Everything the report needs: finished runs, the plan (when the sweep wrote one) and the run states."""

    root: Path
    results: list[RunResult]
    planned: list[RunSpec]
    state: dict[str, Any]
    plan: dict[str, Any]

    @property
    def missing(self) -> list[RunSpec]:
        done = {r.name for r in self.results}
        return [s for s in self.planned if s.name not in done]

    @property
    def failed(self) -> dict[str, dict[str, Any]]:
        done = {r.name for r in self.results}
        runs = self.state.get("runs", {})
        return {n: e for n, e in runs.items() if e.get("status") == "failed" and n not in done}


def load_sweep(root: str | Path) -> SweepData:
    """Collect a sweep's finished runs: through its plan when present, else every ``*/metrics.json`` below."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"sweep folder {root} does not exist")
    plan: dict[str, Any] = {}
    planned: list[RunSpec] = []
    if (root / PLAN_FILE).is_file():
        plan = _read_json(root / PLAN_FILE)
        planned = [RunSpec.from_json(r) for r in plan.get("runs", [])]
    results: list[RunResult] = []
    if planned:
        for spec in planned:
            if (root / spec.name / METRICS_FILE).is_file():
                results.append(_result(spec, root / spec.name))
    else:
        for metrics in sorted(root.rglob(METRICS_FILE)):
            if any(part.startswith(".") for part in metrics.relative_to(root).parts):
                continue
            results.append(_result(spec_from_run_dir(metrics.parent), metrics.parent))
    state = _read_json(root / STATE_FILE) if (root / STATE_FILE).is_file() else {}
    return SweepData(root=root, results=results, planned=planned, state=state, plan=plan)


# ------------------------------------------------------------------------------------------------ statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class CellSelection:
    """The learning rate chosen for one cell and the runs (one per seed) at that rate."""

    task: str
    variant: Variant
    group: Group
    dev_by_lr: dict[float, tuple[float | None, int]]  # lr -> (mean dev score over seeds, finished seeds)
    chosen_lr: float
    runs: list[RunResult]

    def test_scores(self) -> dict[int, float]:
        return {r.seed: r.test_score for r in self.runs if r.test_score is not None}


def select_learning_rates(results: Iterable[RunResult]) -> dict[tuple[str, Variant, Group], CellSelection]:
    """Per cell, the learning rate with the highest mean dev score over its seeds (ties: more seeds, then the
    smaller rate; a rate whose runs have no dev score ranks last). The test score takes no part."""
    by_cell: dict[tuple[str, Variant, Group], dict[float, list[RunResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in results:
        by_cell[r.cell][r.learning_rate].append(r)
    out = {}
    for cell, by_lr in by_cell.items():
        dev_by_lr: dict[float, tuple[float | None, int]] = {}
        for lr, runs in by_lr.items():
            devs = [r.dev_score for r in runs if r.dev_score is not None]
            dev_by_lr[lr] = (statistics.fmean(devs) if devs else None, len(runs))

        def key(lr: float, dev_by_lr: dict[float, tuple[float | None, int]] = dev_by_lr) -> tuple:
            dev, n = dev_by_lr[lr]
            return (dev is not None, dev if dev is not None else 0.0, n, -lr)

        chosen = max(dev_by_lr, key=key)
        runs = sorted(by_lr[chosen], key=lambda r: r.seed)
        out[cell] = CellSelection(cell[0], cell[1], cell[2], dict(sorted(dev_by_lr.items())), chosen, runs)
    return out


@dataclass
class PairedTest:
    """COLA minus LoRA on the same seeds: mean difference, wins/losses/ties, paired t-test and sign test."""

    n: int
    mean_diff: float | None
    wins: int
    losses: int
    ties: int
    t_stat: float | None
    t_pvalue: float | None
    sign_pvalue: float | None


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired comparison of ``a`` (e.g. COLA) against ``b`` (LoRA), element i of each from the same seed.

    t-test: ``scipy.stats.ttest_rel(a, b)`` (two-sided; needs n ≥ 2 and non-constant differences).
    Sign test: exact two-sided binomial test of wins among non-tied pairs, ``binomtest(wins, wins+losses)``.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    ties = len(diffs) - wins - losses
    t_stat = t_p = None
    if len(diffs) >= 2 and len(set(diffs)) > 1:
        res = stats.ttest_rel(a, b)
        t_stat, t_p = float(res.statistic), float(res.pvalue)
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else None
    return PairedTest(
        n=len(diffs),
        mean_diff=statistics.fmean(diffs) if diffs else None,
        wins=wins,
        losses=losses,
        ties=ties,
        t_stat=t_stat,
        t_pvalue=t_p,
        sign_pvalue=sign_p,
    )


# ------------------------------------------------------------------------------------------------ labels


def variant_label(variant: Variant, show_rank: bool = True) -> str:
    """``LoRA (r=8)``, ``COLA (L=3, r=8)``, ``COLA (L=2, r=8→4)``, ``Full FT``."""
    method, length, ranks = variant
    if method == "full":
        return "Full FT"
    rank = ""
    if ranks and show_rank:
        rank = "r=" + "→".join(str(r) for r in ranks)
    if method == "lora":
        return f"LoRA ({rank})" if rank else "LoRA"
    parts = [f"L={length}"] + ([rank] if rank else [])
    return f"COLA ({', '.join(parts)})"


def variant_order(variant: Variant) -> tuple:
    method, length, ranks = variant
    return (
        METHOD_ORDER.get(method, 9),
        ranks[0] if ranks else 0,
        length or 0,
        tuple(-r for r in ranks or ()),
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
    """The LoRA variant a COLA variant is compared with: same first-link rank (or both unranked)."""
    method, _, ranks = variant
    if method != "cola":
        return None
    want = ranks[:1] if ranks else ranks
    for v in variants:
        if v[0] == "lora" and (v[2] or None) == (want or None):
            return v
    return None


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Cellstats:
    mean: float
    std: float | None
    n: int


class Report:
    """Builds the markdown and plots of one sweep (see the module docstring)."""

    def __init__(self, data: SweepData, *, percent: bool | None = None) -> None:
        self.data = data
        self.selected = select_learning_rates(data.results)
        scores = [r.test_score for r in data.results if r.test_score is not None]
        scores += [r.dev_score for r in data.results if r.dev_score is not None]
        self.scale = (
            100.0 if (percent if percent is not None else bool(scores) and max(scores) <= 1.0) else 1.0
        )
        self.tasks = _ordered_tasks(data)
        self.groups = sorted({c[2] for c in self.selected}, key=lambda g: (str(g[0]), str(g[1])))

    # -- numbers
    def stats(self, task: str, variant: Variant, group: Group) -> Cellstats | None:
        sel = self.selected.get((task, variant, group))
        if sel is None:
            return None
        scores = [s * self.scale for s in sel.test_scores().values()]
        if not scores:
            return None
        mean, std = mean_std(scores)
        return Cellstats(mean, std, len(scores))

    def zero_shot(self, task: str) -> Cellstats | None:
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
        return Cellstats(mean, std, len(by_seed))

    def variants(self, group: Group) -> list[Variant]:
        return sorted({c[1] for c in self.selected if c[2] == group}, key=variant_order)

    def _fmt(self, s: Cellstats | None, n_expected: int, bold: bool = False) -> str:
        if s is None:
            return "–"
        text = f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else "")
        if bold:
            text = f"**{text}**"
        if s.n != n_expected:
            text += f" (n={s.n})"
        return text

    def _expected_seeds(self) -> int:
        seeds = {r.seed for r in self.data.results}
        planned = {s.seed for s in self.data.planned}
        return len(planned or seeds)

    # -- tables
    def main_table(self, group: Group) -> str:
        """Rows methods, columns tasks (+ average over tasks present for every row); bold best per column."""
        variants = self.variants(group)
        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in variants)]
        n_exp = self._expected_seeds()
        show_rank = len({v[2][0] for v in variants if v[2]}) > 1 or any(
            v[2] and len(v[2]) > 1 for v in variants
        )
        cells = {(t, v): self.stats(t, v, group) for t in tasks for v in variants}
        best = {}
        for t in tasks:
            means = [cells[t, v].mean for v in variants if cells[t, v] is not None]
            best[t] = max(means) if means else None
        full_rows = [v for v in variants if all(cells[t, v] is not None for t in tasks)]
        avg = {v: statistics.fmean(cells[t, v].mean for t in tasks) for v in full_rows} if tasks else {}
        best_avg = max(avg.values()) if avg else None
        head = ["Method", *tasks] + (["Avg"] if len(tasks) > 1 else [])
        lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
        for v in variants:
            row = [variant_label(v, show_rank)]
            for t in tasks:
                c = cells[t, v]
                row.append(self._fmt(c, n_exp, bold=c is not None and _close(c.mean, best[t])))
            if len(tasks) > 1:
                a = avg.get(v)
                row.append("–" if a is None else (f"**{a:.2f}**" if _close(a, best_avg) else f"{a:.2f}"))
            lines.append(_row(row))
        zero = {t: self.zero_shot(t) for t in tasks}
        if any(zero.values()):
            row = ["0-shot (pretrained, no training)"]
            row += [self._fmt(zero[t], n_exp) for t in tasks]
            if len(tasks) > 1:
                row.append(
                    f"{statistics.fmean(z.mean for z in zero.values()):.2f}" if all(zero.values()) else "–"
                )
            lines.append(_row(row))
        for v in variants:
            base = lora_baseline(v, variants)
            if base is None:
                continue
            row = [f"gain of {variant_label(v, show_rank)} over {variant_label(base, show_rank)}"]
            for t in tasks:
                c, b = cells[t, v], cells[t, base]
                row.append(f"{100 * (c.mean - b.mean) / b.mean:+.2f}%" if c and b and b.mean else "–")
            if len(tasks) > 1:
                row.append(
                    f"{100 * (avg[v] - avg[base]) / avg[base]:+.2f}%" if v in avg and base in avg else "–"
                )
            lines.append(_row(row))
        return "\n".join(lines)

    def chain_length_series(self, group: Group) -> dict[tuple[int, ...] | None, list[Variant]]:
        """Per first-link rank, the single-rank chain variants (LoRA = length 1), when ≥ 2 lengths exist."""
        by_rank: dict[tuple[int, ...] | None, list[Variant]] = defaultdict(list)
        for v in self.variants(group):
            if v[0] in ("lora", "cola") and not (v[2] and len(v[2]) > 1):
                by_rank[v[2]].append(v)
        return {
            r: sorted(vs, key=lambda v: v[1] or 0) for r, vs in by_rank.items() if len({v[1] for v in vs}) > 1
        }

    def chain_length_table(self, group: Group, variants: list[Variant]) -> str:
        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in variants)]
        n_exp = self._expected_seeds()
        head = ["Task", *(f"L={v[1]}" + (" (LoRA)" if v[0] == "lora" else "") for v in variants)]
        lines = [_row(head), _row(["---"] + ["---:"] * len(variants))]
        for t in tasks:
            cells = [self.stats(t, v, group) for v in variants]
            means = [c.mean for c in cells if c is not None]
            best = max(means) if means else None
            lines.append(
                _row([t] + [self._fmt(c, n_exp, bold=c is not None and _close(c.mean, best)) for c in cells])
            )
        return "\n".join(lines)

    def stepdown_variants(self, group: Group) -> list[Variant]:
        return [v for v in self.variants(group) if v[0] == "cola" and v[2] and len(v[2]) > 1]

    def flops(self, task: str, variant: Variant, group: Group) -> float | None:
        sel = self.selected.get((task, variant, group))
        vals = [r.train_flops for r in sel.runs if r.train_flops] if sel else []
        return statistics.fmean(vals) if vals else None

    def stepdown_table(self, group: Group) -> str:
        steps = self.stepdown_variants(group)
        variants = self.variants(group)
        rows = sorted({b for v in steps if (b := lora_baseline(v, variants))} | set(steps), key=variant_order)
        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in rows)]
        n_exp = self._expected_seeds()
        head = ["Method", *(f"{t} score" for t in tasks), *(f"{t} FLOPs saved" for t in tasks)]
        lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
        for v in rows:
            base = lora_baseline(v, variants)
            row = [variant_label(v)]
            row += [self._fmt(self.stats(t, v, group), n_exp) for t in tasks]
            for t in tasks:
                f, fb = self.flops(t, v, group), self.flops(t, base, group) if base else None
                if v[0] == "lora":
                    row.append("0% (reference)")
                else:
                    row.append(f"{100 * (1 - f / fb):.1f}%" if f and fb else "–")
            lines.append(_row(row))
        return "\n".join(lines)

    def paired(self, group: Group) -> list[tuple[Variant, Variant, dict[str, PairedTest]]]:
        """For each COLA variant with a LoRA baseline: a paired test per task and over all (task, seed) pairs."""
        out = []
        variants = self.variants(group)
        for v in variants:
            base = lora_baseline(v, variants)
            if base is None:
                continue
            per: dict[str, PairedTest] = {}
            all_a: list[float] = []
            all_b: list[float] = []
            for t in self.tasks:
                sa, sb = self.selected.get((t, v, group)), self.selected.get((t, base, group))
                if sa is None or sb is None:
                    continue
                ta, tb = sa.test_scores(), sb.test_scores()
                seeds = sorted(set(ta) & set(tb))
                if not seeds:
                    continue
                a = [ta[s] * self.scale for s in seeds]
                b = [tb[s] * self.scale for s in seeds]
                per[t] = paired_test(a, b)
                all_a += a
                all_b += b
            if per:
                per["all tasks (pooled pairs)"] = paired_test(all_a, all_b)
                out.append((v, base, per))
        return out

    def paired_table(self, group: Group) -> str:
        blocks = []
        for v, base, per in self.paired(group):
            lines = [
                f"**{variant_label(v)} − {variant_label(base)}** (test score points, same seeds = same data)",
                "",
                _row(
                    ["Task", "pairs", "mean diff", "wins/losses/ties", "paired t", "t-test p", "sign-test p"]
                ),
                _row(["---", "---:", "---:", "---:", "---:", "---:", "---:"]),
            ]
            for t, p in per.items():
                lines.append(
                    _row(
                        [
                            t,
                            str(p.n),
                            _num(p.mean_diff, "+.2f"),
                            f"{p.wins}/{p.losses}/{p.ties}",
                            _num(p.t_stat, ".2f"),
                            _num(p.t_pvalue, ".3f"),
                            _num(p.sign_pvalue, ".3f"),
                        ]
                    )
                )
            early, total = self.tested_before_first_knot(v, group)
            if total:
                lines += [
                    "",
                    f"{early} of {total} {variant_label(v)} runs were tested at a state from before their first "
                    "knot (checkpoint selection picked an early epoch): a single trained link, the very state "
                    "of the LoRA run with the same seeds, so such a pair differs only through the epoch chosen.",
                ]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def tested_before_first_knot(self, variant: Variant, group: Group) -> tuple[int, int]:
        """How many of a COLA variant's chosen runs were tested at a step ≤ their first knot, out of how many."""
        early = total = 0
        for (_, v, g), sel in self.selected.items():
            if v != variant or g != group:
                continue
            for r in sel.runs:
                knots = [k.get("step") for k in r.metrics.get("knots") or [] if isinstance(k, dict)]
                step = r.metrics.get("selected_step")
                if knots and knots[0] is not None and step is not None:
                    total += 1
                    early += int(step <= knots[0])
        return early, total

    def lr_table(self) -> str:
        lines = [
            _row(["Task", "Method", "Group", "LR: mean dev score (seeds)", "chosen LR"]),
            _row(["---", "---", "---", "---", "---:"]),
        ]
        for (task, variant, group), sel in sorted(
            self.selected.items(),
            key=lambda kv: (self.tasks.index(kv[0][0]), str(kv[0][2]), variant_order(kv[0][1])),
        ):
            tried = "; ".join(
                f"{format_number(lr)}: {_num(None if d is None else d * self.scale, '.2f')} ({n})"
                for lr, (d, n) in sel.dev_by_lr.items()
            )
            lines.append(
                _row([task, variant_label(variant), group_label(group), tried, format_number(sel.chosen_lr)])
            )
        return "\n".join(lines)

    def runs_table(self) -> str:
        lines = [
            _row(
                [
                    "Run",
                    "dev",
                    "test",
                    "tested step / steps",
                    "train s",
                    "train FLOPs",
                    "knots (step: link→rank)",
                ]
            ),
            _row(["---", "---:", "---:", "---:", "---:", "---:", "---"]),
        ]
        for r in sorted(self.data.results, key=lambda r: r.name):
            knots = r.metrics.get("knots") or []
            ktext = ", ".join(
                f"{k.get('step')}: {k.get('link')}→r{k.get('next_rank')}"
                for k in knots
                if isinstance(k, dict)
            )
            lines.append(
                _row(
                    [
                        f"`{r.name}`",
                        _num(None if r.dev_score is None else r.dev_score * self.scale, ".2f"),
                        _num(None if r.test_score is None else r.test_score * self.scale, ".2f"),
                        f"{r.metrics.get('selected_step', '–')} / {r.metrics.get('train_steps', '–')}",
                        _num(r.train_seconds, ".0f"),
                        _num(r.train_flops, ".3g"),
                        ktext or "–",
                    ]
                )
            )
        return "\n".join(lines)

    # -- plots
    def plot_chain_length(self, group: Group, variants: list[Variant], path: Path) -> Path:
        """Test score against chain length, one panel per task: mean line, ±1 sd band, each seed as a dot."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in variants)]
        cols = min(4, len(tasks)) or 1
        rows = math.ceil(len(tasks) / cols) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=120, squeeze=False)
        try:
            for ax, t in zip(axes.flat, tasks, strict=False):
                xs, means, lo, hi = [], [], [], []
                for v in variants:
                    sel = self.selected.get((t, v, group))
                    scores = [s * self.scale for s in sel.test_scores().values()] if sel else []
                    if not scores:
                        continue
                    m, sd = mean_std(scores)
                    xs.append(v[1])
                    means.append(m)
                    lo.append(m - (sd or 0.0))
                    hi.append(m + (sd or 0.0))
                    ax.scatter([v[1]] * len(scores), scores, s=10, color="gray", alpha=0.6, zorder=3)
                ax.plot(xs, means, "o-", color="tab:blue", lw=1.5, zorder=4)
                ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, lw=0)
                ax.set_title(t, fontsize=10)
                ax.set_xticks(xs)
                ax.set_xlabel("chain length (1 = LoRA)", fontsize=8)
                ax.set_ylabel("test score", fontsize=8)
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(tasks) :]:
                ax.axis("off")
            fig.suptitle(
                f"Test score vs chain length (mean ± 1 sd over seeds; {group_label(group)})", fontsize=9
            )
            fig.tight_layout()
            _savefig(fig, path)
        finally:
            plt.close(fig)
        return path

    def plot_main(self, group: Group, path: Path) -> Path:
        """Grouped bars: test score per task and method, error bars ±1 sd."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        variants = self.variants(group)
        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in variants)]
        width = 0.8 / max(1, len(variants))
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(tasks) + 2), 4.0), dpi=120)
        try:
            for i, v in enumerate(variants):
                xs, ms, sds = [], [], []
                for j, t in enumerate(tasks):
                    s = self.stats(t, v, group)
                    if s is not None:
                        xs.append(j + (i - (len(variants) - 1) / 2) * width)
                        ms.append(s.mean)
                        sds.append(s.std or 0.0)
                ax.bar(xs, ms, width, yerr=sds, capsize=2, label=variant_label(v))
            ax.set_xticks(range(len(tasks)))
            ax.set_xticklabels(tasks)
            ax.set_xlim(-0.6, len(tasks) - 0.4)
            ax.set_ylabel("test score (mean ± 1 sd)")
            lows = [s.mean - (s.std or 0) for t in tasks for v in variants if (s := self.stats(t, v, group))]
            if lows:
                ax.set_ylim(max(0.0, min(lows) - 5), None)
            ax.legend(fontsize=7, ncol=min(4, len(variants)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
            ax.grid(axis="y", alpha=0.3)
            ax.set_title(f"Test score by method ({group_label(group)})", fontsize=9)
            fig.tight_layout()
            _savefig(fig, path)
        finally:
            plt.close(fig)
        return path

    def plot_stepdown(self, group: Group, path: Path) -> Path:
        """Left: score per rank schedule and task; right: train FLOPs saved vs LoRA of the same first rank."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self.stepdown_variants(group)
        variants = self.variants(group)
        rows = sorted({b for v in steps if (b := lora_baseline(v, variants))} | set(steps), key=variant_order)
        tasks = [t for t in self.tasks if any((t, v, group) in self.selected for v in rows)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
        try:
            width = 0.8 / max(1, len(tasks))
            labels = [variant_label(v) for v in rows]
            for j, t in enumerate(tasks):
                xs, ms, sds, saved_x, saved = [], [], [], [], []
                for i, v in enumerate(rows):
                    s = self.stats(t, v, group)
                    x = i + (j - (len(tasks) - 1) / 2) * width
                    if s is not None:
                        xs.append(x)
                        ms.append(s.mean)
                        sds.append(s.std or 0.0)
                    base = lora_baseline(v, variants)
                    f, fb = self.flops(t, v, group), self.flops(t, base, group) if base else None
                    if f and fb:
                        saved_x.append(x)
                        saved.append(100 * (1 - f / fb))
                ax1.bar(xs, ms, width, yerr=sds, capsize=2, label=t)
                ax2.bar(saved_x, saved, width, label=t)
            for ax in (ax1, ax2):
                ax.set_xticks(range(len(rows)))
                ax.set_xticklabels(labels, fontsize=7, rotation=20)
                ax.grid(axis="y", alpha=0.3)
                ax.legend(fontsize=7)
            ax1.set_ylabel("test score (mean ± 1 sd)")
            ax2.set_ylabel("train FLOPs saved vs LoRA (%)")
            fig.suptitle(f"Rank step-down ({group_label(group)})", fontsize=9)
            fig.tight_layout()
            _savefig(fig, path)
        finally:
            plt.close(fig)
        return path

    # -- the document
    def markdown(self, plots_dir: Path, relative_to: Path) -> str:
        """The whole report; writes its plots into ``plots_dir`` and links them relative to ``relative_to``."""
        d = self.data
        out: list[str] = [f"# Sweep report: `{d.root}`", ""]
        out += self._summary_lines()
        multi = len(self.groups) > 1
        for group in self.groups:
            suffix = f"-{group_slug(group)}" if multi else ""
            title = f" ({group_label(group)})" if multi else ""
            out += [f"## Main table{title}", ""]
            out += [
                "Test score, mean ± sd over seeds (sd with ddof = 1; `(n=k)` marks a cell with fewer seeds than "
                "planned), at each cell's chosen learning rate; bold = best mean in the column. The gain rows "
                "are relative: (COLA − LoRA) / LoRA.",
                "",
                self.main_table(group),
                "",
            ]
            img = self.plot_main(group, plots_dir / f"main{suffix}.png")
            out += [f"![test score by method]({_rel(img, relative_to)})", ""]
            for ranks, variants in self.chain_length_series(group).items():
                rs = f"-r{'-'.join(map(str, ranks))}" if ranks else ""
                out += [f"## Chain length{title}" + (f", r = {ranks[0]}" if ranks else ""), ""]
                out += [self.chain_length_table(group, variants), ""]
                img = self.plot_chain_length(group, variants, plots_dir / f"chain_length{suffix}{rs}.png")
                out += [f"![test score vs chain length]({_rel(img, relative_to)})", ""]
            if self.stepdown_variants(group):
                out += [f"## Rank step-down{title}", ""]
                out += [
                    "Training FLOPs are the train recipe's analytic count (`train_flops` in metrics.json), "
                    "mean over the seeds of the chosen LR; saved = 1 − COLA / LoRA of the same first rank.",
                    "",
                    self.stepdown_table(group),
                    "",
                ]
                img = self.plot_stepdown(group, plots_dir / f"rank_stepdown{suffix}.png")
                out += [f"![rank step-down]({_rel(img, relative_to)})", ""]
            paired = self.paired_table(group)
            if paired:
                out += [f"## Paired comparison, COLA vs LoRA{title}", ""]
                out += [
                    "Each seed draws the same train/dev/test rows for every method, so runs of one seed are "
                    "paired. Two-sided paired t-test (`scipy.stats.ttest_rel`) and exact sign test "
                    "(`scipy.stats.binomtest`, ties dropped). The pooled row treats every (task, seed) pair as "
                    "one observation. With few seeds these tests have little power: a p-value above 0.05 means "
                    "'not shown', not 'no effect'.",
                    "",
                    paired,
                    "",
                ]
        out += ["## Learning-rate selection", ""]
        out += [
            "Rule: per cell (task × method × chain length × ranks × optimizer × extra axes), the learning rate "
            "with the highest mean **dev** score over its seeds; the test score never takes part.",
            "",
            self.lr_table(),
            "",
        ]
        out += [
            "## All finished runs",
            "",
            "<details><summary>per-run scores</summary>",
            "",
            self.runs_table(),
        ]
        out += ["", "</details>", ""]
        return "\n".join(out)

    def _summary_lines(self) -> list[str]:
        d = self.data
        lines = []
        base = d.plan.get("base") or (d.results[0].config if d.results else {})
        if d.plan.get("source"):
            lines.append(f"- sweep config: `{d.plan['source']}`")
        keys = (
            "model",
            "num_train",
            "num_dev",
            "num_eval",
            "max_length",
            "epochs",
            "batch_size",
            "precision",
        )
        settings = ", ".join(f"{k} = {base[k]}" for k in keys if k in base)
        if settings:
            lines.append(f"- base settings: {settings}")
        selections = sorted({str(r.config.get("selection")) for r in d.results if r.config.get("selection")})
        if selections:
            lines.append(
                f"- checkpoint selection within a run: {', '.join(selections)} (the train recipe's `selection`)"
            )
        if self.selected and all(len(sel.dev_by_lr) == 1 for sel in self.selected.values()):
            lines.append("- learning rate: one per method (no grid), so there was no learning-rate choice")
        else:
            lines.append(
                "- learning-rate selection per cell: highest mean dev score over seeds (test not used)"
            )
        n_plan = len(d.planned) or len(d.results)
        lines.append(
            f"- runs: {len(d.results)} finished of {n_plan} planned, {len(d.failed)} failed, "
            f"{len(d.missing) - len(d.failed)} not yet run"
        )
        secs = [r.train_seconds for r in d.results if r.train_seconds]
        if secs:
            lines.append(
                f"- total train time over finished runs: {sum(secs) / 60:.1f} min (sum of `train_seconds`)"
            )
        invocations = d.state.get("invocations", [])
        walls = [i.get("wall_seconds") for i in invocations if i.get("wall_seconds")]
        running = sum(1 for i in invocations if "ended" not in i)
        if walls:
            lines.append(
                f"- sweep wall time: {sum(walls) / 60:.1f} min over {len(walls)} finished invocation(s) of "
                "`chainlora sweep`" + (f" ({running} more still running or killed)" if running else "")
            )
        if self.scale != 1.0:
            lines.append("- scores shown ×100 (metrics.json holds fractions)")
        for name, entry in sorted(d.failed.items()):
            lines.append(f"- FAILED `{name}`: {entry.get('error')} (log `{entry.get('log')}`)")
        missing = [s.name for s in d.missing if s.name not in d.failed]
        if missing:
            shown = ", ".join(f"`{m}`" for m in missing[:10])
            lines.append(f"- not yet run ({len(missing)}): {shown}" + (" …" if len(missing) > 10 else ""))
        return [*lines, ""]


def _ordered_tasks(data: SweepData) -> list[str]:
    order: list[str] = []
    for s in data.planned or []:
        if s.task not in order:
            order.append(s.task)
    for r in data.results:
        if r.task not in order:
            order.append(r.task)
    return order


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-9


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(
    sweep_dir: str | Path,
    output: str | Path | None = None,
    plots_dir: str | Path | None = None,
    *,
    percent: bool | None = None,
) -> Path:
    """Write the markdown report (default ``<sweep_dir>/report.md``) and its plots (default
    ``<sweep_dir>/plots``); return the report's path."""
    data = load_sweep(sweep_dir)
    output = Path(output) if output else Path(sweep_dir) / "report.md"
    plots = Path(plots_dir) if plots_dir else Path(sweep_dir) / "plots"
    report = Report(data, percent=percent)
    text = report.markdown(plots, output.parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    return output


@dataclass
class ReportArgs:
    """chainlora report SWEEP_DIR: the sweep's tables in the paper's layout (mean ± sd over seeds, gain of
    COLA over LoRA, bold best), chain-length and rank step-down tables and plots, paired tests, LR choices."""

    sweep_dir: str
    """The sweep's output folder (holds sweep_plan.json and the run folders). Also the first positional."""
    output: str | None = None
    """The markdown file (default: SWEEP_DIR/report.md)."""
    plots_dir: str | None = None
    """Where the PNG plots go (default: SWEEP_DIR/plots)."""
    percent: bool | None = None
    """Show scores x100 (default: when every score is a fraction in [0, 1])."""


def report_command(
    sweep_dir: str, output: str | None = None, plots_dir: str | None = None, percent: bool | None = None
) -> int:
    """Write the report of ``sweep_dir`` (see :class:`ReportArgs`) and print its path."""
    path = write_report(sweep_dir, output, plots_dir, percent=percent)
    print(f"report: {path}")
    return 0


def report_main(argv: list[str]) -> int:
    """``chainlora report SWEEP_DIR [--output FILE] [--plots_dir DIR]`` (argv without the subcommand)."""
    from chainlora.cli import parse_config

    if argv and not argv[0].startswith("-"):
        argv = ["--sweep_dir", argv[0], *argv[1:]]
    args = parse_config(ReportArgs, argv, prog="chainlora report")
    return report_command(args.sweep_dir, args.output, args.plots_dir, args.percent)


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(report_main(sys.argv[1:]))
