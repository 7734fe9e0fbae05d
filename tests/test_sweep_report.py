"""Sweeps and reports: grid expansion, run names, resumability, LR selection, tables, paired tests, end to end.

Metrics files are fabricated here ONLY to test the report logic (never as results). A fake ``python`` (a small
script that writes ``metrics.json``) stands in for ``chainlora train`` where the runner itself is under test;
one test runs two real tiny training runs through the real CLI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from scipy import stats

from chainlora.errors import ConfigError
from chainlora.recipes.grid import (
    RunSpec,
    expand_grid,
    format_number,
    load_sweep_config,
    run_name,
    sweep_config_from_dict,
)
from chainlora.recipes.report import (
    chain_length_table,
    end_of_budget_pairs,
    end_of_budget_table,
    main_table,
    paired_comparisons,
    paired_scores_over_settings,
    paired_table,
    runs_tested_before_first_knot,
    stepdown_table,
    write_report,
)
from chainlora.recipes.results import SweepResults, Variant, load_sweep, lora_baseline, select_learning_rates
from chainlora.recipes.stats import paired_difference
from chainlora.recipes.sweep import SweepRunner, run_sweep, train_command, worker_env
from chainlora.rundir import SWEEP_PLAN_FILE as PLAN_FILE
from chainlora.rundir import SWEEP_STATE_FILE as STATE_FILE

REPO = Path(__file__).resolve().parents[1]
SWEEP_CONFIGS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))

# ------------------------------------------------------------------------------------------- grid & names


def test_format_number_is_short_exact_and_path_safe():
    assert format_number(5e-4) == "5e-4"
    assert format_number(1e-5) == "1e-5"
    assert format_number(8e-4) == "8e-4"
    assert format_number(2.5e-3) == "2.5e-3"
    assert format_number(0.1) == "1e-1"
    assert format_number(3) == "3"
    assert float(format_number(1.234567e-4)) == 1.234567e-4


def test_run_name_is_deterministic_from_the_cell():
    assert run_name("sst2", "cola", 3, (8,), "adamw", 5e-4, 0) == "sst2/cola-L3-r8/adamw-lr5e-4/seed0"
    assert run_name("rte", "cola", 2, (8, 4), "sgd", 1e-2, 2) == "rte/cola-L2-r8-4/sgd-lr1e-2/seed2"
    assert run_name("cb", "full", None, None, "adamw", 1e-5, 1) == "cb/full/adamw-lr1e-5/seed1"
    assert run_name("cb", "lora", 1, None, "adamw", 1e-4, 1, (("num_train", 64),)) == (
        "cb/lora-n64/adamw-lr1e-4/seed1"
    )


def test_grid_expansion_normalises_and_deduplicates():
    grid = {
        "task": ["sst2", "rte"],
        "method": ["lora", "cola", "full"],
        "chain.length": [1, 2, 3],
        "ranks": [[8], [8, 4]],
        "optimizer": ["adamw"],
        "lr": {"lora": [5e-4, 1e-4], "cola": [5e-4], "full": [1e-5]},
        "seed": [0, 1],
    }
    runs = expand_grid(grid, {})
    names = [r.name for r in runs]
    assert names == [r.name for r in expand_grid(grid, {})]  # deterministic order too
    assert len(names) == len(set(names))
    per_task = {
        "lora-r8": 2 * 2,  # COLA of length 1 is LoRA, a LoRA step-down list keeps its first rank
        "cola-L2-r8": 2,
        "cola-L2-r8-4": 2,  # the step-down list only fits the 2-link chain
        "cola-L3-r8": 2,
        "full": 2,
    }
    for task in ("sst2", "rte"):
        tags = [n.split("/")[1] for n in names if n.startswith(task + "/")]
        assert {t: tags.count(t) for t in set(tags)} == per_task
    step = next(r for r in runs if r.name == "rte/cola-L2-r8-4/adamw-lr5e-4/seed1")
    assert dict(step.overrides) == {
        "task": "rte",
        "method": "cola",
        "chain.length": 2,
        "lora.r": 8,
        "chain.ranks": [8, 4],
        "optimizer": "adamw",
        "lr": 5e-4,
        "seed": 1,
        "train_seed": 1,
    }
    assert step.cell == "rte/cola-L2-r8-4/adamw"
    full = next(r for r in runs if r.method == "full")
    assert "chain.length" not in dict(full.overrides) and "lora.r" not in dict(full.overrides)


def test_grid_union_extra_axes_and_errors():
    grid = [
        {"task": "cb", "method": "lora", "lr": 1e-4, "seed": [0], "num_train": [16, 32]},
        {"task": "cb", "method": "lora", "lr": 1e-4, "seed": [0], "num_train": [16]},
    ]
    names = [r.name for r in expand_grid(grid, {})]
    assert names == ["cb/lora-n16/default-lr1e-4/seed0", "cb/lora-n32/default-lr1e-4/seed0"]
    with pytest.raises(ConfigError, match="fits no COLA chain"):
        expand_grid(
            {"task": "cb", "method": "cola", "chain.length": 3, "ranks": [[8, 4]], "seed": 0}, {"lr": 1}
        )
    with pytest.raises(ConfigError, match="unknown method"):
        expand_grid({"task": "cb", "method": "dora", "seed": 0}, {"lr": 1e-4})
    with pytest.raises(ConfigError, match="no entry for method"):
        expand_grid({"task": "cb", "method": "full", "seed": 0, "lr": {"lora": [1e-4]}}, {})
    with pytest.raises(ConfigError, match="unknown sweep option"):
        sweep_config_from_dict({"grid": {"task": "cb", "method": "lora", "seed": 0}, "sweep": {"wokers": 2}})


def test_old_axis_names_are_read_as_train_config_fields():
    """``learning_rate`` / ``chain_length`` (sweep files written before the rename) are ``lr`` / ``chain.length``:
    the same runs, the same folder names, so a sweep started with the old names resumes with the new ones."""
    new = {"task": "rte", "method": ["lora", "cola"], "chain.length": [2, 3], "lr": [5e-4, 1e-4], "seed": [0]}
    old = {"task": "rte", "method": ["lora", "cola"], "chain_length": [2, 3], "learning_rate": [5e-4, 1e-4]}
    assert expand_grid(new, {}) == expand_grid({**old, "seed": [0]}, {})
    assert [r.name for r in expand_grid(new, {})][:2] == [
        "rte/lora/default-lr5e-4/seed0",
        "rte/lora/default-lr1e-4/seed0",
    ]
    with pytest.raises(ConfigError, match="given twice"):
        expand_grid({**new, "learning_rate": [1e-3]}, {})


def test_a_plan_written_with_the_old_axis_names_still_loads_and_reports(tmp_path):
    root = tmp_path / "old"
    spec = expand_grid({"task": "cb", "method": "cola", "chain.length": 2, "lr": 5e-4, "seed": 0}, {})[0]
    old_entry = spec.to_json()
    old_entry["learning_rate"] = old_entry.pop("lr")  # how sweep_plan.json spelled it before
    assert RunSpec.from_json(old_entry) == spec
    (root / spec.name).mkdir(parents=True)
    (root / spec.name / "metrics.json").write_text(json.dumps({"dev_score": 0.7, "test_score": 0.6}))
    plan = {"base": {}, "grid": {"task": "cb", "chain_length": 2, "learning_rate": 5e-4}, "runs": [old_entry]}
    (root / PLAN_FILE).write_text(json.dumps(plan))
    (result,) = load_sweep(root).results
    assert (result.name, result.lr, result.chain_length) == (spec.name, 5e-4, 2)
    assert "| 5e-4 |" in write_report(root).read_text()


def test_the_command_line_overrides_the_sweep_block_field_by_field(tmp_path, fake_python, capsys):
    from chainlora.cli import main

    python, calls = fake_python
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_small_sweep(tmp_path, python, workers=1, env={"A": 1})))
    assert main(["sweep", str(path), "--workers", "2", "--dry_run"]) == 0
    assert "--output_dir" in capsys.readouterr().out and calls() == []  # a dry run starts nothing
    options = json.loads((tmp_path / "sweep" / PLAN_FILE).read_text())["options"]
    assert options["workers"] == 2 and options["python"] == str(python) and options["env"] == {"A": "1"}
    assert not options["report"] and options["output_dir"] == str(tmp_path / "sweep")  # from the YAML


def test_train_command_and_worker_env(tmp_path):
    cfg = sweep_config_from_dict(
        {
            "base": {"lr": 1e-4},
            "grid": {"task": "cb", "method": "cola", "chain.length": 2, "ranks": [[8, 2]], "seed": 3},
            "sweep": {"output_dir": str(tmp_path), "workers": 2, "devices": "0,1", "env": {"A": 1}},
        }
    )
    (spec,) = cfg.runs()
    cmd = train_command(spec, tmp_path / "base.yaml", tmp_path / spec.name, "py")
    assert cmd[:6] == ["py", "-m", "chainlora", "train", "--config", str(tmp_path / "base.yaml")]
    args = dict(zip(cmd[6::2], cmd[7::2], strict=True))
    assert args["--chain.ranks"] == "[8, 2]" and args["--lr"] == "0.0001" and args["--seed"] == "3"
    assert args["--output_dir"] == str(tmp_path / spec.name)
    env0, env1, env2 = (worker_env(i, cfg.options, {}) for i in range(3))
    assert (env0["CUDA_VISIBLE_DEVICES"], env1["CUDA_VISIBLE_DEVICES"], env2["CUDA_VISIBLE_DEVICES"]) == (
        "0",
        "1",
        "0",
    )
    assert env0["A"] == "1" and int(env0["OMP_NUM_THREADS"]) >= 1


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_sweep_config_parses(path):
    from chainlora.config import TrainConfig

    cfg = load_sweep_config(path)
    runs = cfg.runs()
    assert runs and len({r.name for r in runs}) == len(runs)
    for spec in runs[:: max(1, len(runs) // 7)]:  # a sample of runs validates as a TrainConfig
        data = json.loads(json.dumps(cfg.base))
        for key, value in spec.overrides:
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        TrainConfig.from_dict(data)


def test_shipped_configs_cover_the_papers_tables():
    stems = {p.stem for p in SWEEP_CONFIGS}
    for table in ("table1_main", "table3_chain_length", "table4_rank_stepdown", "table5_optimizers"):
        assert table in stems
    assert {"table6_low_data", "table8_ranks"} <= stems
    assert any(s.startswith("cpu_") for s in stems)


# ------------------------------------------------------------------------------------------- the runner

FAKE_TRAIN = """\
#!{python}
# Stands in for `python -m chainlora train`: logs its argv, fakes a score, writes metrics.json last.
import json, os, sys, time
from pathlib import Path
argv = sys.argv[1:]
assert argv[:3] == ["-m", "chainlora", "train"], argv
args, i = {{}}, 3
while i < len(argv):
    args[argv[i][2:]] = argv[i + 1]
    i += 2
