"""Killed from outside, damaged on disk, out of space: a real ``chainlora train`` run (tiny Llama, made-up CB
data, 3 links, a checkpoint every step, dev evaluation every epoch) is SIGKILLed by this process at precise
moments, its checkpoints are damaged before ``--resume``, its disk refuses writes; every time the run ends with
the metrics and the very weights of the uninterrupted run, or stops with one line and nothing lost.

The run is held at the moment (``chainlora.testing.faults``: ``hold`` stops it just before or after a named call
and says so in a file) and killed from here, as an OOM killer or a pre-empted node would: no ``finally``, no
flush. No ``CHAINLORA_FAULT`` hook is used. Data: ``chainlora.testing.tiny_task_data`` (no ``../shared``).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest

from chainlora.cli import main
from chainlora.rundir import COMPLETE_MARKER, latest_checkpoint
from chainlora.state import CHAIN_STATE_FILE
from chainlora.testing.faults import (
    RUN_WEIGHTS,
    assert_finished_clean,
    assert_same_weights,
    run_cli,
    run_until_held,
)

KILLED = -signal.SIGKILL
RUN = [  # 12 optimizer steps (3 epochs of 4), knots after steps 4 and 8, a checkpoint every step
    *("--task", "cb", "--method", "cola", "--chain.length", "3", "--precision", "fp32"),
    *("--num_train", "16", "--num_dev", "8", "--num_eval", "8", "--batch_size", "4", "--epochs", "3"),
    *("--save_steps", "1", "--lr", "1e-2", "--zero_shot", "false", "--selection", "dev_score"),
]
SAME = [  # what must equal the uninterrupted run's metrics.json
    *("selected_step", "dev_score", "dev_loss", "test_score", "test_precision", "dev_history", "knots"),
    *("ranks", "train_loss", "train_steps", "train_flops", "skipped_steps"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out), *RUN, *extra]


def _run(argv: list[str], log: Path, **kwargs) -> int:
    code = run_cli(argv, log=str(log), **kwargs)
    assert code in (0, 2), f"exit code {code}:\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    return code


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same selection, scores and history as the uninterrupted run, and the same final/ and adapter/ weights
    (≤ 1e-6 relative, fp32; bit for bit in practice)."""
    got, expected = _metrics(run_dir), _metrics(reference)
    assert {k: got[k] for k in SAME} == {k: expected[k] for k in SAME}
    assert_same_weights(run_dir, reference, RUN_WEIGHTS)
    assert_finished_clean(run_dir)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tiny_cb_data, tmp_path_factory) -> Path:
    """The uninterrupted run (forked too, so both sides run the same process image)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(["--help"], log=str(out.parent / "warm-up.txt")) == 0  # start the fork server first
    assert _run(_args(tiny_llama_dir, tiny_cb_data, out), out.parent / "log.txt") == 0
    metrics = _metrics(out)
    assert [k["step"] for k in metrics["knots"]] == [4, 8]
    assert [e["step"] for e in metrics["dev_history"]] == [4, 8, 12]
    return out


# ------------------------------------------------------------------------------------- killed from outside


def test_killed_after_an_evaluated_checkpoint_during_export_and_after_metrics(
    reference, tiny_llama_dir, tiny_cb_data, tmp_path, capsys
):
    """#17 items 1-3, one run killed three times: (1) right after ``checkpoint-4`` (the end of epoch 1, an
    evaluated step) is sealed: the checkpoint already holds the evaluation at 4, so the resumed run selects what
    the uninterrupted one selects; (2) during the export (``adapter/`` written, ``final/`` not): the resumed run
    completes ``metrics.json`` with the last evaluation; (3) right after ``metrics.json``: ``--resume`` with a
    changed field is refused as for an interrupted run, and a plain ``--resume`` removes the leftovers."""
    out = tmp_path / "run"
    argv = _args(tiny_llama_dir, tiny_cb_data, out)
    run_until_held(argv, "chainlora.rundir:seal_checkpoint:after:4", log=str(tmp_path / "log1.txt"))
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    assert latest_checkpoint(out / "checkpoints", chain=True) == checkpoint
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_score" in e] == [4]  # evaluated, then saved

    resume = ["train", "--resume", str(out)]
    run_until_held(resume, "chainlora.rundir:write_final_model", log=str(tmp_path / "log2.txt"))
    assert (out / "adapter").is_dir() and not (out / "final").exists()
    assert not (out / "metrics.json").exists()

    run_until_held(resume, "chainlora.rundir:remove_training_state", log=str(tmp_path / "log3.txt"))
    assert (out / "metrics.json").is_file() and (out / "checkpoints").is_dir()
    assert _metrics(out)["dev_score"] is not None

    assert main([*resume, "--lr", "0.5"]) == 2  # refused like an interrupted run, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    assert err[-1].startswith("error: lr: 0.5 differs from the run's config.yaml (0.01)")
    assert (out / "checkpoints").is_dir()

    assert _run(resume, tmp_path / "log4.txt") == 0
    assert "removed its leftover best/ and checkpoints/" in (tmp_path / "log4.txt").read_text()
    assert_same_run(out, reference)


def test_killed_before_config_yaml_exists(tiny_llama_dir, tiny_cb_data, tmp_path, capsys):
    """#17 item 4: killed during the checks and loading, before ``config.yaml`` (the first file a run writes):
    nothing was written, and ``--resume`` says so in one line, with the command to use instead."""
    out = tmp_path / "run"
    argv = _args(tiny_llama_dir, tiny_cb_data, out)
    run_until_held(argv, "chainlora.rundir:start_run_dir", log=str(tmp_path / "log.txt"))
    assert not out.exists()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: resume: {out} does not exist")
    assert "start it again with the command that started it (not --resume)" in err[0]
    out.mkdir()  # a folder made beforehand by the user: still empty
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was stopped before it wrote anything: start it again" in err[0]
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def interrupted(reference, tiny_llama_dir, tiny_cb_data, tmp_path_factory) -> Path:
    """The run killed right after ``checkpoint-6`` was sealed: checkpoints 5 and 6 (two are kept), and
    ``best/`` holding the best dev state so far."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    argv = _args(tiny_llama_dir, tiny_cb_data, out)
    run_until_held(argv, "chainlora.rundir:seal_checkpoint:after:6", log=str(out.parent / "log.txt"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-5", "checkpoint-6"]
    assert (out / "best" / "best.json").is_file()
    return out


def flip(path: Path, offset: int, count: int = 16) -> None:
    """Invert ``count`` bytes of ``path`` from ``offset`` (negative: from the end); the size is unchanged."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, suffix: str) -> int:
    """Where the data of the first tensor whose name ends with ``suffix`` starts in a safetensors file."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k.endswith(suffix))
    return 8 + length + header[name]["data_offsets"][0]


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256) + b"x" * (path.stat().st_size % 256))


