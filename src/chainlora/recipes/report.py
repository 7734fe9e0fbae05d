"""``chainlora report``: tables, plots and paired tests from a sweep's finished runs, in the COLA paper's layout.

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
* **End of the budget**: COLA against LoRA at the same learning rate and seed at their last step, whatever the
  checkpoint selection picked: last-epoch training loss, dev loss and dev score (``metrics.json``'s
  ``train_loss`` and ``dev_history``).

The numbers come from ``chainlora.recipes.results`` (each cell's learning rate chosen on dev, never on test;
the rule is stated in the report), the statistics from ``recipes.stats``, the plots from ``recipes.plots``. This
module writes the tables (plain functions of a :class:`~chainlora.recipes.results.SweepResults`) and the
markdown.

Scores in ``metrics.json`` in [0, 1] are shown as percentages (×100), like the paper's tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from chainlora import rundir
from chainlora.config import ReportConfig
from chainlora.io import atomic_path
from chainlora.recipes.grid import format_number
from chainlora.recipes.plots import plot_chain_length, plot_main, plot_stepdown
from chainlora.recipes.results import (
    CellStats,
    Group,
    SweepResults,
    Variant,
    group_label,
    group_slug,
    load_sweep,
    lora_baseline,
    variant_label,
    variant_order,
)
from chainlora.recipes.stats import (
    PairedDifference,
    paired_difference,
    seeds_for_power,
)


def _fmt(s: CellStats | None, n_expected: int, bold: bool = False) -> str:
    if s is None:
        return "–"
    text = f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else "")
    if bold:
        text = f"**{text}**"
    if s.n != n_expected:
        text += f" (n={s.n})"
    return text + (f" {PROVISIONAL}" if s.provisional else "")


PROVISIONAL = "†"  # marks a cell whose learning rate is chosen from an unfinished grid


def main_table(results: SweepResults, group: Group) -> str:
    """Rows methods, columns tasks (+ average over tasks present for every row); bold best per column."""
    variants = results.variants(group)
    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in variants)]
    n_exp = results.expected_seeds()
    show_rank = len({v[2][0] for v in variants if v[2]}) > 1 or any(v[2] and len(v[2]) > 1 for v in variants)
    cells = {(t, v): results.stats(t, v, group) for t in tasks for v in variants}
    best = {}
    for t in tasks:
        means = [cells[t, v].mean for v in variants if cells[t, v] is not None]
        best[t] = max(means) if means else None
    full_rows = [v for v in variants if all(cells[t, v] is not None for t in tasks)]
    avg = {v: statistics.fmean(cells[t, v].mean for t in tasks) for v in full_rows} if tasks else {}
    best_avg = max(avg.values()) if avg else None
    unsettled = {v: any(cells[t, v].provisional for t in tasks) for v in full_rows}  # averages over a † cell
    head = ["Method", *tasks] + (["Avg"] if len(tasks) > 1 else [])
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for v in variants:
        row = [variant_label(v, show_rank)]
        for t in tasks:
            c = cells[t, v]
            row.append(_fmt(c, n_exp, bold=c is not None and _close(c.mean, best[t])))
        if len(tasks) > 1:
            a = avg.get(v)
            text = "–" if a is None else (f"**{a:.2f}**" if _close(a, best_avg) else f"{a:.2f}")
            row.append(text + (f" {PROVISIONAL}" if unsettled.get(v) else ""))
        lines.append(_row(row))
    zero = {t: results.zero_shot(t) for t in tasks}
    if any(zero.values()):
        row = ["0-shot (pretrained, no training)"]
        row += [_fmt(zero[t], n_exp) for t in tasks]
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
            mark = f" {PROVISIONAL}" if c and b and (c.provisional or b.provisional) else ""
            row.append(f"{100 * (c.mean - b.mean) / b.mean:+.2f}%{mark}" if c and b and b.mean else "–")
        if len(tasks) > 1:
            if v in avg and base in avg:
                mark = f" {PROVISIONAL}" if unsettled[v] or unsettled[base] else ""
                row.append(f"{100 * (avg[v] - avg[base]) / avg[base]:+.2f}%{mark}")
            else:
                row.append("–")
        lines.append(_row(row))
    return "\n".join(lines)


def chain_length_table(results: SweepResults, group: Group, variants: list[Variant]) -> str:
    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in variants)]
    n_exp = results.expected_seeds()
    head = ["Task", *(f"L={v[1]}" + (" (LoRA)" if v[0] == "lora" else "") for v in variants)]
    lines = [_row(head), _row(["---"] + ["---:"] * len(variants))]
    for t in tasks:
        cells = [results.stats(t, v, group) for v in variants]
        means = [c.mean for c in cells if c is not None]
        best = max(means) if means else None
        lines.append(_row([t] + [_fmt(c, n_exp, bold=c is not None and _close(c.mean, best)) for c in cells]))
    return "\n".join(lines)


def stepdown_table(results: SweepResults, group: Group) -> str:
    steps = results.stepdown_variants(group)
    variants = results.variants(group)
    rows = sorted({b for v in steps if (b := lora_baseline(v, variants))} | set(steps), key=variant_order)
    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in rows)]
    n_exp = results.expected_seeds()
    head = ["Method", *(f"{t} score" for t in tasks), *(f"{t} FLOPs saved" for t in tasks)]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for v in rows:
        base = lora_baseline(v, variants)
        row = [variant_label(v)]
        row += [_fmt(results.stats(t, v, group), n_exp) for t in tasks]
        for t in tasks:
            f, fb = results.flops(t, v, group), results.flops(t, base, group) if base else None
            if v[0] == "lora":
                row.append("0% (reference)")
            else:
                row.append(f"{100 * (1 - f / fb):.1f}%" if f and fb else "–")
        lines.append(_row(row))
    return "\n".join(lines)


POOLED = "all tasks (pooled pairs)"


def paired_scores(
    results: SweepResults, group: Group
) -> list[tuple[Variant, Variant, dict[str, tuple[list[float], list[float]]]]]:
    """For each COLA variant with a LoRA baseline: per task, the two methods' test scores on their common seeds
    (shown scale), and over all (task, seed) pairs under :data:`POOLED`. Only cells whose learning rate is final
    (:attr:`~chainlora.recipes.results.SweepResults.final`) take part."""
    out = []
    variants = results.variants(group)
    for v in variants:
        base = lora_baseline(v, variants)
        if base is None:
            continue
        per: dict[str, tuple[list[float], list[float]]] = {}
        for t in results.tasks:
            sa, sb = results.final.get((t, v, group)), results.final.get((t, base, group))
            if sa is None or sb is None:
                continue
            ta, tb = sa.test_scores(), sb.test_scores()
            seeds = sorted(set(ta) & set(tb))
            if seeds:
                per[t] = ([ta[s] * results.scale for s in seeds], [tb[s] * results.scale for s in seeds])
        if per:
            per[POOLED] = _pool(per.values())
            out.append((v, base, per))
    return out


# The paper's COLA − LoRA test-score gains on OPT-1.3B (Table 1, points; 5 seeds; ../shared/REFERENCE.md): what a
# replication must be able to detect. The pooled figure is their mean over the 11 tasks.
PAPER_GAIN = {
    "sst2": 0.16, "wsc": 3.66, "cb": 1.07, "wic": 0.79, "boolq": 1.38, "multirc": 1.69, "rte": 1.66,
    "drop": 0.60, "squad": 0.33, "copa": 1.00, "record": 0.22,
}  # fmt: skip
PAPER_MEAN_GAIN = sum(PAPER_GAIN.values()) / len(PAPER_GAIN)


def paired_comparisons(
    results: SweepResults, group: Group
) -> list[tuple[Variant, Variant, dict[str, PairedDifference]]]:
    """For each COLA variant with a LoRA baseline, :func:`paired_scores` compared: per task and pooled over all
    (task, seed) pairs, COLA − LoRA in test points with its interval, t-test and sign test."""
    return [
        (v, base, {t: paired_difference(a, b) for t, (a, b) in per.items()})
        for v, base, per in paired_scores(results, group)
    ]


def power_cell(task: str, d: PairedDifference) -> str:
    """Seeds a paired t-test needs to detect the paper's gain on ``task`` at 80% power, from the measured sd of
    the differences, and whether these runs have that many."""
    gain = PAPER_MEAN_GAIN if task == POOLED else PAPER_GAIN.get(task)
    if gain is None or d.sd is None:
        return "–"
    if d.sd == 0:
        return f"paper +{gain:.2f}: no estimate (every pair identical, sd 0)"
    needed = seeds_for_power(gain, d.sd)
    if needed is None:
        return f"paper +{gain:.2f}: > 100000"
    return f"paper +{gain:.2f}: {needed} ({'reached' if d.n >= needed else 'not reached'})"


def paired_table(results: SweepResults, group: Group) -> str:
    blocks = []
    for v, base, per in paired_comparisons(results, group):
        lines = [
            f"**{variant_label(v)} − {variant_label(base)}** (test score points, same seeds = same data)",
            "",
            _row(["Task", "pairs", "mean diff", "95% CI", "t-test p", "sign-test p", "wins/losses/ties",
                  "pairs for 80% power (at the paper's gain)"]),
            _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---"]),
        ]  # fmt: skip
        lines += [_paired_row(t, d, power_cell(t, d)) for t, d in per.items()]
        lines += ["", f"**Bottom line: {verdict(v, base, per[POOLED])}**"]
        early, total = runs_tested_before_first_knot(results, v, group)
        if total:
            lines += [
                "",
                f"{early} of {total} {variant_label(v)} runs were tested at a state from before their first "
                "knot (checkpoint selection picked an early epoch): a single trained link, "
                + (
                    "under a learning rate that decays to 0 at the knot (the jagged schedule), so not the "
                    "LoRA run's state, though no chain either."
                    if v.lr_schedule == "jagged"
                    else "the very state of the LoRA run with the same seeds, so such a pair differs only "
                    "through the epoch chosen."
                ),
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _pool(pairs: Iterable[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Several sets of paired scores as one: all the first sides, all the second sides, in the same order."""
    pairs = list(pairs)
    return [x for a, _ in pairs for x in a], [y for _, b in pairs for y in b]


