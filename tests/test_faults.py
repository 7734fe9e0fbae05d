"""Crash safety: a real ``chainlora train`` run (tiny model, real CB data) SIGKILLed at named points and at
random moments, then resumed with ``--resume``, ends with the very weights of an uninterrupted run. And
numerical faults: a NaN loss/gradient is skipped (no update at all) or halts the run; an exploding knot halts
it; gradient clipping is on.

The runs are processes forked from a pre-imported server (``chainlora.testing.faults.run_cli``: the same
``chainlora.cli.main`` as ``python -m chainlora``, without paying the imports for every run); a fault is
injected with ``CHAINLORA_FAULT=<point>:<n>`` (see ``chainlora.faults``) or by killing the process from here.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from chainlora import tasks
from chainlora.cli import main
from chainlora.config import TrainConfig, parse_config
from chainlora.recipes.train import train
from chainlora.rundir import COMPLETE_MARKER, latest_checkpoint, seal_checkpoint
from chainlora.state import CHAIN_STATE_FILE
from chainlora.testing.faults import assert_finished_clean, assert_same_weights, run_cli, start_cli

KILLED = -signal.SIGKILL
TASK = "cb"
RUN = [  # 8 optimizer steps, a knot (with a rank step-down) after step 4, a checkpoint every step
    *("--task", TASK, "--method", "cola", "--chain.length", "2", "--chain.ranks", "[8, 4]"),
    *("--num_train", "16", "--num_dev", "4", "--num_eval", "4", "--batch_size", "4", "--epochs", "2"),
    *("--save_steps", "1", "--lr", "1e-2", "--zero_shot", "false", "--selection", "last"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data / TASK), "--output_dir", str(out), *RUN]


def _run(argv: list[str], log: Path, fault: str | None = None) -> int:
    code = run_cli(argv, fault=fault, log=str(log))
    assert code in (0, KILLED), f"exit code {code}:\n{log.read_text()[-3000:]}"
    return code


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, shared_data, tmp_path_factory) -> Path:
    """An uninterrupted run (in a forked process too, so both sides run the same process image)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(["--help"], log=str(out.parent / "warm-up.txt")) == 0  # start the fork server first
    started = time.monotonic()
    assert _run(_args(tiny_llama_dir, shared_data, out), out.parent / "log.txt") == 0
    (out.parent / "seconds").write_text(str(time.monotonic() - started))
    return out


# One run, killed at every named point in turn (each resume dies at the next one), then finished.
# (fault, what must hold on disk right after that kill)
SCENARIO = [
    ("mid_step:3", "step 3 half done: checkpoint-2 is the newest complete one"),
    ("after_knot:1", "the knot after step 4 tied in memory only: checkpoint-3 is the newest"),
    ("checkpoint_write:2", "checkpoint-5 written by the Trainer and the callbacks, but not sealed"),
    ("atomic_write:1", "killed between a temp and its rename (the chain state of checkpoint-5)"),
    ("final_export:1", "final/ written to a temp folder, not renamed into place"),
    ("atomic_write:3", "final/ and loss.png written, metrics.json only as a temp"),
]