DAMAGE = {  # what is done to checkpoint-6, and what the warning must name
    "chain base weight": (
        lambda c: flip(c / CHAIN_STATE_FILE, tensor_offset(c / CHAIN_STATE_FILE, "/base_weight") + 64),
        "chainlora_chain.safetensors does not match its content hash",
    ),
    "chain header": (lambda c: flip(c / CHAIN_STATE_FILE, 20), "chainlora_chain.safetensors does not match"),
    "adapter weights": (
        lambda c: flip(c / "adapter_model.safetensors", -40),
        "adapter_model.safetensors does not match its content hash",
    ),
    "optimizer": (lambda c: flip(c / "optimizer.pt", -100), "optimizer.pt does not match its content hash"),
    "trainer state garbage": (
        lambda c: _garbage(c / "trainer_state.json"),
        "trainer_state.json does not match its content hash",
    ),
    "truncated": (
        lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:-1000]),
        "optimizer.pt changed size",
    ),
    "missing": (lambda c: (c / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    "seal garbage": (lambda c: _garbage(c / COMPLETE_MARKER), "unreadable seal"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_not_used(interrupted, tmp_path, damage, caplog):
    """#17 item 5, each kind of damage (same size or not) to the newest checkpoint: it fails verification, the
    one before it is used instead, and one warning line says which and why."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(interrupted / "checkpoints", checkpoints)
    do, problem = DAMAGE[damage]
    do(checkpoints / "checkpoint-6")
    with caplog.at_level(logging.WARNING, logger="chainlora"):
        assert latest_checkpoint(checkpoints, chain=True) == checkpoints / "checkpoint-5"
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert line.startswith("warning: checkpoint-6 (") and problem in line
    assert line.endswith("failed verification and is not used; resuming from checkpoint-5")


def _resumed_copy(interrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    for path in out.rglob("*.yaml"):  # the copy's config names its own folder
        path.write_text(path.read_text().replace(str(interrupted), str(out)))
    return out


def _warnings(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "failed verification" in line]


def test_flipped_base_weight_resumes_from_the_previous_checkpoint(interrupted, reference, tmp_path):
    """16 flipped bytes in a base weight of the newest chain state (the size kept: the old seal missed it):
    resumed from the checkpoint before, with one warning line, the run ends exactly as the uninterrupted one."""
    out = _resumed_copy(interrupted, tmp_path)
    chain = out / "checkpoints" / "checkpoint-6" / CHAIN_STATE_FILE
    flip(chain, tensor_offset(chain, "/base_weight") + 64)
    assert _run(["train", "--resume", str(out)], tmp_path / "log.txt") == 0
    (line,) = _warnings(tmp_path / "log.txt")
    assert "checkpoint-6 (chainlora_chain.safetensors does not match its content hash)" in line
    assert _metrics(out)["resumed_from"].endswith("checkpoint-5")
    assert_same_run(out, reference)


def test_every_checkpoint_and_best_state_damaged_starts_over(interrupted, reference, tmp_path):
    """Both checkpoints damaged (a flipped safetensors header, a same-size garbage ``trainer_state.json``) and
    ``best/`` too: no intact state to resume from, so the run starts over in place, says so in one line per
    verdict, and still ends exactly as the uninterrupted one."""
    out = _resumed_copy(interrupted, tmp_path)
    flip(out / "checkpoints" / "checkpoint-6" / CHAIN_STATE_FILE, 20)
    _garbage(out / "checkpoints" / "checkpoint-5" / "trainer_state.json")
    best = next((out / "best").glob("*.safetensors"))
    flip(best, -64)
    assert _run(["train", "--resume", str(out)], tmp_path / "log.txt") == 0
    (line,) = _warnings(tmp_path / "log.txt")  # best/ is not even looked at: nothing to resume with it
    assert "checkpoint-6 (" in line and "checkpoint-5 (" in line and line.endswith("the run starts over")
    assert _metrics(out)["resumed_from"] is None
    assert_same_run(out, reference)


def test_damaged_best_state_is_evaluated_again(interrupted, reference, tmp_path):
    """``best/`` (the selected state so far) damaged: resuming after it would restore a wrong state at the end
    or fail there, so the run resumes from before its step (here: from the start), evaluates it again and
    rewrites it; one warning line."""
    out = _resumed_copy(interrupted, tmp_path)
    best = next((out / "best").glob("*.safetensors"))
    flip(best, tensor_offset(best, "/lora_A") + 8)
    step = json.loads((out / "best" / "best.json").read_text())["step"]
    assert _run(["train", "--resume", str(out)], tmp_path / "log.txt") == 0
    (line,) = _warnings(tmp_path / "log.txt")
    assert (
        line.startswith("warning: best/ failed verification (") and "does not match its content hash" in line
    )
    assert f"step {step}" in line
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------ out of space


def test_storage_full_mid_run_stops_with_one_line_and_resumes(
    reference, tiny_llama_dir, tiny_cb_data, tmp_path
):
    """#17 item 9, mid-run: the storage refuses a file larger than 64 KB (``RLIMIT_FSIZE``: the write fails, as
    on a full disk), which every checkpoint fits but ``final/`` does not. The run stops with exit 2 and one line
    that names the sealed checkpoint, which stays resumable; ``--resume`` with room again completes it
    exactly."""
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    assert _run(_args(tiny_llama_dir, tiny_cb_data, out), log, file_size_limit=64 << 10) == 2
    errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors == log.read_text().strip().splitlines()[-1:]
    assert errors[0].startswith(f"error: cannot write to {out}: File too large")
    assert (
        f"nothing is lost: checkpoint-12 is sealed and resumable: free some space, then run `chainlora train --resume {out}`"
        in errors[0]
    )
    assert not (out / "metrics.json").exists() and not (out / "final").exists()
    assert _run(["train", "--resume", str(out)], tmp_path / "log2.txt") == 0
    assert_same_run(out, reference)


def test_storage_full_at_start_leaves_nothing(tiny_llama_dir, tiny_cb_data, tmp_path):
    """#17 item 9, at the start: not even ``config.yaml`` can be written: exit 2, one line, and no folder left
    behind (the parents it would have created included)."""
    out = tmp_path / "new" / "run"
    log = tmp_path / "log.txt"
    assert _run(_args(tiny_llama_dir, tiny_cb_data, out), log, file_size_limit=0) == 2
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith(f"error: output_dir: cannot write {out / 'config.yaml'} (File too large)")
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert not (tmp_path / "new").exists()