def _paired_row(label: str, d: PairedDifference, power: str) -> str:
    ci = f"{d.low:+.2f}..{d.high:+.2f}" if d.low is not None and d.high is not None else "–"
    return _row(
        [
            label,
            str(d.n),
            _num(d.mean, "+.2f"),
            ci,
            _num(d.pvalue, ".3f"),
            _num(d.sign_pvalue, ".3f"),
            f"{d.wins}/{d.losses}/{d.ties}",
            power,
        ]
    )


ALL_SETTINGS = "all settings (pooled pairs)"


def paired_scores_over_settings(
    results: SweepResults,
) -> list[tuple[Variant, Variant, dict[str, tuple[list[float], list[float]]]]]:
    """For each COLA variant paired with a LoRA baseline in two or more settings (groups, e.g. ``num_train``
    100 and 50, or three optimizers): per setting its pooled (task, seed) pairs, and every pair of every
    setting under :data:`ALL_SETTINGS`. Empty for a sweep of one setting, whose pooled row already is this."""
    by_pair: dict[tuple[Variant, Variant], dict[str, tuple[list[float], list[float]]]] = {}
    for group in results.groups:
        for v, base, per in paired_scores(results, group):
            by_pair.setdefault((v, base), {})[group_label(group)] = per[POOLED]
    out = []
    for (v, base), per in by_pair.items():
        if len(per) > 1:
            per[ALL_SETTINGS] = _pool(per.values())
            out.append((v, base, per))
    return out


