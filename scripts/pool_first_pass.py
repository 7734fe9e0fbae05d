"""COLA − LoRA over every finished run of a protocol sweep, the lost first pass included, until the reruns catch up.

The first pass's run folders were lost (``docs/results/cpu_paper_protocol/records/README.md``); its report keeps
every run's dev and test score, and each rerun reproduces its first-pass row exactly
(``tests/test_committed_results.py``). So a run here is its committed record where one exists, else its first-pass
row. Scores are compared as the reports print them (×100, rounded to 0.01), so that a rerun and its first-pass
row are the same number. Over those runs this applies ``chainlora report``'s rules: a cell (task ×
method × extra axes) takes part only once every planned run of it has finished; the learning rate with the best
mean dev score is chosen (ties: more seeds, then the smaller rate); COLA pairs with the LoRA run of the same seed;
``paired_difference`` and ``seeds_for_power`` give the figures. Once the records alone cover the first pass,
``chainlora report`` gives the same table and this script can go.

    PYTHONPATH=src python scripts/pool_first_pass.py [cpu_table6_low_data | cpu_table1_paper_scale]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from chainlora.recipes.report import PAPER_GAIN, PAPER_MEAN_GAIN, POOLED
from chainlora.recipes.results import group_label
from chainlora.recipes.stats import PairedDifference, paired_difference, seeds_for_power

RESULTS = Path(__file__).resolve().parents[1] / "docs/results/cpu_paper_protocol"
FIRST_PASS_REPORT = {
    "cpu_table6_low_data": "table6_low_data.md",
    "cpu_table1_paper_scale": "table1_paper_scale.md",
}
RUN_ROW = re.compile(r"^\| `(?P<name>[^`]+/seed\d+)` \| (?P<dev>[\d.]+) \| (?P<test>[\d.]+) \|")

Scores = dict[str, tuple[float, float]]  # run name -> (dev, test), ×100


def first_pass_scores(sweep: str) -> Scores:
    """Every run row of the first-pass report: (dev, test) as printed (×100, two decimals)."""
    text = (RESULTS / "first_pass" / FIRST_PASS_REPORT[sweep]).read_text()
    return {
        m["name"]: (float(m["dev"]), float(m["test"])) for m in map(RUN_ROW.match, text.splitlines()) if m
    }


def record_scores(sweep: str) -> Scores:
    """Every committed record of the sweep: (dev, test) as a report prints them (×100, two decimals)."""
    records = RESULTS / "records" / sweep
    out = {}
    for path in records.rglob("metrics.json"):
        m = json.loads(path.read_text())
        out[path.parent.relative_to(records).as_posix()] = (
            round(100 * m["dev_score"], 2),
            round(100 * m["test_score"], 2),
        )
    return out


Row = tuple[PairedDifference, tuple[float, float], list[str]]  # the comparison, (LoRA lr, COLA lr), its runs
Cell = tuple[str, str, int, str]  # task, method, chain length, setting (the report's group label)
Choice = tuple[float, dict[int, float], list[str]]  # chosen lr, test score by seed, all the cell's runs


def choose(runs: list[dict], scores: Scores) -> Choice | None:
    """The report's rule for one cell: None until every planned run has finished (the report calls such a rate
    provisional and leaves the cell out), else the rate of best mean dev score (ties: more seeds, then smaller)."""
    if any(r["name"] not in scores for r in runs):
        return None
    by_lr: dict[float, list[dict]] = defaultdict(list)
    for r in runs:
        by_lr[r["learning_rate"]].append(r)

    def rank(lr: float) -> tuple[float, int, float]:
        return statistics.fmean(scores[r["name"]][0] for r in by_lr[lr]), len(by_lr[lr]), -lr

    lr = max(by_lr, key=rank)
    return lr, {r["seed"]: scores[r["name"]][1] for r in by_lr[lr]}, [r["name"] for r in runs]


def compare(sweep: str, scores: Scores) -> dict[tuple[str, str], dict[str, Row]]:
    """COLA − LoRA test points per (COLA variant, setting) as the report labels them, per task and pooled
    (:data:`POOLED`), over the cells whose whole grid is in ``scores``; each row with the two chosen learning
    rates and the names of the runs it rests on."""
    plan = json.loads((RESULTS / "records" / sweep / "sweep_plan.json").read_text())["runs"]
    cells: dict[Cell, list[dict]] = defaultdict(list)
    for r in plan:
        if r["method"] in ("lora", "cola"):
            setting = group_label((r["optimizer"], tuple(r["extras"].items())))
            cells[(r["task"], r["method"], r["chain_length"], setting)].append(r)
    chosen = {cell: choice for cell, runs in cells.items() if (choice := choose(runs, scores))}
    blocks: dict[tuple[str, str], dict[str, Row]] = defaultdict(dict)
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (task, method, length, setting), (lr, cola, names) in sorted(chosen.items(), key=lambda c: c[0][2]):
        if method != "cola" or (lora := chosen.get((task, "lora", 1, setting))) is None:
            continue
        block = (f"COLA (L={length})", setting)
        seeds = sorted(set(cola) & set(lora[1]))
        a, b = [cola[s] for s in seeds], [lora[1][s] for s in seeds]
        blocks[block][task] = (paired_difference(a, b), (lora[0], lr), lora[2] + names)
        pairs[block] += zip(a, b, strict=True)
    tasks = list(dict.fromkeys(r["task"] for r in plan))
    out = {}
    for block, rows in blocks.items():
        out[block] = {t: rows[t] for t in tasks if t in rows}
        out[block][POOLED] = (
            paired_difference([a for a, _ in pairs[block]], [b for _, b in pairs[block]]),
            (0.0, 0.0),
            [n for _, _, names in rows.values() for n in names],
        )
    return out


def source(names: list[str], records: Scores) -> str:
    """Where runs come from: the committed records, the first pass, or both."""
    have = sum(n in records for n in names)
    if have == len(names):
        return "records"
    return "first pass" if have == 0 else f"both ({have} of {len(names)} records)"


def table(sweep: str) -> str:
    """The comparison as markdown, one block per COLA variant."""
    records = record_scores(sweep)
    scores = {**first_pass_scores(sweep), **records}
    lines = [f"`{sweep}`: committed records where they exist, else first-pass rows"]
    for (variant, setting), rows in compare(sweep, scores).items():
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
                "" if task == POOLED else "{:g} / {:g}".format(*rates),
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
    for sweep in sys.argv[1:] or list(FIRST_PASS_REPORT):
        print(table(sweep), end="\n\n")