out = Path(args["output_dir"])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"run": str(out), "resume": args.get("resume")}}) + "\\n")
if os.environ.get("FAKE_FAIL", "~") in str(out):
    sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text("method: " + args["method"] + "\\n")
if os.environ.get("FAKE_SLEEP", "~") in str(out):
    time.sleep(60)
lr, seed = float(args["lr"]), int(args["seed"])
score = 0.5 + 0.1 * (args["method"] == "cola") + seed / 100 - abs(lr - 5e-4)
(out / "metrics.json").write_text(json.dumps({{"task": args["task"], "method": args["method"],
    "seed": seed, "dev_score": score, "test_score": score, "train_flops": 1e12, "train_seconds": 1.0,
    "knots": []}}))
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    script = tmp_path / "fake_python"
    script.write_text(FAKE_TRAIN.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return script, calls


def _small_sweep(tmp_path: Path, python: Path, **options) -> dict:
    return {
        "base": {"model": "tiny", "epochs": 1},
        "grid": {
            "task": ["cb"],
            "method": ["lora", "cola"],
            "chain.length": [2],
            "lr": [5e-4, 1e-4],
            "seed": [0, 1],
        },
        "sweep": {"output_dir": str(tmp_path / "sweep"), "python": str(python), "report": False, **options},
    }


def test_sweep_runs_skips_finished_and_records_failures(tmp_path, fake_python, monkeypatch):
    python, calls = fake_python
    cfg = sweep_config_from_dict(_small_sweep(tmp_path, python))
    monkeypatch.setenv("FAKE_FAIL", "cola-L2/default-lr1e-4/seed1")
    summary = run_sweep(cfg, echo=lambda m: None)
    assert summary.count("done") == 7 and summary.count("failed") == 1
    state = json.loads((tmp_path / "sweep" / STATE_FILE).read_text())
    failed = state["runs"]["cb/cola-L2/default-lr1e-4/seed1"]
    assert failed["status"] == "failed" and "exit code 3" in failed["error"]
    assert Path(failed["log"]).is_file()
    assert len(calls()) == 8

    monkeypatch.delenv("FAKE_FAIL")
    summary = run_sweep(cfg, echo=lambda m: None)  # again: only the failed run runs
    assert summary.ok and summary.count("done") == 1 and summary.count("skipped") == 7
    assert [c["run"].endswith("cola-L2/default-lr1e-4/seed1") for c in calls()[8:]] == [True]
    assert json.loads((tmp_path / "sweep" / PLAN_FILE).read_text())["runs"][0]["name"] == (
        "cb/lora/default-lr5e-4/seed0"
    )


def test_sweep_resumes_unfinished_runs_of_a_killed_sweep(tmp_path, fake_python):
    python, calls = fake_python
    cfg = sweep_config_from_dict(_small_sweep(tmp_path, python))
    root = tmp_path / "sweep"
    names = [s.name for s in cfg.runs()]
    # what a killed sweep leaves: one finished run, one with a checkpoint, one with only a stray file
    finished, with_ckpt, stray = root / names[0], root / names[1], root / names[2]
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"dev_score": 0.9, "test_score": 0.9}))
    (with_ckpt / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (with_ckpt / "config.yaml").write_text("method: lora\n")
    stray.mkdir(parents=True)
    (stray / "half-written.bin").write_text("x")
    summary = run_sweep(cfg, echo=lambda m: None)
    assert summary.ok and summary.count("skipped") == 1 and summary.count("done") == len(names) - 1
    by_run = {Path(c["run"]).relative_to(root).as_posix(): c for c in calls()}
    assert names[0] not in by_run  # finished: never started again
    assert by_run[names[1]]["resume"] == str(with_ckpt)  # continued from its checkpoint
    assert by_run[names[2]]["resume"] is None and not (stray / "half-written.bin").exists()  # restarted clean
    assert summary.outcomes[names[1]].resumed


def test_sigterm_stops_the_sweep_and_the_same_command_continues_it(tmp_path, fake_python):
    python, calls = fake_python
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(_small_sweep(tmp_path, python)))
    env = {**os.environ, "FAKE_SLEEP": "cola-L2/default-lr5e-4/seed0"}
    code = "import sys; from chainlora.cli import main; sys.exit(main(['sweep', sys.argv[1]]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], env=env, start_new_session=True)
    root = tmp_path / "sweep"
    # the sweep imports torch before its first run: tens of seconds on cores shared with other jobs
    deadline = time.time() + 120
    while time.time() < deadline and not any("cola-L2/default-lr5e-4/seed0" in c["run"] for c in calls()):
        time.sleep(0.1)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert not (root / "cb/cola-L2/default-lr5e-4/seed0/metrics.json").exists()
    done_before = {p.parent for p in root.rglob("metrics.json")}
    assert 0 < len(done_before) < 8
    summary = run_sweep(load_sweep_config(cfg_path), echo=lambda m: None)  # no sleep now
    assert summary.ok and summary.count("skipped") == len(done_before)
    assert len(list(root.rglob("metrics.json"))) == 8
    interrupted = [c for c in calls() if c["run"].endswith("cola-L2/default-lr5e-4/seed0")]
    assert interrupted[-1]["resume"] is not None  # it had written a checkpoint: resumed


