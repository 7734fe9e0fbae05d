"""COLA − LoRA over every finished run of a protocol sweep, the lost first pass included, until the reruns catch up.

The first pass's run folders were lost (``docs/results/cpu_paper_protocol/records/README.md``); its report keeps
every run's dev and test score, and each rerun reproduces its first-pass row exactly
(``tests/test_committed_results.py``). So a run here is its committed record where one exists, else its first-pass
row, both read at the precision the reports print (×100, two decimals) when the two sources are joined, so that a
rerun and its first-pass row are the same number (the records alone are read at their full precision, as the
regenerated report reads them). The comparison is ``chainlora report``'s own
(:func:`~chainlora.recipes.report.paired_comparisons` over the sweep's plan): a cell takes part once every planned
run of it has finished, at the learning rate of best mean dev score, COLA paired with LoRA by seed. Once the
records alone cover the first pass, ``chainlora report`` gives the same table and this script can go.

    PYTHONPATH=src python scripts/pool_first_pass.py [cpu_table6_low_data | cpu_table1_paper_scale]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from chainlora.recipes.report import PAPER_GAIN, PAPER_MEAN_GAIN, POOLED, paired_comparisons
from chainlora.recipes.results import (
    RunResult,
    SweepData,
    SweepResults,
    group_label,
    load_sweep,
    planned_cell,
    variant_label,
)
from chainlora.recipes.stats import PairedDifference, seeds_for_power

RESULTS = Path(__file__).resolve().parents[1] / "docs/results/cpu_paper_protocol"
FIRST_PASS_REPORT = {
    "cpu_table6_low_data": "table6_low_data.md",
    "cpu_table1_paper_scale": "table1_paper_scale.md",
}
RUN_ROW = re.compile(r"^\| `(?P<name>[^`]+/seed\d+)` \| (?P<dev>[\d.]+) \| (?P<test>[\d.]+) \|")

# per (COLA variant, setting) as the report labels them: per task and pooled, the comparison, the chosen learning
# rates (LoRA, COLA; None pooled) and the names of its runs
Comparisons = dict[tuple[str, str], dict[str, tuple[PairedDifference, tuple[float, float] | None, list[str]]]]


def _printed(score: float | None) -> float | None:
    """A score (a fraction) at the precision a report prints it: ×100 with two decimals."""
    return None if score is None else round(score, 4)


def first_pass_scores(sweep: str) -> dict[str, tuple[float, float]]:
    """Every run row of the first-pass report: (dev, test) as fractions, at the printed precision."""
    text = (RESULTS / "first_pass" / FIRST_PASS_REPORT[sweep]).read_text()
    rows = filter(None, map(RUN_ROW.match, text.splitlines()))
    return {m["name"]: (round(float(m["dev"]) / 100, 4), round(float(m["test"]) / 100, 4)) for m in rows}


def merged_results(
    sweep: str, *, records: bool = True, first_pass: bool = True, data: SweepData | None = None
) -> SweepResults:
    """The sweep as its report sees it, from its committed records, the first-pass rows of the runs without a
    record, or both (``records`` / ``first_pass``); every planned run that neither gives is still to run. Joined,
    both are read at the printed precision; the records alone, at full precision.
    ``data``: the sweep's records as :func:`load_sweep` read them, if already read (their results are replaced)."""
    if data is None:
        data = load_sweep(RESULTS / "records" / sweep)
    data.results = [
        replace(r, dev_score=_printed(r.dev_score), test_score=_printed(r.test_score)) if first_pass else r
        for r in (data.results if records else [])
    ]
    if first_pass:
        rows, done = first_pass_scores(sweep), {r.name for r in data.results}
        data.results += [
            RunResult.from_spec(s, {"dev_score": rows[s.name][0], "test_score": rows[s.name][1]}, {})
            for s in data.planned
            if s.name in rows and s.name not in done
        ]
    base = data.plan.get("base") or {}
    data.pending = Counter(planned_cell(s, base) for s in data.to_run)
    return SweepResults.from_sweep(data, percent=True)


def compare(results: SweepResults) -> Comparisons:
    """The report's paired comparisons of ``results``, keyed by labels, with the names of each row's runs."""
    out: Comparisons = {}
    for group in results.groups:
        for variant, base, rows in paired_comparisons(results, group):
            cells = {
                t: (results.final[(t, base, group)], results.final[(t, variant, group)])
                for t in rows
                if t != POOLED
            }
            block = {
                t: (
                    rows[t],
                    (lora.chosen_lr, cola.chosen_lr),
                    [r.name for sel in (lora, cola) for r in sel.runs],
                )
                for t, (lora, cola) in cells.items()
            }
            block[POOLED] = (rows[POOLED], None, [n for _, _, names in block.values() for n in names])
            out[(variant_label(variant), group_label(group))] = block
    return out


def source(names: list[str], records: set[str]) -> str:
    """Where runs come from: the committed records, the first pass, or both."""
    have = sum(n in records for n in names)
    if have == len(names):
        return "records"
    return "first pass" if have == 0 else f"both ({have} of {len(names)} records)"


def table(sweep: str) -> str:
    """The comparison as markdown, one block per COLA variant and setting."""
    data = load_sweep(RESULTS / "records" / sweep)
    records = {r.name for r in data.results}
    results = merged_results(sweep, data=data)
    lines = [f"`{sweep}`: committed records where they exist, else first-pass rows"]
    for (variant, setting), rows in compare(results).items():
        lines += [
            "",
            f"**{variant} − LoRA**, {setting} (test points, paired by seed)",
            "",
            "| Task | runs from | lr LoRA / COLA | pairs | mean diff | 95% CI | t-test p | wins/losses/ties "
            "| pairs for 80% power at the paper's gain |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for task, (d, rates, names) in rows.items():
            gain = PAPER_MEAN_GAIN if task == POOLED else PAPER_GAIN.get(task)
            needed = seeds_for_power(gain, d.sd) if gain and d.sd else None
            cells = [
                task,
                source(names, records),
                "" if rates is None else "{:g} / {:g}".format(*rates),
                str(d.n),
                f"{d.mean:+.2f}",
                "–" if d.low is None else f"{d.low:+.2f}..{d.high:+.2f}",
                "–" if d.pvalue is None else f"{d.pvalue:.3f}",
                f"{d.wins}/{d.losses}/{d.ties}",
                f"paper +{gain:.2f}: {needed}" if needed else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sweeps = sys.argv[1:] or list(FIRST_PASS_REPORT)
    if unknown := [s for s in sweeps if s not in FIRST_PASS_REPORT]:
        print(
            f"error: no first pass for {', '.join(unknown)}; choose from {', '.join(FIRST_PASS_REPORT)}",
            file=sys.stderr,
        )
        sys.exit(2)
    for sweep in sweeps:
        print(table(sweep), end="\n\n")