def paired_table_over_settings(results: SweepResults) -> str:
    """COLA − LoRA pooled within each setting and over all settings, with the bottom line over all."""
    blocks = []
    for v, base, per in paired_scores_over_settings(results):
        lines = [
            f"**{variant_label(v)} − {variant_label(base)}** (test score points; each row pools the (task, seed) "
            "pairs of one setting, the last row every pair)",
            "",
            _row(["Setting", "pairs", "mean diff", "95% CI", "t-test p", "sign-test p", "wins/losses/ties",
                  "pairs for 80% power (at the paper's mean gain)"]),
            _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---"]),
        ]  # fmt: skip
        diffs = {label: paired_difference(a, b) for label, (a, b) in per.items()}
        lines += [_paired_row(label, d, power_cell(POOLED, d)) for label, d in diffs.items()]
        lines += ["", f"**Bottom line over all settings: {verdict(v, base, diffs[ALL_SETTINGS])}**"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def verdict(variant: Variant, base: Variant, d: PairedDifference) -> str:
    """One plain sentence on the pooled difference."""
    head = f"{variant_label(variant)} − {variant_label(base)} = {d.mean:+.2f} points over {d.n} (task, seed) pairs"
    if d.low is None or d.high is None:
        return f"{head}; too few pairs for an interval, so nothing can be said yet."
    interval = f"95% CI {d.low:+.2f}..{d.high:+.2f}"
    needed = seeds_for_power(PAPER_MEAN_GAIN, d.sd) if d.sd else None
    power = (
        f"; detecting the paper's mean gain (+{PAPER_MEAN_GAIN:.2f}) at 80% power needs {needed} pairs"
        if needed
        else ""
    )
    if d.low > 0:
        return f"{head} ({interval}): COLA beats LoRA here{power}."
    if d.high < 0:
        return f"{head} ({interval}): LoRA beats COLA here{power}."
    return f"{head} ({interval}): no difference shown here — COLA does not beat LoRA in these runs{power}."


def runs_tested_before_first_knot(results: SweepResults, variant: Variant, group: Group) -> tuple[int, int]:
    """How many of a COLA variant's chosen runs (cells with a final learning rate, as in the paired comparison)
    were tested at a step ≤ their first knot, out of how many."""
    early = total = 0
    for (_, v, g), sel in results.final.items():
        if v != variant or g != group:
            continue
        for r in sel.runs:
            knots = [k.get("step") for k in r.metrics.get("knots") or [] if isinstance(k, dict)]
            step = r.metrics.get("selected_step")
            if knots and knots[0] is not None and step is not None:
                total += 1
                early += int(step <= knots[0])
    return early, total


END_MEASURES = (
    ("train_loss", "train loss, last epoch"),
    ("dev_loss", "dev loss, last step"),
    ("dev_score", "dev score, last step"),
)


def end_of_budget_pairs(
    results: SweepResults, group: Group
) -> list[tuple[Variant, Variant, dict[tuple[str, float], dict[str, tuple[list[float], list[float]]]]]]:
    """For each COLA variant with a LoRA baseline: per (task, learning rate), each measure of
    :class:`~chainlora.recipes.results.EndOfBudget` for the two methods on the seeds where both have it (the
    same learning rate and seed: the same data and, up to the first knot, the same run). Dev scores on the
    shown scale."""
    by_key = {(r.task, r.variant, r.group, r.lr, r.seed): r for r in results.data.results}
    variants = results.variants(group)
    out = []
    for v in variants:
        base = lora_baseline(v, variants)
        if base is None:
            continue
        per: dict[tuple[str, float], dict[str, tuple[list[float], list[float]]]] = {}
        for run in sorted(results.data.results, key=lambda r: r.seed):
            other = by_key.get((run.task, base, group, run.lr, run.seed))
            if run.variant != v or run.group != group or other is None:
                continue
            mine, theirs = run.end_of_budget, other.end_of_budget
            measures = per.setdefault((run.task, run.lr), {name: ([], []) for name, _ in END_MEASURES})
            for name, _ in END_MEASURES:
                a, b = getattr(mine, name), getattr(theirs, name)
                if a is not None and b is not None:
                    scale = results.scale if name == "dev_score" else 1.0
                    measures[name][0].append(a * scale)
                    measures[name][1].append(b * scale)
        per = {
            key: measures
            for key, measures in sorted(
                per.items(), key=lambda kv: (results.tasks.index(kv[0][0]), -kv[0][1])
            )
            if any(a for a, _ in measures.values())
        }
        if per:
            out.append((v, base, per))
    return out


def end_of_budget_table(results: SweepResults, group: Group) -> str:
    """COLA − LoRA at the last step, at equal learning rate and seed: per (task, lr) and pooled."""
    blocks = []
    for v, base, per in end_of_budget_pairs(results, group):
        pooled = {
            name: (
                [x for measures in per.values() for x in measures[name][0]],
                [y for measures in per.values() for y in measures[name][1]],
            )
            for name, _ in END_MEASURES
        }
        lines = [
            f"**{variant_label(v)} − {variant_label(base)}** at the same learning rate and seed "
            "(mean difference [95% CI]; lower/higher/equal: pairs where COLA's value is below/above/equal to "
            "LoRA's)",
            "",
            _row(
                [
                    "Task",
                    "lr",
                    "pairs",
                    *(label for _, label in END_MEASURES),
                    "train loss lower/higher/equal",
                ]
            ),
            _row(["---", "---:", "---:", "---:", "---:", "---:", "---:"]),
        ]
        rows = [((task, format_number(lr)), measures) for (task, lr), measures in per.items()]
        for (task, lr), measures in [*rows, ((POOLED, "all"), pooled)]:
            diffs = {
                name: paired_difference(*measures[name]) for name, _ in END_MEASURES if measures[name][0]
            }
            cells = []
            for name, _ in END_MEASURES:
                d = diffs.get(name)
                spec = "+.2f" if name == "dev_score" else "+.4f"
                ci = (
                    f" [{d.low:{spec}}..{d.high:{spec}}]"
                    if d and d.low is not None and d.high is not None
                    else ""
                )
                cells.append(f"{d.mean:{spec}}{ci}" if d else "–")
            fit = diffs.get("train_loss")
            counts = f"{fit.losses}/{fit.wins}/{fit.ties}" if fit else "–"
            n = max(len(measures[name][0]) for name, _ in END_MEASURES)
            lines.append(_row([task, lr, str(n), *cells, counts]))
        if fit:  # the pooled row's: the verdict
            lines += ["", f"**{end_of_budget_verdict(v, base, fit)}**"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def end_of_budget_verdict(variant: Variant, base: Variant, d: PairedDifference) -> str:
    """One plain sentence on the pooled last-epoch training loss (lower is better)."""
    head = (
        f"At the end of the budget {variant_label(variant)} had the lower training loss in {d.losses} of {d.n} "
        f"pairs, the higher in {d.wins} (mean {d.mean:+.4f}"
    )
    if d.low is None or d.high is None:
        return f"{head}; too few pairs for an interval)."
    head += f", 95% CI {d.low:+.4f}..{d.high:+.4f})"
    if d.high < 0:
        return f"{head}: the chain fits the training data better than one link with the same budget here."
    if d.low > 0:
        return f"{head}: the chain fits the training data worse than one link with the same budget here."
    return f"{head}: no difference in fit shown."


def lr_table(results: SweepResults) -> str:
    lines = [
        _row(
            [
                "Task",
                "Method",
                "Group",
                "LR: mean dev score, negated where lower is better (seeds)",
                "chosen LR",
            ]
        ),
        _row(["---", "---", "---", "---", "---:"]),
    ]
    for (task, variant, group), sel in sorted(
        results.selected.items(),
        key=lambda kv: (results.tasks.index(kv[0][0]), str(kv[0][2]), variant_order(kv[0][1])),
    ):
        tried = "; ".join(
            f"{format_number(lr)}: {_num(None if d is None else d * results.scale, '.2f')} ({n})"
            for lr, (d, n) in sel.dev_by_lr.items()
        )
        chosen = format_number(sel.chosen_lr)
        if sel.pending:
            chosen += f" {PROVISIONAL} ({sel.pending} to run)"
        lines.append(_row([task, variant_label(variant), group_label(group), tried, chosen]))
    return "\n".join(lines)


def runs_table(results: SweepResults) -> str:
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
    for r in sorted(results.data.results, key=lambda r: r.name):
        knots = r.metrics.get("knots") or []
        ktext = ", ".join(
            f"{k.get('step')}: {k.get('link')}→r{k.get('next_rank')}" for k in knots if isinstance(k, dict)
        )
        lines.append(
            _row(
                [
                    f"`{r.name}`" + (f" (joined from `{Path(r.joined_from).name}`)" if r.joined_from else ""),
                    _num(None if r.dev_score is None else r.dev_score * results.scale, ".2f"),
                    _num(None if r.test_score is None else r.test_score * results.scale, ".2f"),
                    f"{r.metrics.get('selected_step', '–')} / {r.metrics.get('train_steps', '–')}",
                    _num(r.train_seconds, ".0f"),
                    _num(r.train_flops, ".3g"),
                    ktext or "–",
                ]
            )
        )
    return "\n".join(lines)


def markdown(results: SweepResults, plots_dir: Path, relative_to: Path) -> str:
    """The whole report; writes its plots into ``plots_dir`` and links them relative to ``relative_to``."""
    d = results.data
    out: list[str] = [f"# Sweep report: `{d.root}`", ""]
    out += _summary_lines(results)
    multi = len(results.groups) > 1
    for group in results.groups:
        suffix = f"-{group_slug(group)}" if multi else ""
        title = f" ({group_label(group)})" if multi else ""
        out += [f"## Main table{title}", ""]
        out += [
            "Test score, mean ± sd over seeds (sd with ddof = 1; `(n=k)` marks a cell with fewer seeds than "
            "planned), at each cell's chosen learning rate; bold = best mean in the column. The gain rows "
            "are relative: (COLA − LoRA) / LoRA."
            + (
                f" {PROVISIONAL} = learning rate provisional: the cell's grid is not finished, so its rate may "
                "change; such cells stay out of the paired comparison."
                if any(sel.pending for sel in results.selected.values())
                else ""
            ),
            "",
            main_table(results, group),
            "",
        ]
        img = plot_main(results, group, plots_dir / f"main{suffix}.png")
        out += [f"![test score by method]({_rel(img, relative_to)})", ""]
        for ranks, variants in results.chain_length_series(group).items():
            rs = f"-r{'-'.join(map(str, ranks))}" if ranks else ""
            out += [f"## Chain length{title}" + (f", r = {ranks[0]}" if ranks else ""), ""]
            out += [chain_length_table(results, group, variants), ""]
            img = plot_chain_length(results, group, variants, plots_dir / f"chain_length{suffix}{rs}.png")
            out += [f"![test score vs chain length]({_rel(img, relative_to)})", ""]
        if results.stepdown_variants(group):
            out += [f"## Rank step-down{title}", ""]
            out += [
                "Training FLOPs are the train recipe's analytic count (`train_flops` in metrics.json), "
                "mean over the seeds of the chosen LR; saved = 1 − COLA / LoRA of the same first rank.",
                "",
                stepdown_table(results, group),
                "",
            ]
            img = plot_stepdown(results, group, plots_dir / f"rank_stepdown{suffix}.png")
            out += [f"![rank step-down]({_rel(img, relative_to)})", ""]
        paired = paired_table(results, group)
        if paired:
            out += _section(
                f"## Paired comparison, COLA vs LoRA{title}",
                "Each seed draws the same train/dev/test rows for every method, so runs of one seed are "
                "paired. Two-sided paired t-test (`scipy.stats.ttest_rel`) and exact sign test "
                "(`scipy.stats.binomtest`, ties dropped); the 95% CI of the mean difference is Student's t. "
                "The pooled row treats every (task, seed) pair as one observation. The last column: how many "
                "pairs a paired t-test needs to detect the paper's OPT-1.3B gain on that task (pooled: its mean "
                "over the 11 tasks) with 80% power, from the sd of the differences measured here. With fewer "
                "pairs a p-value above 0.05 means 'not shown', not 'no effect'.",
                paired,
            )
        end = end_of_budget_table(results, group)
        if end:
            out += _section(
                f"## At the end of the budget, COLA vs LoRA (no checkpoint selection){title}",
                "Checkpoint selection can return a state from before the first knot, where a COLA run *is* the "
                "LoRA run of its seed. Here each COLA run meets the LoRA run of the same learning rate and seed "
                "(the same data) at its last step, at every learning rate of the grid: the training loss "
                "averaged over the last epoch (the paper's Frank-Wolfe view: a chain of links fits better than "
                "one link within the same budget), and the dev loss and dev score evaluated at the last step. "
                "Not the test score: the test set is scored only at the selected state. Pairs of one seed "
                "at different learning rates share their data, so the pooled row's pairs are not independent "
                "and its interval is indicative only.",
                end,
            )
    over_settings = paired_table_over_settings(results)
    if over_settings:
        out += _section(
            "## Paired comparison over all settings, COLA vs LoRA",
            "The pooled rows of the per-setting comparisons above, side by side, and all their pairs together: "
            "the sweep's answer in one line. The last row treats every pair as independent, though pairs of "
            "one seed in two settings may share data (the same rows under another optimizer, overlapping "
            "samples of another training-set size), so its interval is indicative; the per-setting rows show "
            "whether the settings agree.",
            over_settings,
        )
    out += ["## Learning-rate selection", ""]
    out += [
        "Rule: per cell (task × method × chain length × ranks × optimizer × extra axes), the learning rate "
        "with the highest mean **dev** score over its seeds; the test score never takes part.",
        "",
        lr_table(results),
        "",
    ]
    out += [
        "## All finished runs",
        "",
        "<details><summary>per-run scores</summary>",
        "",
        runs_table(results),
    ]
    out += ["", "</details>", ""]
    return "\n".join(out)


def _summary_lines(results: SweepResults) -> list[str]:
    d = results.data
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
        "lr_schedule",
        "warmup",
    )
    settings = ", ".join(f"{k} = {base[k]}" for k in keys if k in base)
    if settings:
        lines.append(f"- base settings: {settings}")
    selections = sorted({str(r.config.get("selection")) for r in d.results if r.config.get("selection")})
    if selections:
        lines.append(
            f"- checkpoint selection within a run: {', '.join(selections)} (the train recipe's `selection`)"
        )
    if results.selected and all(len(sel.dev_by_lr) == 1 for sel in results.selected.values()):
        lines.append("- learning rate: one per method (no grid), so there was no learning-rate choice")
    else:
        lines.append("- learning-rate selection per cell: highest mean dev score over seeds (test not used)")
    provisional = sum(1 for sel in results.selected.values() if sel.pending)
    if provisional:
        lines.append(
            f"- {PROVISIONAL} learning rate provisional in {provisional} of {len(results.selected)} cells: runs "
            "of their grid (learning rate × seed) are still to run, so the best dev score so far may come from "
            "fewer seeds than planned; these cells are shown but kept out of the paired comparisons"
        )
    n_plan = len(d.planned) or len(d.results)
    n_merged = sum(j.runs for j in d.merged)
    lines.append(
        f"- runs: {len(d.results) - n_merged} finished of {n_plan} planned, {len(d.failed)} failed, "
        f"{len(d.missing) - len(d.failed)} not yet run"
    )
    for j in d.merged:
        differ = "; ".join(
            f"{k} = {'default' if mine is None else mine} here, {'default' if theirs is None else theirs} there"
            for k, (mine, theirs) in j.base_differences.items()
        )
        lines.append(
            f"- joined from `{j.root}`: {j.runs} finished runs of the same tasks and settings"
            + (f"; **the two sweeps' base settings differ**: {differ}" if differ else "")
        )
    secs = [r.train_seconds for r in d.results if r.train_seconds]
    if secs:
        lines.append(
            f"- total train time over finished runs: {sum(secs) / 60:.1f} min (sum of `train_seconds`"
            + (f", the {n_merged} joined runs included)" if n_merged else ")")
        )
    invocations = d.state.get("invocations", [])
    walls = [i.get("wall_seconds") for i in invocations if i.get("wall_seconds")]
    running = sum(1 for i in invocations if "ended" not in i)
    if walls:
        lines.append(
            f"- sweep wall time: {sum(walls) / 60:.1f} min over {len(walls)} finished invocation(s) of "
            "`chainlora sweep`" + (f" ({running} more still running or killed)" if running else "")
        )
    if results.scale != 1.0:
        lines.append("- scores shown ×100 (metrics.json holds fractions)")
    for name, entry in sorted(d.failed.items()):
        lines.append(f"- FAILED `{name}`: {entry.get('error')} (log `{entry.get('log')}`)")
    missing = [s.name for s in d.to_run]
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:10])
        lines.append(f"- not yet run ({len(missing)}): {shown}" + (" …" if len(missing) > 10 else ""))
    return [*lines, ""]