def test_a_locked_run_is_left_to_its_owner(tmp_path, fake_python):
    import fcntl

    python, _ = fake_python
    cfg = sweep_config_from_dict(_small_sweep(tmp_path, python, workers=2))
    runner = SweepRunner(cfg, echo=lambda m: None)
    name = runner.specs[0].name
    lock = tmp_path / "sweep" / ".locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        summary = runner.run()
    assert summary.outcomes[name].status == "busy" and summary.count("done") == 7


def test_plan_grows_with_the_grid_but_the_base_config_is_fixed(tmp_path, fake_python):
    python, _ = fake_python
    raw = _small_sweep(tmp_path, python, cleanup=["checkpoints"])
    run_sweep(sweep_config_from_dict(raw), echo=lambda m: None)
    root = tmp_path / "sweep"
    assert not list(root.rglob("checkpoints")) and len(list(root.rglob("metrics.json"))) == 8  # cleaned up
    raw["grid"]["task"] = ["rte"]  # another grid into the same folder: the plan keeps both
    run_sweep(sweep_config_from_dict(raw), echo=lambda m: None)
    plan = json.loads((root / PLAN_FILE).read_text())
    assert {r["task"] for r in plan["runs"]} == {"cb", "rte"} and len(plan["runs"]) == 16
    raw["base"]["epochs"] = 2  # finished runs would silently stand for other settings: refused
    with pytest.raises(ConfigError, match="base config differs"):
        run_sweep(sweep_config_from_dict(raw), echo=lambda m: None)


# ------------------------------------------------------------------------------------------- the report


def _fabricate(
    tmp_path: Path,
    scores: dict[str, tuple[float, float]],
    grid: dict,
    folder: str = "sw",
    base: dict | None = None,
) -> Path:
    """A sweep folder whose plan comes from the real runner and whose metrics.json are given (dev, test)."""
    spec = {"base": base or {}, "grid": grid, "sweep": {"output_dir": str(tmp_path / folder)}}
    cfg = sweep_config_from_dict(spec)
    SweepRunner(cfg, echo=lambda m: None).write_plan()
    for name, (dev, test) in scores.items():
        run = tmp_path / folder / name
        run.mkdir(parents=True)
        flops = 6e12 if "-r8-2" in name else 8e12
        (run / "metrics.json").write_text(
            json.dumps({"dev_score": dev, "test_score": test, "train_flops": flops, "train_seconds": 2.0})
        )
        (run / "config.yaml").write_text("selection: dev_loss\n")
    return tmp_path / folder


GRID = {
    "task": ["sst2", "rte"],
    "method": ["lora", "cola", "full"],
    "chain.length": [3],
    "ranks": [[8]],
    "optimizer": ["adamw"],
    "lr": {"lora": [5e-4, 1e-4], "cola": [5e-4, 1e-4], "full": [1e-5]},
    "seed": [0, 1, 2],
}
# test scores per (task, tag, lr): seeds 0, 1, 2; dev scores decide the LR
TEST = {
    ("sst2", "lora-r8", "5e-4"): [0.80, 0.82, 0.84],
    ("sst2", "lora-r8", "1e-4"): [0.99, 0.99, 0.99],  # best test, worse dev: must NOT be chosen
    ("sst2", "cola-L3-r8", "5e-4"): [0.83, 0.84, 0.88],
    ("sst2", "cola-L3-r8", "1e-4"): [0.70, 0.70, 0.70],
    ("sst2", "full", "1e-5"): [0.81, 0.81, 0.81],
    ("rte", "lora-r8", "5e-4"): [0.60, 0.62, 0.58],
    ("rte", "lora-r8", "1e-4"): [0.55, 0.55, 0.55],
    ("rte", "cola-L3-r8", "5e-4"): [0.50, 0.50, 0.50],
    ("rte", "cola-L3-r8", "1e-4"): [0.59, 0.61, 0.60],
    ("rte", "full", "1e-5"): [0.65, 0.66, 0.70],
}
DEV = {
    ("sst2", "lora-r8", "1e-4"): 0.5,
    ("sst2", "cola-L3-r8", "1e-4"): 0.6,
    ("rte", "cola-L3-r8", "5e-4"): 0.4,
}