def test_sigkill_at_each_named_point_then_resume_matches_uninterrupted(
    reference, tiny_llama_dir, shared_data, tmp_path
):
    out = tmp_path / "run"
    argv = _args(tiny_llama_dir, shared_data, out)
    checkpoints = out / "checkpoints"
    for i, (fault, what) in enumerate(SCENARIO):
        code = _run(argv if i == 0 else ["train", "--resume", str(out)], tmp_path / f"log{i}.txt", fault)
        assert code == KILLED, f"{fault} was not reached ({what})"
        assert not (out / "metrics.json").exists(), what
        if fault == "mid_step:3":
            assert latest_checkpoint(checkpoints, chain=True) == checkpoints / "checkpoint-2"
        if fault == "after_knot:1":
            assert latest_checkpoint(checkpoints, chain=True) == checkpoints / "checkpoint-3"
        if fault == "checkpoint_write:2":  # torn: everything there but the seal, so never resumed from
            torn = checkpoints / "checkpoint-5"
            assert (torn / CHAIN_STATE_FILE).is_file() and not (torn / COMPLETE_MARKER).exists()
            assert latest_checkpoint(checkpoints, chain=True) == checkpoints / "checkpoint-4"
        if fault == "final_export:1":
            assert [p.name.startswith(".tmp-final") for p in out.iterdir()].count(True) == 1
            assert not (out / "final").exists()
    assert _run(["train", "--resume", str(out)], tmp_path / "log-end.txt") == 0
    assert_finished_clean(out)
    metrics = json.loads((out / "metrics.json").read_text())
    whole = json.loads((reference / "metrics.json").read_text())
    assert [k["step"] for k in metrics["knots"]] == [k["step"] for k in whole["knots"]] == [4]
    assert metrics["train_steps"] == whole["train_steps"] == 8
    assert metrics["train_loss"] == whole["train_loss"]
    assert_same_weights(out, reference)


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(
    reference, tiny_llama_dir, shared_data, tmp_path
):
    """Kill after random delays (fixed seed) wherever the run happens to be, resume, kill again, ..."""
    rng = random.Random(20240111)
    duration = float((reference.parent / "seconds").read_text())
    out = tmp_path / "run"
    kills = 0
    for i in range(3):
        argv = (
            ["train", "--resume", str(out)]
            if (out / "config.yaml").is_file()
            else _args(tiny_llama_dir, shared_data, out)
        )
        process = start_cli(argv, log=str(tmp_path / f"log{i}.txt"))
        deadline = time.monotonic() + rng.uniform(0.05, 0.6) * duration
        while process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.join(300)
        assert process.exitcode in (0, KILLED), (tmp_path / f"log{i}.txt").read_text()[-3000:]
        if process.exitcode == 0:
            break
    if not (out / "metrics.json").is_file():
        assert _run(["train", "--resume", str(out)], tmp_path / "log-end.txt") == 0
    assert kills >= 1
    assert_finished_clean(out)
    assert_same_weights(out, reference)


# --------------------------------------------------------------------------- torn checkpoints, unit level


