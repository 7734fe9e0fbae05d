"""The prepared GPU benchmark (``bench/gpu_suite.py``, issue 21) cannot rot before a GPU is available: its
``--dry-run`` runs every part on the CPU with tiny shapes (no GPU, no network, no ``../shared``) and what it
writes is checked for sense here, no timing asserted; ``bench/gpu_prepare.py``'s model pieces join back into the
model byte for byte, and its device calls fit the device's limits."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from test_bench_smoke import bench_module

BENCH = Path(__file__).resolve().parents[1] / "bench"
SHAPES = ("tiny-opt", "tiny")
PARTS = [
    "model",
    "train_run:start",
    "train_step:tiny-opt",
    "knot_cost:tiny-opt",
    "eval_scoring",
    "knot_cost:tiny",
]
PARTS += ["train_step:tiny", "train_run"]  # the dry run's order: its train runs go beside the other parts


@pytest.fixture(scope="module")
def suite():
    return bench_module("gpu_suite")


@pytest.fixture(scope="module")
def dry_run(suite, tmp_path_factory) -> tuple[dict, str]:
    """One dry run of the whole suite, in this process (its train runs are forked by a launcher process)."""
    folder = tmp_path_factory.mktemp("gpu-suite")
    with pytest.MonkeyPatch.context() as env:
        for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.setenv(offline, "1")  # what main() sets, undone after
        argv = ["--dry-run", "--strict", "--out", str(folder / "out"), "--work-dir", str(folder / "work")]
        results = suite.main(argv)
    assert json.loads((folder / "out" / "gpu_suite.json").read_text())["targets"] == results["targets"]
    return results, (folder / "out" / "gpu_suite.md").read_text()


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_part_ran_and_was_reported(dry_run):
    results, markdown = dry_run
    assert results["dry_run"] and results["machine"]["device"] == "cpu"
    assert list(results["parts"]) == PARTS
    for name, part in results["parts"].items():
        assert "result" in part and "error" not in part and "skipped" not in part, name
    for heading in (
        "DRY RUN",
        "### Targets",
        "### train_step: tiny-opt",
        "### knot_cost: tiny",
        "### eval_scoring",
    ):
        assert heading in markdown
    assert "### train_run: `chainlora train`" in markdown and "knot-caused recompilations 0" in markdown


def test_train_step_and_knot_cost(dry_run, suite):
    """Every variant timed, MFU against the matmul rate measured in the same process, knots tied inside the
    COLA steps, and no graph compiled after warm-up across them."""
    results, _ = dry_run
    for shape in SHAPES:
        step = results["parts"][f"train_step:{shape}"]["result"]
        assert set(step["variants"]) == set(suite.VARIANTS) and step["compile_backend"] == "eager"
        assert step["recompiles_after_warmup"] == 0
        for name, v in step["variants"].items():
            assert positive(v["tokens_per_s"]) and 0 < v["mfu"] < 1, name
            assert v["mfu_peak_tflops"] == step["matmul_peak"]["bf16"]["tflops"]
            assert (step["knots_total"][name] > 0) == name.startswith("cola")
        knot = results["parts"][f"knot_cost:{shape}"]["result"]
        assert knot["w16"] and 0 < knot["knot_over_epoch"] < knot["knot_over_step"]


def test_eval_scoring_agrees_with_the_harness_loop(dry_run):
    scoring = dry_run[0]["parts"]["eval_scoring"]["result"]
    assert set(scoring["tasks"]) == {"sst2", "boolq", "copa", "cb"}
    for name, r in scoring["tasks"].items():
        assert r["max_abs_diff"] <= 1e-5 and r["same_choice"] == r["examples"] > 0, name
        assert r["fast64_vs_naive64"] <= 1e-9, name  # the same function, up to float64 round-off


def test_train_runs_compiled_like_eager_without_knot_recompiles(dry_run):
    run = dry_run[0]["parts"]["train_run"]["result"]
    compiled, eager, lora = (
        run["runs"][n] for n in ("cola-compile-on", "cola-compile-off", "lora-compile-on")
    )
    assert all(r["exit_code"] == 0 for r in (compiled, eager, lora))
    assert (compiled["speed"]["compile"], eager["speed"]["compile"], lora["speed"]["compile"]) == (
        "on",
        "off",
        "on",
    )
    assert compiled["knots"] == eager["knots"] != [] and lora["knots"] == []
    assert run["losses"]["same_steps"] and run["losses"]["within_tolerance"]
    assert compiled["recompiles"] == lora["recompiles"] and run["knot_recompiles"] == 0


def test_targets_are_evaluated_where_measured(dry_run):
    targets = dry_run[0]["targets"]
    assert len(targets) == 10
    for t in targets:
        if "memory" in t["target"]:  # allocator statistics exist on CUDA only
            assert t["value"] is None and t["met"] is None
        else:
            assert isinstance(t["met"], bool), t


def test_budget_guard_skips_every_part_and_still_writes_the_report(suite, tmp_path, monkeypatch):
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    out = tmp_path / "out"
    results = suite.main(
        ["--dry-run", "--budget-s", "0", "--out", str(out), "--work-dir", str(tmp_path / "w")]
    )
    assert results["parts"]["model"]["skipped"].startswith("budget")
    assert all("skipped" in p and "result" not in p for p in results["parts"].values())
    assert json.loads((out / "gpu_suite.json").read_text())["parts"] == results["parts"]
    assert "### Not measured" in (out / "gpu_suite.md").read_text()


def test_recompile_lines_and_loss_comparison(suite):
    log = (
        "V1201 14:03:55 guards.py:5396] [0/1] [__recompiles] Recompiling function forward in ops.py:942\n"
        "V1201 14:03:55 guards.py:5396] [0/1] [__recompiles]     triggered by the following guard failure(s):\n"
        "V1201 14:03:55 guards.py:5396] [0/1] [__recompiles]     - 0/0: tensor 'x' size mismatch at index 1\n"
        "chainlora: knot 1 at step 2 (merged ‖ΔW‖=0.037 over 4 layers), next link rank 8\n"
        "V1201 14:03:58 guards.py:5396] [0/2] [__recompiles] Recompiling function forward in ops.py:942\n"
    )
    assert suite.recompiles(log) == {
        "recompiles": 2,
        "recompiles_after_first_knot": 1,
        "guard_failures": ["0/0: tensor 'x' size mismatch at index 1"],
    }
    eager = [[i, 1.0] for i in range(1, 13)]
    assert suite.compare_losses(eager, eager)["within_tolerance"]
    assert not suite.compare_losses([[1, 1.1], *eager[1:]], eager)["within_tolerance"]  # 10 % off at step 1
    assert not suite.compare_losses(eager[:-1], eager)["same_steps"]


def test_model_pieces_join_back_and_the_device_calls_fit(suite, tmp_path):
    """gpu_prepare cuts the model into pieces that fit each call beside the checkout and the last call's wheels
    and data; gpu_suite joins them byte for byte (sha256 checked) and names a piece that did not survive."""
    prepare = bench_module("gpu_prepare")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(2_500_000))
    sizes = prepare.piece_sizes(2_500_000, extra_bytes=300_000, budget=1_000_000)
    assert sizes == [1_000_000, 1_000_000, 500_000] and prepare.piece_sizes(100, 10, 50) == [50, 50, 0]
    info = {"file": "model.gguf", "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    dest = tmp_path / ".carry"
    folders = prepare.split_model(gguf, dest, sizes, info)
    assert [f.name for f in folders] == ["call1", "call2", "call3"]
    joined = suite.join_model_pieces(dest, tmp_path / "joined", info["sha256"])
    assert joined.read_bytes() == gguf.read_bytes()
    with pytest.raises(ValueError, match="sha256"):
        suite.join_model_pieces(dest, tmp_path / "joined", "0" * 64)
    (folders[0] / "model" / "model.gguf.part0").unlink()  # the machine went cold between the calls
    with pytest.raises(FileNotFoundError, match="warm"):
        suite.join_model_pieces(dest, tmp_path / "joined", info["sha256"])
    calls = prepare.calls(dest, folders)
    assert [c["carry"] for c in calls] == [[str(f)] for f in folders]  # outside the repo: absolute paths
    assert all(len(c["command"]) <= 2000 and c["timeout_s"] <= 600 for c in calls)
    assert "gpu_suite.py --out $OUT" in calls[-1]["command"] and "wheels/*.whl" in calls[-1]["command"]