def _fabricated_sweep(tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    scores = {}
    for (task, tag, lr), tests in TEST.items():
        for seed, test in enumerate(tests):
            name = f"{task}/{tag}/adamw-lr{lr}/seed{seed}"
            if name not in drop:
                scores[name] = (DEV.get((task, tag, lr), 0.7), test)
    return _fabricate(tmp_path, scores, GRID)


def test_best_learning_rate_per_cell_uses_the_mean_dev_score_only(tmp_path):
    data = load_sweep(_fabricated_sweep(tmp_path))
    chosen = {(t, v[0]): s.chosen_lr for (t, v, _), s in select_learning_rates(data.results).items()}
    assert chosen == {
        ("sst2", "lora"): 5e-4,  # 1e-4 has the best test score but the worse dev score
        ("sst2", "cola"): 5e-4,
        ("sst2", "full"): 1e-5,
        ("rte", "lora"): 1e-4,  # dev tie (0.7 = 0.7): the smaller rate
        ("rte", "cola"): 1e-4,
        ("rte", "full"): 1e-5,
    }


def test_report_tables_numbers_gain_and_bold(tmp_path):
    root = _fabricated_sweep(tmp_path)
    report = SweepResults.from_sweep(load_sweep(root))
    assert report.scale == 100.0
    (group,) = report.groups
    table = main_table(report, group)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # sst2 LoRA @5e-4: 80, 82, 84 -> 82.00 ± 2.00; COLA: 83, 84, 88 -> 85.00 ± 2.65 (bold, best)
    assert "| 82.00 ± 2.00 |" in rows["LoRA"]
    assert f"**85.00 ± {stats.tstd([83, 84, 88]):.2f}**" in rows["COLA (L=3)"]
    # rte: LoRA @1e-4 55 ± 0; COLA @1e-4 60 ± 1; full 67 ± 2.65 (bold)
    assert "| 55.00 ± 0.00 |" in rows["LoRA"] and "| 60.00 ± 1.00 |" in rows["COLA (L=3)"]
    assert f"**67.00 ± {stats.tstd([65, 66, 70]):.2f}**" in rows["Full FT"]
    gain = rows["gain of COLA (L=3) over LoRA"]
    assert f"{100 * (85 - 82) / 82:+.2f}%" in gain and f"{100 * (60 - 55) / 55:+.2f}%" in gain
    avg_cola, avg_lora = (85 + 60) / 2, (82 + 55) / 2
    assert f"{100 * (avg_cola - avg_lora) / avg_lora:+.2f}%" in gain
    assert rows["Full FT"].endswith("| **74.00** |")  # average column: best of (68.5, 72.5, 74.0)
    assert rows["COLA (L=3)"].endswith("| 72.50 |")

    out = write_report(root)
    text = out.read_text()
    assert "highest mean **dev** score" in text and "dev_loss" in text
    assert (root / "plots" / "main.png").stat().st_size > 1000
    assert "| sst2 | LoRA (r=8) | optimizer adamw | 1e-4: 50.00 (3); 5e-4: 70.00 (3) | 5e-4 |" in text


def test_zero_shot_row_is_one_value_per_seed(tmp_path):
    root = _fabricated_sweep(tmp_path)
    for metrics in root.glob("sst2/*/*/seed*/metrics.json"):
        data = json.loads(metrics.read_text())
        data["zero_shot_test_score"] = {"0": 0.5, "1": 0.6, "2": 0.7}[metrics.parent.name[-1]]
        metrics.write_text(json.dumps(data))
    results = SweepResults.from_sweep(load_sweep(root))
    table = main_table(results, results.groups[0])
    row = next(line for line in table.splitlines() if line.startswith("| 0-shot"))
    assert "| 60.00 ± 10.00 | – | – |" in row


def test_cola_runs_tested_before_their_first_knot_are_counted(tmp_path):
    root = _fabricated_sweep(tmp_path)
    for metrics in root.glob("*/cola-L3-r8/*/seed*/metrics.json"):
        data = json.loads(metrics.read_text())
        data["knots"] = [{"step": 4, "link": 1, "next_rank": 8}, {"step": 8, "link": 2, "next_rank": 8}]
        data["selected_step"] = 4 if metrics.parent.name == "seed0" else 12
        metrics.write_text(json.dumps(data))
    report = SweepResults.from_sweep(load_sweep(root))
    ((variant, _, _),) = paired_comparisons(report, report.groups[0])
    assert runs_tested_before_first_knot(report, variant, report.groups[0]) == (
        2,
        6,
    )  # seed 0 of sst2 and rte
    assert "2 of 6 COLA (L=3, r=8) runs were tested" in paired_table(report, report.groups[0])


def _log_losses(metrics: Path, last_epoch_loss: float, **fields: object) -> None:
    """Give a fabricated run 12 steps in 3 epochs, the last epoch at ``last_epoch_loss`` (and ``fields``)."""
    data = json.loads(metrics.read_text())
    data |= {
        "train_steps": 12,
        "epochs": 3,
        "train_loss": [[s, 2.0 if s <= 8 else last_epoch_loss] for s in range(1, 13)],
        **fields,
    }
    metrics.write_text(json.dumps(data))


def test_end_of_budget_pairs_runs_of_equal_lr_and_seed_at_their_last_step(tmp_path):
    """Whatever step selection picked, COLA and LoRA of the same lr and seed are compared at their last step:
    the last epoch's mean training loss (steps 9..12 of 12 in 3 epochs), the last dev evaluation."""
    root = _fabricated_sweep(tmp_path)
    expected: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
    for metrics in root.glob("*/*/*/seed*/metrics.json"):
        task, tag, lr_dir, seed_dir = metrics.parent.relative_to(root).parts
        if tag == "full":
            continue
        seed, lr = int(seed_dir[-1]), float(lr_dir.removeprefix("adamw-lr"))
        cola = tag.startswith("cola")
        # LoRA's loss falls to 1.0; COLA's last epoch sits 0.1·(seed+1) higher (seed 2 of rte: lower)
        offset = (0.1 * (seed + 1) if (task, seed) != ("rte", 2) else -0.05) if cola else 0.0
        _log_losses(
            metrics,
            1.0 + offset,
            selected_step=4,  # the selected state is not what is compared
            dev_history=[
                {"step": 4, "dev_loss": 9.0, "dev_score": 0.1},
                {"step": 12, "dev_loss": 0.5 + offset, "dev_score": 0.6 + (0.02 if cola else 0.0)},
            ],
        )
        if cola:
            expected.setdefault((task, lr), []).append((offset, offset, 2.0))
    results = SweepResults.from_sweep(load_sweep(root))
    ((variant, base, per),) = end_of_budget_pairs(results, results.groups[0])
    assert variant[0] == "cola" and base[0] == "lora"
    assert set(per) == set(expected)
    for key, measures in per.items():
        diffs = {name: [a - b for a, b in zip(*pair, strict=True)] for name, pair in measures.items()}
        want = sorted(expected[key])
        assert sorted(zip(diffs["train_loss"], diffs["dev_loss"], diffs["dev_score"], strict=True)) == [
            pytest.approx(w) for w in want
        ]
    table = end_of_budget_table(results, results.groups[0])
    assert "| sst2 | 5e-4 | 3 | +0.2000 [" in table  # seeds 0..2: +0.1, +0.2, +0.3
    assert "lower training loss in 2 of 12 pairs, the higher in 10" in table  # rte seed 2 at both lrs
    pooled = [0.1, 0.2, 0.3] * 2 + [0.1, 0.2, -0.05] * 2  # COLA − LoRA over both lrs of both tasks
    interval = stats.ttest_1samp(pooled, 0.0).confidence_interval()
    assert interval.low > 0
    assert (
        f"(mean {sum(pooled) / 12:+.4f}, 95% CI {interval.low:+.4f}..{interval.high:+.4f}): "
        "the chain fits the training data worse" in table
    )
    assert "## At the end of the budget" in write_report(root).read_text()


def test_end_of_budget_is_unknown_without_a_last_step_evaluation(tmp_path):
    root = _fabricated_sweep(tmp_path)
    results = SweepResults.from_sweep(load_sweep(root))  # the fabricated runs log no losses
    assert end_of_budget_pairs(results, results.groups[0]) == []
    assert "## At the end of the budget" not in write_report(root).read_text()
    run = results.data.results[0]
    run.metrics |= {"train_steps": 10, "epochs": 2, "dev_history": [{"step": 5, "dev_loss": 1.0}]}
    end = run.end_of_budget  # no evaluation at step 10, no loss log
    assert (end.train_loss, end.dev_loss, end.dev_score) == (None, None, None)


def test_a_control_sweep_is_reported_with_the_runs_it_reuses(tmp_path):
    """A follow-up sweep (COLA under the jagged schedule, one task, one lr) merged with the main sweep: only the
    main runs of its task and setting join; the jagged chain is its own variant, paired with linear LoRA."""
    main = _fabricated_sweep(tmp_path)
    grid = {**GRID, "task": ["sst2"], "method": ["cola"], "lr_schedule": ["jagged"], "lr": [5e-4]}
    names = [f"sst2/cola-L3-r8-schedjagged/adamw-lr5e-4/seed{s}" for s in range(3)]
    control = _fabricate(
        tmp_path, {n: (0.7, 0.9) for n in names}, grid, folder="control", base={"warmup": 0.2}
    )
    for metrics in [*control.glob("*/*/*/seed*/metrics.json"), *main.glob("sst2/*/*/seed*/metrics.json")]:
        tag = metrics.parent.parent.parent.name
        # every jagged run is tested before its first knot
        knots = {"knots": [{"step": 8}], "selected_step": 4} if metrics.is_relative_to(control) else {}
        _log_losses(metrics, {"cola-L3-r8-schedjagged": 0.9, "cola-L3-r8": 1.3}.get(tag, 1.0), **knots)

    data = load_sweep(control, merge=[main])
    assert {r.task for r in data.results} == {"sst2"}  # rte shares no setting with the control
    assert len(data.results) == 3 + 5 * 3 and [(j.root, j.runs) for j in data.merged] == [(str(main), 15)]
    results = SweepResults.from_sweep(data)
    (group,) = results.groups
    jagged = Variant("cola", 3, (8,), "jagged")
    assert results.variants(group) == [
        Variant("lora", 1, (8,)), Variant("cola", 3, (8,)), jagged, Variant("full", None, None)
    ]  # fmt: skip
    assert lora_baseline(jagged, results.variants(group)) == Variant("lora", 1, (8,))
    pairs = {v: per for v, _, per in end_of_budget_pairs(results, group)}
    assert set(pairs[jagged]) == {("sst2", 5e-4)}  # the control ran one lr
    mine, lora = pairs[jagged]["sst2", 5e-4]["train_loss"]
    assert mine == pytest.approx([0.9] * 3) and lora == pytest.approx([1.0] * 3)
    assert set(pairs[Variant("cola", 3, (8,))]) == {("sst2", 5e-4), ("sst2", 1e-4)}
    assert list(results.chain_length_series(group).values()) == [
        [Variant("lora", 1, (8,)), Variant("cola", 3, (8,))]
    ]

    text = write_report(control, merge=[main]).read_text()
    assert "- runs: 3 finished of 3 planned" in text
    assert (
        f"- joined from `{main}`: 15 finished runs of the same tasks and settings; **the two sweeps' base "
        "settings differ**: warmup = 0.2 here, default there"
    ) in text
    assert "COLA (L=3, jagged LR)" in text
    assert (
        "3 of 3 COLA (L=3, r=8, jagged LR) runs were tested at a state from before their first knot" in text
    )
    assert "decays to 0 at the knot (the jagged schedule), so not the LoRA run's state" in text
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(control, merge=[tmp_path / "nowhere"])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / PLAN_FILE).write_bytes(b"\xff\xfe{not json")  # not UTF-8
    with pytest.raises(ConfigError, match=f"{PLAN_FILE}: unreadable"):
        load_sweep(control, merge=[damaged])
    for path in control.glob("*/*/*/seed*/config.yaml"):  # a run's damaged config reads as absent
        path.write_bytes(b"\xff\xfe: [")
    assert len(load_sweep(control).results) == 3


