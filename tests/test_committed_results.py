"""The committed CPU-protocol reports are what the committed run records say: regenerating a report from
``docs/results/cpu_paper_protocol/records/<sweep>/`` (one ``metrics.json`` per finished run, the sweep plan) with
the current code gives the committed markdown byte for byte. So every figure in those reports can be traced to a
record in the repository, and a change of the report code that changes a figure shows here. Only the committed
kinds of file take part (the machine running a sweep also has its ``sweep_state.json`` and checkpoints there)."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from chainlora.recipes.report import write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("docs/results/cpu_paper_protocol")
REPORTS = {  # records folder -> (report, its plots folder), as the records' README.md regenerates them
    "cpu_table6_low_data": ("table6_low_data.md", "plots_table6"),
    "cpu_table1_paper_scale": ("table1_paper_scale.md", "plots_table1"),
}


@pytest.mark.parametrize("sweep", sorted(REPORTS))
def test_committed_report_is_regenerated_from_committed_records(
    sweep: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, plots = REPORTS[sweep]
    records = RESULTS / "records" / sweep
    assert (REPO / records / "sweep_plan.json").is_file(), f"{records} has no sweep plan"
    committed = [
        "sweep_plan.json",
        "sweep_base.yaml",
        *(str(p.relative_to(REPO / records)) for p in (REPO / records).rglob("metrics.json")),
    ]
    for name in committed:
        (tmp_path / records / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / records / name, tmp_path / records / name)
    assert len(committed) > 2, f"{records} holds no finished run"
    monkeypatch.chdir(tmp_path)  # the report names its sweep folder as given: the repository-relative path
    # `chainlora report`'s own writer, into the scratch copy of the layout, so the plot links come out as committed
    text = write_report(records, RESULTS / report, RESULTS / plots).read_text()
    assert text == (REPO / RESULTS / report).read_text(), (
        f"{RESULTS / report} is not what {records} says: regenerate it (see {RESULTS}/records/README.md)"
    )


FIRST_PASS_ROW = re.compile(
    r"^\| `(?P<name>[^`]+/seed\d+)` \| (?P<dev>[^|]+) \| (?P<test>[^|]+) \| (?P<step>\d+) / (?P<steps>\d+) \| "
    r"[^|]+ \| (?P<flops>[^|]+) \|"
)


@pytest.mark.parametrize("sweep", sorted(REPORTS))
def test_reruns_reproduce_the_first_pass(sweep: str) -> None:
    """The first pass's run folders were lost; its reports (``first_pass/``) list every run. A rerun at the same
    frozen commit and seed must give the same run: dev and test score, selected step, step count and FLOPs."""
    report, _ = REPORTS[sweep]
    rows = {}
    for line in (REPO / RESULTS / "first_pass" / report).read_text().splitlines():
        if m := FIRST_PASS_ROW.match(line):
            rows[m["name"]] = (m["dev"].strip(), m["test"].strip(), m["step"], m["steps"], m["flops"].strip())
    assert rows, f"no run rows in first_pass/{report}"
    records = REPO / RESULTS / "records" / sweep
    compared = 0
    for path in sorted(records.rglob("metrics.json")):
        name = path.parent.relative_to(records).as_posix()
        if name not in rows:
            continue
        m = json.loads(path.read_text())
        rerun = (
            f"{100 * m['dev_score']:.2f}",
            f"{100 * m['test_score']:.2f}",
            str(m["selected_step"]),
            str(m["train_steps"]),
            f"{m['train_flops']:.2e}",
        )
        assert rerun == rows[name], f"{name}: rerun {rerun} != first pass {rows[name]}"
        compared += 1
    assert compared, f"no record in {records} has a first-pass row to compare with"


def _pooling_script():
    spec = importlib.util.spec_from_file_location("pool_first_pass", REPO / "scripts" / "pool_first_pass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAIRED_ROW = re.compile(
    r"^\| (?P<task>[a-z0-9]+|all tasks \(pooled pairs\)) \| (?P<n>\d+) \| (?P<mean>[-+][\d.]+) \| "
    r"(?P<low>[-+][\d.]+)\.\.(?P<high>[-+][\d.]+) \| (?P<p>[\d.]+|–) \| [^|]+ \| (?P<wlt>\d+/\d+/\d+) \|"
)


def _paired_rows(report: Path) -> dict[tuple[str, str | None], dict[str, dict[str, str]]]:
    """A report's paired-comparison tables: per (COLA variant, setting: None where the report has one setting
    only and names none), the rows by task."""
    out = {}
    for section in report.read_text().split("\n## Paired comparison, COLA vs LoRA")[1:]:
        heading, body = section.split("\n", 1)
        setting = heading.strip()[1:-1] if heading.strip() else None
        body = body.split("\n## ", 1)[0]
        for block in body.split("\n**")[1:]:
            if m := re.match(r"(COLA \(L=\d+\)) − LoRA\*\*", block):
                rows = map(PAIRED_ROW.match, block.split("**Bottom line", 1)[0].splitlines())
                out[(m[1], setting)] = {r["task"]: r.groupdict() for r in rows if r}
    return out


@pytest.mark.parametrize("sweep", sorted(REPORTS))
@pytest.mark.parametrize("runs_from", ["first_pass", "records"])
def test_pooling_script_gives_each_reports_table_from_its_runs(sweep: str, runs_from: str) -> None:
    """``scripts/pool_first_pass.py`` joins the first-pass rows to the records and runs the report's comparison on
    them. From the first-pass rows alone it must give the first-pass report's paired tables (to the printed
    precision of the scores it reads: 0.01); from the records alone, read at full precision, the regenerated
    report's to the precision the report prints (0.01 points, p to 0.001)."""
    pool = _pooling_script()
    report, _ = REPORTS[sweep]
    if runs_from == "first_pass":
        results = pool.merged_results(sweep, records=False)
        expected = _paired_rows(REPO / RESULTS / "first_pass" / report)
        points_tol, p_tol = 0.011, 0.002
    else:
        results = pool.merged_results(sweep, first_pass=False)
        expected = _paired_rows(REPO / RESULTS / report)
        # half a unit of the printed last digit (and a hair for the float that rounded to it)
        points_tol, p_tol = 0.005 + 1e-9, 0.0005 + 1e-9
    assert expected, f"no paired table in the {runs_from} report of {sweep}"
    blocks = pool.compare(results)
    if all(setting is None for _, setting in expected):  # a one-setting report does not name its setting
        blocks = {(variant, None): rows for (variant, _), rows in blocks.items()}
    assert list(blocks) == list(expected)
    for block, rows in blocks.items():
        assert list(rows) == list(expected[block]), block
        for task, (d, _, _) in rows.items():
            want = expected[block][task]
            assert (d.n, f"{d.wins}/{d.losses}/{d.ties}") == (int(want["n"]), want["wlt"]), (block, task)
            for got, key in ((d.mean, "mean"), (d.low, "low"), (d.high, "high")):
                assert got == pytest.approx(float(want[key]), abs=points_tol), (block, task, key)
            if want["p"] != "–":
                assert d.pvalue == pytest.approx(float(want["p"]), abs=p_tol), (block, task, "p")