def _fake_checkpoint(folder: Path, step: int, *, sealed: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    save_file({"w": torch.zeros(25)}, str(path / CHAIN_STATE_FILE))
    if sealed:
        seal_checkpoint(path)
    return path


def test_latest_checkpoint_never_returns_a_torn_one(tmp_path):
    folder = tmp_path / "checkpoints"
    assert latest_checkpoint(folder, chain=True) is None
    good = _fake_checkpoint(folder, 2, sealed=True)
    _fake_checkpoint(folder, 3, sealed=False)  # killed before its seal
    assert latest_checkpoint(folder, chain=True) == good
    shrunk = _fake_checkpoint(folder, 4, sealed=True)
    (shrunk / CHAIN_STATE_FILE).write_bytes(b"x")  # a file changed after sealing (e.g. re-saved in place)
    deleted = _fake_checkpoint(folder, 5, sealed=True)
    (deleted / "trainer_state.json").unlink()  # half deleted by checkpoint rotation
    garbled = _fake_checkpoint(folder, 6, sealed=True)
    (garbled / COMPLETE_MARKER).write_text('{"files": ')
    assert latest_checkpoint(folder, chain=True) == good
    no_chain = folder / "checkpoint-7"
    no_chain.mkdir()
    (no_chain / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": []}))
    seal_checkpoint(no_chain)
    assert latest_checkpoint(folder, chain=True) == good  # a chain run needs its chain state
    assert latest_checkpoint(folder, chain=False) == no_chain


# ------------------------------------------------------------------------------------------- numerical faults


def _poison_training_loss(monkeypatch, steps: set[int]) -> None:
    """The training loss is NaN in the given optimizer steps (dev/test losses stay finite)."""
    real = tasks.compute_loss
    calls = {"n": 0}

    def loss(model, batch):
        value = real(model, batch)
        if not model.training:
            return value
        calls["n"] += 1
        return value * float("nan") if calls["n"] in steps else value

    monkeypatch.setattr(tasks.training, "compute_loss", loss)  # what the Trainer calls


class Snapshots(TrainerCallback):
    """Trainable parameters and Adam's step count after every optimizer step; grad norm before the update."""

    def __init__(self) -> None:
        self.params: dict[int, list[torch.Tensor]] = {}
        self.adam_steps: dict[int, float] = {}
        self.grad_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.params[state.global_step] = [p.detach().clone() for p in trainable]
        inner = getattr(optimizer, "optimizer", optimizer)
        self.adam_steps[state.global_step] = float(inner.state[trainable[0]].get("step", 0))


def _config(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *_args(model, data, out)[1:],
        "--method",
        "lora",
        "--chain.length",
        "1",
        "--chain.ranks",
        "null",
        *extra,
    ]


def test_nonfinite_step_is_skipped_without_any_update(tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, {3})
    args = _config(tiny_llama_dir, shared_data, tmp_path / "run", "--max_grad_norm", "0.05")
    snapshots = Snapshots()
    metrics = train(parse_config(TrainConfig, args, prog="test"), callbacks=[snapshots])
    assert metrics["skipped_steps"] == [3] and metrics["train_steps"] == 8
    for before, after in zip(snapshots.params[2], snapshots.params[3], strict=True):
        assert torch.equal(before, after)  # not even Adam's momentum moved the weights
    assert not all(torch.equal(a, b) for a, b in zip(snapshots.params[3], snapshots.params[4], strict=True))
    assert snapshots.adam_steps[2] == snapshots.adam_steps[3] == 2 and snapshots.adam_steps[4] == 3
    finite = [n for i, n in enumerate(snapshots.grad_norms) if i != 2]
    assert max(finite) <= 0.05 * (1 + 1e-5)  # max_grad_norm clips before the update
    for tensor in _final_weights(tmp_path / "run").values():
        assert torch.isfinite(tensor).all()


def test_repeated_nonfinite_steps_halt_with_one_line(
    tiny_llama_dir, shared_data, tmp_path, monkeypatch, capsys
):
    _poison_training_loss(monkeypatch, set(range(3, 100)))
    out = tmp_path / "run"
    assert main(["train", *_config(tiny_llama_dir, shared_data, out, "--max_nonfinite_skips", "1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    assert err[-1].startswith(
        "error: step 4: non-finite loss and gradient after 1 consecutive skipped step(s)"
    )
    assert any("step 3 skipped" in line for line in err)
    assert not (out / "metrics.json").exists() and not (out / "final").exists()
    assert latest_checkpoint(out / "checkpoints", chain=True) == out / "checkpoints" / "checkpoint-3"
    assert not (out / "checkpoints" / "checkpoint-4").exists()  # halted before the update, nothing saved


def test_exploding_knot_halts_the_run_with_the_last_good_state(tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*_args(tiny_llama_dir, shared_data, out), "--chain.max_relative_delta", "1e-6"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    assert err[-1].startswith("error: knot 1 at step 4: refusing knot:") and "halted" in err[-1]
    assert not (out / "metrics.json").exists() and not (out / "final").exists()
    assert latest_checkpoint(out / "checkpoints", chain=True) == out / "checkpoints" / "checkpoint-3"
    assert not (out / "checkpoints" / "checkpoint-4").exists()


def test_overwrite_replaces_the_old_run_in_one_rename(tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: cb\n")
    (out / "metrics.json").write_text("{}")  # an old, complete run
    train_module = importlib.import_module("chainlora.recipes.train")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: (renamed.append((Path(a), Path(b))), real_replace(a, b))[1]
    )

    def stop(run):  # the new run directory is started: that is all this test needs
        raise SystemExit(3)

    monkeypatch.setattr(train_module, "zero_shot", stop)
    with pytest.raises(SystemExit):
        main([*_args(tiny_llama_dir, shared_data, out), "--overwrite"])
    moved = [b for a, b in renamed if a == out]
    assert len(moved) == 1 and moved[0].name.startswith(".tmp-run.replaced-")
    assert not (out / "metrics.json").exists() and (out / "config.yaml").read_text() != "task: cb\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