@pytest.mark.parametrize("where", ["base", "grid"])
def test_a_chain_that_keeps_optimizer_state_is_a_variant_paired_with_lora(tmp_path, where):
    """``chain.optimizer_reset`` below 1, set in the control sweep's base or as a grid axis: its COLA runs are a
    variant of their own ("optimizer reset 0.9"), in the same setting as the main sweep's LoRA, and paired with it;
    never pooled with the paper's COLA."""
    main = _fabricated_sweep(tmp_path)
    grid = {**GRID, "task": ["sst2"], "method": ["cola"], "lr": [5e-4]}
    base = {}
    if where == "grid":
        grid["chain.optimizer_reset"] = [0.9]
    else:
        base = {"chain": {"optimizer_reset": 0.9}}
    names = [
        f"sst2/cola-L3-r8{'-optreset9e-1' if where == 'grid' else ''}/adamw-lr5e-4/seed{s}" for s in range(3)
    ]
    control = _fabricate(tmp_path, {n: (0.7, 0.9) for n in names}, grid, folder="control", base=base)
    for config in control.glob("*/*/*/seed*/config.yaml"):  # what `chainlora train` writes for these runs
        config.write_text(yaml.safe_dump({"selection": "dev_loss", "chain": {"optimizer_reset": 0.9}}))
    for metrics in [*control.glob("*/*/*/seed*/metrics.json"), *main.glob("sst2/*/*/seed*/metrics.json")]:
        _log_losses(metrics, 0.9 if metrics.is_relative_to(control) else 1.0)
    results = SweepResults.from_sweep(load_sweep(control, merge=[main]))
    (group,) = results.groups
    kept = Variant("cola", 3, (8,), None, 0.9)
    assert results.variants(group) == [
        Variant("lora", 1, (8,)), Variant("cola", 3, (8,)), kept, Variant("full", None, None)
    ]  # fmt: skip
    assert {r.variant for r in results.data.results if r.joined_from is None} == {kept}
    # the main sweep's runs of the same task and setting join, the paper's COLA runs of the same names included
    joined = [r for r in results.data.results if r.joined_from == str(main)]
    assert sorted(Counter(r.variant.method for r in joined).items()) == [
        ("cola", 6),
        ("full", 3),
        ("lora", 6),
    ]
    assert not results.data.missing
    assert lora_baseline(kept, results.variants(group)) == Variant("lora", 1, (8,))
    pairs = {v: per for v, _, per in end_of_budget_pairs(results, group)}
    assert set(pairs[kept]) == {("sst2", 5e-4)}
    mine, lora = pairs[kept]["sst2", 5e-4]["train_loss"]
    assert mine == pytest.approx([0.9] * 3) and lora == pytest.approx([1.0] * 3)
    assert list(results.chain_length_series(group).values()) == [
        [Variant("lora", 1, (8,)), Variant("cola", 3, (8,))]
    ]
    text = write_report(control, merge=[main]).read_text()
    assert "COLA (L=3, r=8, optimizer reset 0.9)" in text
    assert "| `sst2/cola-L3-r8/adamw-lr5e-4/seed0` (joined from `sw`) |" in text
    if where == "base":  # a rerun of the paper's COLA under those names keeps its own runs: no namesake joins
        for config in control.glob("*/*/*/seed*/config.yaml"):
            config.write_text(yaml.safe_dump({"selection": "dev_loss", "chain": {"optimizer_reset": 1.0}}))
        data = load_sweep(control, merge=[main])
        joined_cola = {r.name for r in data.results if r.joined_from and r.variant.method == "cola"}
        assert len(joined_cola) == 3 and joined_cola.isdisjoint(names)  # only the lr the control did not run
        # nor does one whose name the control still has to run: it would stand in for the run to come
        for config in control.glob("*/*/*/seed*/config.yaml"):
            config.write_text(yaml.safe_dump({"selection": "dev_loss", "chain": {"optimizer_reset": 0.9}}))
        (control / names[2] / "metrics.json").unlink()
        data = load_sweep(control, merge=[main])
        assert [s.name for s in data.missing] == [names[2]]
        assert names[2] not in {r.name for r in data.results}