def _section(heading: str, explanation: str, body: str) -> list[str]:
    """A report section's lines: heading, the paragraph that says how to read it, its table(s)."""
    return [heading, "", explanation, "", body, ""]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-9


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def write_report(
    sweep_dir: str | Path,
    output: str | Path | None = None,
    plots_dir: str | Path | None = None,
    *,
    percent: bool | None = None,
    merge: Sequence[str | Path] = (),
) -> Path:
    """Write the markdown report (default ``<sweep_dir>/report.md``) and its plots (default
    ``<sweep_dir>/plots``), with the runs of the ``merge`` sweeps that share a task and setting; return the
    report's path."""
    data = load_sweep(sweep_dir, merge)
    output = Path(output) if output else Path(sweep_dir) / rundir.REPORT_FILE
    plots = Path(plots_dir) if plots_dir else Path(sweep_dir) / rundir.PLOTS_DIR
    text = markdown(SweepResults.from_sweep(data, percent=percent), plots, output.parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    return output


def report_command(config: ReportConfig) -> int:
    """``chainlora report``: write the report of ``config.sweep_dir`` and print its path."""
    path = write_report(
        config.sweep_dir,
        config.output,
        config.plots_dir,
        percent=config.percent,
        merge=[config.merge] if isinstance(config.merge, str) else config.merge,
    )
    print(f"report: {path}")
    return 0
