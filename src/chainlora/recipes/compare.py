"""``chainlora compare``: does COLA help on *my* data? The same budget for every method on paired seeds, through
``chainlora sweep``, then the paired differences and one plain verdict.

    compare(CompareConfig(data=DataSpec(path="chat.jsonl"), seeds=5))
        → runs/compare-chat/<data>/<method>/.../seed<s>/   one chainlora train run per method and seed (a sweep:
                                                           resumable, parallel workers)
        → compare.json, compare.md, compare.png            per metric and method: mean ± sd; per other method:
                                                           the paired difference with the baseline (95% CI,
                                                           paired t-test p, wins/losses/ties); the verdict line

Seed s gives every method the same data split, the same dev/test rows and the same LoRA initialisation, so the
runs pair up; the difference of a pair is one observation of what the method changes. The verdict calls a
difference *distinguishable* only when its 95% confidence interval excludes 0.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainlora import rundir
from chainlora.config import CompareConfig, SweepOptions
from chainlora.errors import ConfigError
from chainlora.io import atomic_path, write_json_atomic
from chainlora.recipes.grid import RunSpec, SweepConfig
from chainlora.recipes.stats import PairedDifference, paired_difference
from chainlora.recipes.sweep import SweepInterrupted, run_sweep
from chainlora.recipes.workload import HIGHER_IS_BETTER, load_workload

METHOD_LABELS = {"lora": "LoRA", "cola": "COLA", "full": "full FT"}
PERCENT_METRICS = ("accuracy", "f1", "em")  # reported in points (×100)
DEFAULT_TEST_FRACTION = 0.2  # held out as the test set when the data has no test file and num_eval is unset
COMPARE_FILES = ("compare.json", "compare.md", "compare.png")


@dataclass
class MethodRuns:
    """One method's finished runs: seed → test metrics (``metrics.json``'s ``test_metrics``)."""

    method: str
    label: str
    by_seed: dict[int, dict[str, float]] = field(default_factory=dict)

    def values(self, metric: str, seeds: Sequence[int]) -> list[float]:
        return [self.by_seed[s][metric] for s in seeds]


@dataclass
class Comparison:
    """``method − baseline`` on one metric over the seeds both finished."""

    method: str
    baseline: str
    metric: str
    seeds: list[int]
    difference: PairedDifference
    scale: float  # 100 for accuracy-like metrics (points), else 1

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER.get(self.metric.removeprefix("test_"), True)

    def verdict(self) -> str:
        """``COLA − LoRA = +1.2 f1 points (95% CI −0.4..2.8, 5 seeds, p = 0.21): not distinguishable``."""
        d, s = self.difference, self.scale
        unit = " points" if s == 100 else ""
        head = f"{METHOD_LABELS.get(self.method, self.method)} − {METHOD_LABELS.get(self.baseline, self.baseline)}"
        text = f"{head} = {d.mean * s:+.{_digits(s)}f} {self.metric}{unit}"
        if d.low is None or d.high is None:
            return f"{text} ({d.n} seed): one seed cannot tell; run more seeds (--seeds 5)"
        p = f", p = {d.pvalue:.2g}" if d.pvalue is not None else ""
        text += f" (95% CI {d.low * s:+.{_digits(s)}f}..{d.high * s:+.{_digits(s)}f}, {d.n} seeds{p})"
        if d.low <= 0 <= d.high:
            return f"{text}: not distinguishable"
        better = (d.mean > 0) == self.higher_is_better
        winner = self.method if better else self.baseline
        return f"{text}: {METHOD_LABELS.get(winner, winner)} is better here"

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "method": self.method,
            "baseline": self.baseline,
            "metric": self.metric,
            "seeds": self.seeds,
            "mean_difference": d.mean,
            "ci95": [d.low, d.high],
            "pvalue": d.pvalue,
            "sd_difference": d.sd,
            "wins": d.wins,
            "losses": d.losses,
            "ties": d.ties,
            "higher_is_better": self.higher_is_better,
            "verdict": self.verdict(),
        }


def _digits(scale: float) -> int:
    return 1 if scale == 100 else 4


def compare_grid(config: CompareConfig) -> SweepConfig:
    """The sweep of a comparison: ``methods`` × seeds 0..N-1 over the same train fields (``lrs`` per method)."""
    base = config.train_fields()
    base.pop("method")
    base["chain"] = {**base["chain"], "length": None}  # set per method by the grid (COLA's) and normalised
    length = config.chain.length if "cola" in config.methods else None
    lr: Any = {"default": [config.lr], **{m: [lr] for m, lr in config.lrs.items()}}
    grid: dict[str, Any] = {"method": list(config.methods), "seed": list(range(config.seeds)), "lr": lr}
    if length is not None:
        grid["chain.length"] = [length]
    options = SweepOptions(
        output_dir=str(compare_dir(config)),
        workers=config.workers,
        devices=config.devices,
        report=False,
        vary_train_seed=True,
    )
    return SweepConfig(base=base, grid=grid, options=options, source="chainlora compare")


def compare_dir(config: CompareConfig) -> Path:
    return Path(config.output_dir or f"runs/compare-{config.workload_name}")


def collect(root: Path, runs: Sequence[RunSpec]) -> dict[str, MethodRuns]:
    """The finished runs of the comparison in ``root``, by method (a run without ``metrics.json`` is absent)."""
    out: dict[str, MethodRuns] = {}
    for spec in runs:
        method = out.setdefault(
            spec.method, MethodRuns(spec.method, METHOD_LABELS.get(spec.method, spec.method))
        )
        path = root / spec.name / rundir.METRICS_FILE
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        numbers = {
            f"test_{k}": float(v) for k, v in (metrics.get("test_metrics") or {}).items() if k != "score"
        }  # "score" is the metric's alias
        if metrics.get("metric") and metrics.get("test_score") is not None:
            numbers.setdefault(f"test_{metrics['metric']}", float(metrics["test_score"]))
        zero_shot = metrics.get("zero_shot_test_metrics") or {}
        numbers |= {f"zero_shot_{k}": float(v) for k, v in zero_shot.items() if k != "score"}
        method.by_seed[spec.seed] = {k: v for k, v in numbers.items() if math.isfinite(v)}
    return out


def compare_methods(
    by_method: dict[str, MethodRuns], baseline: str, primary: str
) -> tuple[list[Comparison], list[str]]:
    """Every other method against ``baseline`` on every test metric both have, over their common seeds; the
    metrics, ``primary`` (the workload's score) first."""
    base = by_method[baseline]
    comparisons: list[Comparison] = []
    metrics: list[str] = []
    for method, runs in by_method.items():
        if method == baseline:
            continue
        seeds = sorted(set(base.by_seed) & set(runs.by_seed))
        if not seeds:
            continue
        names = set.intersection(*(set(base.by_seed[s]) & set(runs.by_seed[s]) for s in seeds))
        names = {n for n in names if n.startswith("test_")}
        ordered = sorted(names, key=lambda n: (n != f"test_{primary}", n))
        metrics += [n for n in ordered if n not in metrics]
        for name in ordered:
            scale = 100.0 if name.removeprefix("test_") in PERCENT_METRICS else 1.0
            difference = paired_difference(runs.values(name, seeds), base.values(name, seeds))
            comparisons.append(
                Comparison(method, baseline, name.removeprefix("test_"), seeds, difference, scale)
            )
    return comparisons, metrics


def compare_markdown(
    config: CompareConfig, by_method: dict[str, MethodRuns], comparisons: list[Comparison], metrics: list[str]
) -> str:
    lines = [
        f"# chainlora compare: {config.workload_name}",
        "",
        f"{config.model}, {', '.join(METHOD_LABELS.get(m, m) for m in config.methods)}; {config.seeds} paired "
        f"seeds; {config.epochs} epoch(s), batch {config.batch_size}, lr {config.lr:g}"
        + (f" ({', '.join(f'{m}: {v:g}' for m, v in config.lrs.items())})" if config.lrs else "")
        + (f", COLA chain length {config.chain.length}" if "cola" in config.methods else ""),
        "",
        "| method | seeds | " + " | ".join(m.removeprefix("test_") for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for runs in by_method.values():
        cells = []
        for name in metrics:
            values = [r[name] for r in runs.by_seed.values() if name in r]
            scale = 100.0 if name.removeprefix("test_") in PERCENT_METRICS else 1.0
            if not values:
                cells.append("–")
                continue
            mean = statistics.fmean(values) * scale
            sd = statistics.stdev(values) * scale if len(values) > 1 else None
            cells.append(
                f"{mean:.{_digits(scale)}f}" + (f" ± {sd:.{_digits(scale)}f}" if sd is not None else "")
            )
        lines.append(f"| {runs.label} | {len(runs.by_seed)} | " + " | ".join(cells) + " |")
    zero_shot = [
        [r[name] for r in runs.by_seed.values() if name in r]
        for runs in by_method.values()
        for name in [m.replace("test_", "zero_shot_", 1) for m in metrics]
    ][: len(metrics)]  # the base model's scores: the same for every method of a seed
    if any(zero_shot):
        cells = []
        for name, values in zip(metrics, zero_shot, strict=True):
            scale = 100.0 if name.removeprefix("test_") in PERCENT_METRICS else 1.0
            cells.append(f"{statistics.fmean(values) * scale:.{_digits(scale)}f}" if values else "–")
        seeds = len(next(iter(by_method.values())).by_seed)
        lines.append(f"| 0-shot (the base model) | {seeds} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences (method − baseline, same seeds; 95% CI by Student's t; paired t-test):",
        "",
    ]
    lines += ["| comparison | metric | mean | 95% CI | p | wins/losses/ties |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        d, s = c.difference, c.scale
        ci = f"{d.low * s:+.{_digits(s)}f}..{d.high * s:+.{_digits(s)}f}" if d.low is not None else "–"
        p = f"{d.pvalue:.3g}" if d.pvalue is not None else "–"
        label = f"{METHOD_LABELS.get(c.method, c.method)} − {METHOD_LABELS.get(c.baseline, c.baseline)}"
        lines.append(
            f"| {label} | {c.metric} | {d.mean * s:+.{_digits(s)}f} | {ci} | {p} | {d.wins}/{d.losses}/{d.ties} |"
        )
    lines += ["", *(f"**{c.verdict()}**" for c in _primary(comparisons)), ""]
    return "\n".join(lines)


def _primary(comparisons: list[Comparison]) -> list[Comparison]:
    """The first metric of each compared method (the workload's score)."""
    seen: set[str] = set()
    out = []
    for c in comparisons:
        if c.method not in seen:
            seen.add(c.method)
            out.append(c)
    return out


def plot_comparison(by_method: dict[str, MethodRuns], metric: str, path: Path) -> Path:
    """Each seed's test score per method, the seeds' pairs joined by lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.8 + 1.4 * len(by_method), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(by_method.values())
    seeds = sorted(set().union(*(r.by_seed for r in methods)))
    for seed in seeds:
        xs = [i for i, r in enumerate(methods) if metric in r.by_seed.get(seed, {})]
        ys = [methods[i].by_seed[seed][metric] for i in xs]
        ax.plot(xs, ys, marker="o", color="0.55", linewidth=1)
    for i, runs in enumerate(methods):
        values = [r[metric] for r in runs.by_seed.values() if metric in r]
        if values:
            ax.plot([i - 0.2, i + 0.2], [statistics.fmean(values)] * 2, color="C3", linewidth=2.5)
    ax.set_xticks(range(len(methods)), [r.label for r in methods])
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("per seed (grey), mean (red)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def compare(config: CompareConfig, *, echo: Any = print) -> dict[str, Any]:
    """Run (or continue) the comparison and write its report; returns what ``compare.json`` holds."""
    for method in config.methods:  # every method's config is valid before any run starts
        config.for_method(method)
    workload = load_workload(config.for_method(config.baseline))
    if (
        not workload.test
    ):  # one file, no num_eval: hold out a test set, drawn per seed (the same for each method)
        config.num_eval = max(1, round(DEFAULT_TEST_FRACTION * (len(workload.train) + len(workload.dev))))
        echo(
            f"compare: no test file: {config.num_eval} rows held out as the test set of each seed (--num_eval)"
        )
        workload = load_workload(config.for_method(config.baseline))
    sweep = compare_grid(config)
    root = Path(sweep.options.output_dir)
    echo(f"compare: {workload.name}: {', '.join(config.methods)} × {config.seeds} seed(s) -> {root}")
    summary = run_sweep(sweep, echo=echo)
    by_method = collect(root, sweep.runs())
    if not any(r.by_seed for r in by_method.values()):
        raise ConfigError(f"compare: no run finished (see the logs in {root / rundir.SWEEP_LOG_DIR})")
    comparisons, metrics = compare_methods(by_method, config.baseline, workload.metric)
    result = {
        "workload": workload.name,
        "model": config.model,
        "methods": config.methods,
        "baseline": config.baseline,
        "seeds": config.seeds,
        "finished": {m: sorted(r.by_seed) for m, r in by_method.items()},
        "failed": summary.count("failed"),
        "per_seed": {m: {str(s): v for s, v in r.by_seed.items()} for m, r in by_method.items()},
        "comparisons": [c.to_dict() for c in comparisons],
    }
    write_json_atomic(root / "compare.json", result)
    with atomic_path(root / "compare.md") as tmp:
        tmp.write_text(compare_markdown(config, by_method, comparisons, metrics))
    if metrics:
        plot_comparison(by_method, metrics[0], root / "compare.png")
    for c in _primary(comparisons):
        echo(c.verdict())
    echo(f"report: {root / 'compare.md'}")
    return result


def compare_command(config: CompareConfig) -> int:
    """``chainlora compare``: 0 when every run finished, 1 when some failed (run again to retry them), 130 when
    interrupted."""
    try:
        result = compare(config)
    except SweepInterrupted:
        return 130
    return 1 if result["failed"] else 0