def test_runs_without_a_plan_are_placed_by_their_own_config(tmp_path):
    """A folder of runs with no sweep plan: each run's grid position comes from its config.yaml and metrics.json,
    and a jagged chain, or one that keeps optimizer state, stays apart from the paper's of the same lr and seed."""
    runs = (("lora", "linear", 1.0, 0.6), ("cola", "linear", 1.0, 0.7), ("cola-j", "jagged", 1.0, 0.8),
            ("cola-k", "linear", 0.0, 0.9))  # fmt: skip
    for tag, schedule, reset, test in runs:
        run = tmp_path / "runs" / tag
        run.mkdir(parents=True)
        method = tag.split("-")[0]
        (run / "metrics.json").write_text(json.dumps({"task": "rte", "dev_score": 0.5, "test_score": test}))
        (run / "config.yaml").write_text(
            yaml.safe_dump({"method": method, "seed": 1, "lr": 5e-4, "optimizer": "adamw", "lr_schedule": schedule,
                            "lora": {"r": 8}, "chain": {"length": 3 if method == "cola" else 1,
                                                        "optimizer_reset": reset}})
        )  # fmt: skip
    results = SweepResults.from_sweep(load_sweep(tmp_path / "runs"))
    scores = {r.variant: (r.name, r.test_score) for r in results.data.results}
    assert scores == {
        Variant("lora", 1, (8,)): ("rte/lora-r8/adamw-lr5e-4/seed1", 0.6),
        Variant("cola", 3, (8,)): ("rte/cola-L3-r8/adamw-lr5e-4/seed1", 0.7),
        Variant("cola", 3, (8,), "jagged"): ("rte/cola-L3-r8-schedjagged/adamw-lr5e-4/seed1", 0.8),
        Variant("cola", 3, (8,), None, 0.0): (
            "rte/cola-L3-r8-optreset0/adamw-lr5e-4/seed1",
            0.9,
        ),
    }
    assert len(results.groups) == 1


def test_report_marks_missing_seeds_and_lists_unfinished_runs(tmp_path):
    root = _fabricated_sweep(tmp_path, drop=("sst2/full/adamw-lr1e-5/seed2",))
    text = write_report(root).read_text()
    assert "81.00 ± 0.00 (n=2)" in text
    assert "29 finished of 30 planned" in text and "`sst2/full/adamw-lr1e-5/seed2`" in text


def test_a_learning_rate_chosen_from_an_unfinished_grid_is_provisional_and_kept_out_of_the_pairs(tmp_path):
    """A partial sweep: sst2 COLA has one seed at 1e-4, with a dev score above the finished 5e-4 seeds. That
    rate wins for now, but its choice is provisional (†) and sst2 stays out of the paired comparison until the
    cell's grid is finished; a failed run does not hold a cell back."""
    unfinished = ("sst2/cola-L3-r8/adamw-lr1e-4/seed1", "sst2/cola-L3-r8/adamw-lr1e-4/seed2")
    root = _fabricated_sweep(tmp_path, drop=unfinished)
    for metrics in root.glob("sst2/cola-L3-r8/adamw-lr1e-4/seed0/metrics.json"):
        metrics.write_text(json.dumps({"dev_score": 0.95, "test_score": 0.70}))
    results = SweepResults.from_sweep(load_sweep(root))
    (group,) = results.groups
    cola = Variant("cola", 3, (8,))
    sel = results.selected["sst2", cola, group]
    assert (sel.chosen_lr, sel.pending) == (1e-4, 2)
    assert ("sst2", cola, group) not in results.final and ("rte", cola, group) in results.final
    ((_, _, per),) = paired_comparisons(results, group)
    assert set(per) == {"rte", "all tasks (pooled pairs)"} and per["all tasks (pooled pairs)"].n == 3
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table(results, group).splitlines()}
    assert rows["COLA (L=3)"] == "| COLA (L=3) | 70.00 (n=1) † | 60.00 ± 1.00 | 65.00 † |"
    assert "† |" in rows["gain of COLA (L=3) over LoRA"] and "†" not in rows["LoRA"]
    text = write_report(root).read_text()
    assert (
        "| sst2 | COLA (L=3, r=8) | optimizer adamw | 1e-4: 95.00 (1); 5e-4: 70.00 (3) | 1e-4 † (2 to run) |"
        in text
    )
    assert "- † learning rate provisional in 1 of 6 cells" in text

    state = json.loads((root / STATE_FILE).read_text()) if (root / STATE_FILE).exists() else {}
    state.setdefault("runs", {}).update({n: {"status": "failed", "error": "OOM"} for n in unfinished})
    (root / STATE_FILE).write_text(json.dumps(state))
    results = SweepResults.from_sweep(load_sweep(root))
    assert results.selected["sst2", cola, group].pending == 0 and ("sst2", cola, group) in results.final
    assert "†" not in write_report(root).read_text()  # nothing provisional: no mark, no legend

    # merged: a joined cell is provisional while the sweep it comes from has runs of it still to run
    for name in unfinished:
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps({"dev_score": 0.5, "test_score": 0.5}))
    (root / STATE_FILE).unlink()
    control_names = [f"sst2/cola-L3-r8-schedjagged/adamw-lr5e-4/seed{s}" for s in range(3)]
    grid = {**GRID, "task": ["sst2"], "method": ["cola"], "lr_schedule": ["jagged"], "lr": [5e-4]}
    control = _fabricate(tmp_path, {n: (0.7, 0.9) for n in control_names}, grid, folder="control")
    (root / "sst2/lora-r8/adamw-lr1e-4/seed2/metrics.json").unlink()
    joined = SweepResults.from_sweep(load_sweep(control, merge=[root]))
    pending = {cell[1].method: sel.pending for cell, sel in joined.selected.items() if sel.pending}
    assert pending == {"lora": 1}


def test_a_sweep_of_several_settings_gets_one_bottom_line_over_all_of_them(tmp_path):
    """Two optimizers (two settings, one main table each): per setting the pooled pairs, then every pair of
    both settings in one paired test with its bottom line."""
    grid = {
        **GRID,
        "task": ["sst2", "rte"],
        "method": ["lora", "cola"],
        "optimizer": ["adamw", "sgd"],
        "lr": [5e-4],
    }
    cola_minus_lora = {"adamw": [1, 2, 0], "sgd": [-1, 3, 4]}  # test points, seeds 0-2 (same on both tasks)
    scores = {}
    for task in ("sst2", "rte"):
        for opt, diffs in cola_minus_lora.items():
            for seed, diff in enumerate(diffs):
                base = 0.60 + 0.01 * seed
                scores[f"{task}/lora-r8/{opt}-lr5e-4/seed{seed}"] = (0.7, base)
                scores[f"{task}/cola-L3-r8/{opt}-lr5e-4/seed{seed}"] = (0.7, base + diff / 100)
    root = _fabricate(tmp_path, scores, grid)
    results = SweepResults.from_sweep(load_sweep(root))
    assert len(results.groups) == 2
    ((variant, base, per),) = paired_scores_over_settings(results)
    assert (variant.method, base.method) == ("cola", "lora")
    assert list(per) == ["optimizer adamw", "optimizer sgd", "all settings (pooled pairs)"]
    cola, lora = per["all settings (pooled pairs)"]
    diffs = [round(x - y, 6) for x, y in zip(cola, lora, strict=True)]
    assert sorted(diffs) == sorted([1, 2, 0, -1, 3, 4] * 2)
    ref = stats.ttest_rel(cola, lora)
    text = write_report(root).read_text()
    assert "## Paired comparison over all settings, COLA vs LoRA" in text
    row = next(line for line in text.splitlines() if line.startswith("| all settings (pooled pairs) |"))
    assert row.startswith("| all settings (pooled pairs) | 12 | +1.50 |") and f"| {ref.pvalue:.3f} |" in row
    assert "**Bottom line over all settings: COLA (L=3, r=8) − LoRA (r=8) = +1.50 points over 12" in text
    one = _fabricated_sweep(tmp_path / "one")  # a sweep of one setting: its pooled row already is the answer
    assert paired_scores_over_settings(SweepResults.from_sweep(load_sweep(one))) == []
    assert "over all settings" not in write_report(one).read_text()


def test_paired_tests_match_scipy(tmp_path):
    a, b = [85.0, 83.0, 88.0, 79.0], [82.0, 84.0, 80.0, 79.0]
    p = paired_difference(a, b)
    ref = stats.ttest_rel(a, b)
    assert math.isclose(p.pvalue, ref.pvalue)
    assert (p.wins, p.losses, p.ties) == (2, 1, 1)
    assert math.isclose(p.sign_pvalue, stats.binomtest(2, 3, 0.5).pvalue)
    assert math.isclose(p.mean, (3 - 1 + 8 + 0) / 4)
    assert paired_difference([1.0, 2.0], [1.0, 2.0]).sign_pvalue is None  # every pair tied: no sign test

    report = SweepResults.from_sweep(load_sweep(_fabricated_sweep(tmp_path)))
    ((variant, base, per),) = paired_comparisons(report, report.groups[0])
    assert variant[0] == "cola" and base[0] == "lora"
    sst2_cola, sst2_lora = [83, 84, 88], [80, 82, 84]
    rte_cola, rte_lora = [59, 61, 60], [55, 55, 55]
    ref = stats.ttest_rel(sst2_cola, sst2_lora)
    assert math.isclose(per["sst2"].pvalue, ref.pvalue, rel_tol=1e-9)
    pooled = stats.ttest_rel(sst2_cola + rte_cola, sst2_lora + rte_lora)
    assert math.isclose(per["all tasks (pooled pairs)"].pvalue, pooled.pvalue, rel_tol=1e-9)
    assert math.isclose(per["all tasks (pooled pairs)"].sign_pvalue, stats.binomtest(6, 6).pvalue)


def test_chain_length_and_rank_stepdown_tables(tmp_path):
    grid = [
        {"task": "cb", "method": ["lora", "cola"], "chain.length": [1, 2, 3], "ranks": [[8]]},
        {"task": "cb", "method": "cola", "chain.length": 2, "ranks": [[8, 2]]},
    ]
    for g in grid:
        g.update({"lr": [5e-4], "seed": [0, 1]})
    scores = {}
    for tag, (s0, s1) in {
        "lora-r8": (0.60, 0.62),
        "cola-L2-r8": (0.64, 0.66),
        "cola-L3-r8": (0.70, 0.66),
        "cola-L2-r8-2": (0.61, 0.61),
    }.items():
        for seed, s in enumerate((s0, s1)):
            scores[f"cb/{tag}/default-lr5e-4/seed{seed}"] = (0.5, s)
    root = _fabricate(tmp_path, scores, grid)
    report = SweepResults.from_sweep(load_sweep(root))
    (group,) = report.groups
    ((ranks, variants),) = report.chain_length_series(group).items()
    assert ranks == (8,) and [v[1] for v in variants] == [1, 2, 3]
    table = chain_length_table(report, group, variants)
    assert table.splitlines()[2] == "| cb | 61.00 ± 1.41 | 65.00 ± 1.41 | **68.00 ± 2.83** |"
    step = stepdown_table(report, group)
    assert "COLA (L=2, r=8→2)" in step and "25.0%" in step and "0% (reference)" in step
    write_report(root)
    for png in ("main.png", "chain_length-r8.png", "rank_stepdown.png"):
        assert (root / "plots" / png).stat().st_size > 1000


# ------------------------------------------------------------------------------------------- end to end


def _train_cli_available() -> bool:
    try:
        import chainlora.recipes.train  # noqa: F401
        from chainlora import cli  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _train_cli_available(), reason="the train CLI (chainlora.recipes.train) is not there yet"
)
def test_end_to_end_two_tiny_runs_through_the_real_cli(tmp_path, tiny_llama_dir, shared_data, monkeypatch):
    monkeypatch.setenv("CHAINLORA_DATA", str(shared_data))
    sweep = {
        "base": {
            "model": str(tiny_llama_dir),
            "num_train": 16,
            "num_dev": 8,
            "num_eval": 8,
            "epochs": 2,
            "batch_size": 8,
            "max_length": 64,
            "zero_shot": False,
        },
        "grid": {
            "task": "sst2",
            "method": ["lora", "cola"],
            "chain.length": 2,
            "lr": 1e-3,
            "seed": 0,
        },
        "sweep": {"output_dir": str(tmp_path / "e2e"), "run_timeout_s": 120},
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(sweep))
    from chainlora.cli import main

    assert (
        main(["sweep", str(path)]) == 0
    )  # the real `chainlora sweep`, which runs `python -m chainlora train`
    root = tmp_path / "e2e"
    for name in ("sst2/lora/default-lr1e-3/seed0", "sst2/cola-L2/default-lr1e-3/seed0"):
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert 0.0 <= metrics["test_score"] <= 1.0
    assert (
        len(json.loads((root / "sst2/cola-L2/default-lr1e-3/seed0/metrics.json").read_text())["knots"]) == 1
    )
    report = (root / "report.md").read_text()
    assert "Paired comparison" in report and "COLA (L=2)" in report
    assert main(["report", str(root), "--output", str(tmp_path / "r.md")]) == 0
    assert "| Method | sst2 |" in (tmp_path / "r.md").read_text()
    again = run_sweep(load_sweep_config(path), echo=lambda m: None)
    assert again.count("skipped") == 2 and again.count("done") == 0


def test_cpu_runs_get_one_thread_each_by_default(tmp_path):
    """On shared cores a 2-thread torch run beside another one is 5-15x slower: CPU workers get 1 thread."""
    from chainlora.config import SweepOptions

    for workers in (1, 2):
        env = worker_env(0, SweepOptions(output_dir=str(tmp_path), workers=workers), {})
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    env = worker_env(0, SweepOptions(output_dir=str(tmp_path), threads_per_worker=3), {})
    assert env["OMP_NUM_THREADS"] == "3"


def test_time_left_is_predicted_per_cell_then_task_then_overall():
    from chainlora.recipes.sweep import estimate_seconds_left, format_duration

    def spec(task, method, seed, extras=()):
        return RunSpec(
            f"{task}/{method}/s{seed}", f"{task}/{method}", task, method, None, None, None, 1e-3, seed, extras
        )

    finished = {
        "a": (spec("sst2", "lora", 0), 100.0),
        "b": (spec("sst2", "lora", 1), 200.0),
        "c": (spec("sst2", "cola", 0), 400.0),
        "d": (spec("boolq", "lora", 0), 1000.0),
    }
    assert estimate_seconds_left([], finished, 1) == 0.0
    assert estimate_seconds_left([spec("sst2", "lora", 2)], {}, 1) is None
    # same cell: mean 150; same task, other cell: cell sst2/full unseen -> task sst2 mean (100+200+400)/3
    left = [spec("sst2", "lora", 2), spec("sst2", "full", 0), spec("copa", "lora", 0)]
    expected = 150.0 + 700.0 / 3 + (100 + 200 + 400 + 1000) / 4
    assert estimate_seconds_left(left, finished, 1) == pytest.approx(expected)
    assert estimate_seconds_left(left, finished, 2) == pytest.approx(expected / 2)
    assert [format_duration(s) for s in (40, 600, 3 * 3600 + 5 * 60)] == ["40 s", "10m", "3h 05m"]


def test_the_bottom_line_states_the_interval_and_the_power_the_paper_gain_needs():
    from chainlora.recipes.report import PAPER_MEAN_GAIN, power_cell, verdict
    from chainlora.recipes.stats import seeds_for_power

    cola, lora = [61.0, 64.0, 59.0, 66.0, 60.0], [60.0, 65.0, 57.0, 63.0, 61.0]
    d = paired_difference(cola, lora)
    needed = seeds_for_power(PAPER_MEAN_GAIN, d.sd)
    line = verdict(Variant("cola", 3, None), Variant("lora", 1, None), d)
    assert f"{d.mean:+.2f} points over 5" in line and f"95% CI {d.low:+.2f}..{d.high:+.2f}" in line
    assert "COLA does not beat LoRA in these runs" in line and f"needs {needed} pairs" in line
    assert power_cell("copa", d) == f"paper +1.00: {seeds_for_power(1.0, d.sd)} (not reached)"
    clear = paired_difference([70.0, 72.0, 71.0], [60.0, 61.0, 60.5])
    assert "COLA beats LoRA here" in verdict(Variant("cola", 3, None), Variant("lora", 1, None), clear)
