"""The run directory of ``chainlora train`` (and the sweep folder that holds many): every name in them, and
every rule about what is complete.

    RUN_DIR/
      config.yaml                the resolved config: written first, so a folder holding it is a (resumable) run
      zero_shot.json             the pretrained model's test score, cached for --resume
      checkpoints/checkpoint-N/  the Trainer's checkpoints, plus the chain state, chainlora_time.json and,
                                 written last, the seal chainlora_complete.json
      best/  (best/best.json)    the selected (best dev) state so far: chain state, or every weight for full FT
      tb/                        TensorBoard logs
      adapter/                   the whole chain as one PEFT LoRA adapter
      final/                     the merged model (standard safetensors)
      loss.png                   the loss curve with the knots
      samples/step-N.jsonl       a few generations (prompt, reference, output) per dev evaluation (your data)
      metrics.json               written last: a run is finished iff it is there

    SWEEP_DIR/                   (``chainlora sweep``, ``chainlora report``)
      <task>/<cell>/<optimizer>-lr<lr>/seed<seed>/   one run directory per run of the grid
      sweep_plan.json            every planned run (cell, axes, train overrides), the base config and the grid
      sweep_base.yaml            the resolved base train config every run starts from
      sweep_state.json           each run's last outcome, and every invocation of the sweep
      .locks/<run>.lock          held by the process running that run
      logs/<run>.log             each run's output
      report.md, plots/          the report

Invariants:

* Every file is written atomically (``chainlora.io``); ``metrics.json`` last, so its presence means complete.
* A checkpoint counts only once sealed (:func:`seal_checkpoint`: every file fsync'ed, then a marker listing each
  file and its size). The Trainer writes ``checkpoint-N`` in place, so an unsealed one may be torn; it is never
  resumed from (:func:`latest_checkpoint`).
* ``best/`` is replaced as a whole, so the state and its record (``best.json``) always belong together.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from chainlora.config import TrainConfig
from chainlora.errors import ChainLoRAError, ConfigError
from chainlora.faults import maybe_crash
from chainlora.io import TEMP_PREFIX, atomic_dir, atomic_path, fsync_tree, remove_temps, write_json_atomic
from chainlora.state import CHAIN_STATE_FILE, load_chain_state, save_chain_state

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ZERO_SHOT_FILE = "zero_shot.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # the selected state so far: chain state (lora/cola) or all weights (full)
BEST_RECORD = "best.json"
BEST_WEIGHTS = "model.safetensors"  # in best/, for full fine-tuning
TB_DIR = "tb"
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"
LOSS_PLOT = "loss.png"
SAMPLES_DIR = "samples"  # samples/step-N.jsonl: a few generations per dev evaluation (your own data)
TIME_FILE = (
    "chainlora_time.json"  # in a checkpoint: training seconds so far, so a resumed run's total is right
)
COMPLETE_MARKER = "chainlora_complete.json"  # in a checkpoint, written last: every file in it and its size
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folders

SWEEP_PLAN_FILE = "sweep_plan.json"
SWEEP_BASE_FILE = "sweep_base.yaml"
SWEEP_STATE_FILE = "sweep_state.json"
SWEEP_LOCK_DIR = ".locks"
SWEEP_LOG_DIR = "logs"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


# ---------------------------------------------------------------------------------------------- the run


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<task or data>-<method>-<model>-s<seed>`` (the model's folder name for a local model)."""
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model
    return Path("runs") / f"{config.workload_name}-{config.method}-{model}-s{config.seed}"


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The config a run directory was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"resume: {path} not found: {run_dir} is not a chainlora run directory")
    return TrainConfig.from_dict(yaml.safe_load(path.read_text()) or {})


def is_started(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a run that ``chainlora train --resume`` can continue (its ``config.yaml``)."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def is_finished(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``metrics.json``, written last)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def check_run_dir(config: TrainConfig) -> tuple[Path, bool]:
    """The run directory of ``config`` and whether this is a resume; writes nothing.

    Refuses, with one ``ConfigError`` line: a resume whose config differs from the run's ``config.yaml``, a path
    that is not a folder, a folder holding something other than a run, a run without ``overwrite``, and a
    folder this process cannot write.
    """
    if config.resume is not None:
        run_dir = Path(config.resume).expanduser()
        saved = load_run_config(run_dir)
        given, stored = config.comparable(), saved.comparable()
        given.pop("output_dir"), stored.pop("output_dir")
        for key, value in _flatten(given).items():
            if _flatten(stored).get(key) != value:
                raise ConfigError(
                    f"{key}: {value!r} differs from the run's config.yaml ({_flatten(stored).get(key)!r}); "
                    "a resumed run must keep its config (start a new run instead)"
                )
        _check_writable(run_dir)
        return run_dir, True
    run_dir = Path(config.output_dir).expanduser() if config.output_dir else default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir: {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(not p.name.startswith(TEMP_PREFIX) for p in run_dir.iterdir()):
        if not is_started(run_dir):
            raise ConfigError(
                f"output_dir: {run_dir} is not empty and holds no chainlora run; refusing to write into it"
            )
        if not config.overwrite:
            raise ConfigError(
                f"output_dir: {run_dir} already holds a run; pass --overwrite to replace it "
                f"or --resume {run_dir} to continue it"
            )
    _check_writable(run_dir)
    return run_dir, False


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {existing} is not writable")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_run_dir(
    run_dir: Path, config: TrainConfig, *, resuming: bool, checkpoint: Path | None, main: bool = True
) -> None:
    """Make ``run_dir`` ready for training; only the ``main`` process writes.

    New run: an old run there (``overwrite``, checked by :func:`check_run_dir`) is moved away in one rename and
    deleted, then ``config.yaml`` is written first. Resume: leftover temporaries are removed, and so is
    everything a resume from ``checkpoint`` would write again (newer, torn checkpoints; with no checkpoint at
    all, the TensorBoard logs, ``best/`` and ``checkpoints/``: the run starts over in place).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # several processes: all have checked the output dir before it changes
    if not main:
        return
    if resuming:
        remove_temps(run_dir)  # what a killed write left behind
        if checkpoint is None:  # interrupted before the first checkpoint: start over in place
            for name in (TB_DIR, BEST_DIR, CHECKPOINTS_DIR):
                shutil.rmtree(run_dir / name, ignore_errors=True)
        else:  # newer checkpoints are torn: drop them before the Trainer writes the same names again
            step = checkpoint_step(checkpoint)
            for path in checkpoint.parent.iterdir():
                if checkpoint_step(path) > step:
                    shutil.rmtree(path)
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):  # overwrite (checked in check_run_dir)
        # move the old run away in one rename, so a crash never leaves half of it looking like a run
        old = run_dir.with_name(f"{TEMP_PREFIX}{run_dir.name}.replaced-{os.getpid()}")
        os.replace(run_dir, old)
        shutil.rmtree(old)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = config.to_dict() | {"output_dir": str(run_dir), "overwrite": False, "resume": None}
    with atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(saved, sort_keys=False))


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """The Trainer's folder for the checkpoint after optimizer step ``step``."""
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-N`` folder; -1 for any other name."""
    match = CHECKPOINT_RE.match(folder.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(folder: Path, *, chain: bool) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None. Complete: sealed by :func:`seal_checkpoint`
    (its marker is written last) and every file the marker lists still there with its size; it holds HF's
    trainer state and, for a chain, the chain state. A torn checkpoint (killed while the Trainer wrote it in
    place, or while an old one was being deleted) is never returned."""
    if not folder.is_dir():
        return None
    found = sorted(
        (checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) >= 0 and p.is_dir()
    )
    for _, path in reversed(found):
        required = ["trainer_state.json", *([CHAIN_STATE_FILE] if chain else [])]
        if is_sealed(path) and all((path / name).is_file() for name in required):
            return path
    return None


def seal_checkpoint(folder: Path) -> None:
    """Mark ``folder`` complete: fsync every file in it, then write the marker (atomically, last) listing
    every file and its size. Call it after everything else of the checkpoint is written."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(TEMP_PREFIX)
    }
    fsync_tree(folder)
    maybe_crash("checkpoint_write")
    write_json_atomic(folder / COMPLETE_MARKER, {"step": checkpoint_step(folder), "files": files})


def is_sealed(folder: Path) -> bool:
    """Whether ``folder`` holds a seal whose every listed file is still there with its size."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def save_train_seconds(checkpoint: Path, seconds: float) -> None:
    """Record in ``checkpoint`` how long training has run so far (all sessions)."""
    write_json_atomic(checkpoint / TIME_FILE, {"train_seconds": seconds})


def train_seconds_at(checkpoint: Path | None) -> float:
    """Training seconds recorded in ``checkpoint`` (0 without one)."""
    if checkpoint is None or not (checkpoint / TIME_FILE).is_file():
        return 0.0
    return json.loads((checkpoint / TIME_FILE).read_text())["train_seconds"]


# ---------------------------------------------------------------------------------------- the best state


def save_best_state(
    run_dir: Path, model: torch.nn.Module, step: int, metrics: dict[str, float], *, full: bool
) -> None:
    """Write the selected state to ``best/``: the chain state of the LoRA-targeted layers (merged base + current
    link), or every weight with ``full`` (full fine-tuning); and ``best.json`` naming its step. The folder is
    replaced as a whole (atomic_dir), so the state and its record always belong together."""
    with atomic_dir(run_dir / BEST_DIR, overwrite=True) as folder:
        if full:
            save_model(model, str(folder / BEST_WEIGHTS))
        else:
            save_chain_state(model, folder)
        (folder / BEST_RECORD).write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n")


def restore_best_state(run_dir: Path, model: torch.nn.Module, step: int, *, full: bool) -> None:
    """Load ``best/`` into ``model``; refuses a record that is not the expected step."""
    folder = run_dir / BEST_DIR
    record = folder / BEST_RECORD
    saved_step = json.loads(record.read_text())["step"] if record.is_file() else None
    if saved_step != step:
        raise ChainLoRAError(
            f"{folder} holds the state of step {saved_step}, but the best dev step is {step}"
        )
    if full:
        load_model(model, str(folder / BEST_WEIGHTS))
    else:
        load_chain_state(model, folder)


# ------------------------------------------------------------------------------------------ the outputs


def write_final_model(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """Save the merged model and its tokenizer as ``final/`` (atomically: a standard HF folder or nothing)."""
    with atomic_dir(run_dir / FINAL_DIR, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        maybe_crash("final_export")
    return run_dir / FINAL_DIR


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json``: the last file of a run, which marks it finished."""
    write_json_atomic(run_dir / METRICS_FILE, metrics)


def write_samples(run_dir: Path, step: int, samples: list[dict[str, Any]]) -> Path:
    """Write the generations of the evaluation at ``step`` to ``samples/step-<step>.jsonl`` (atomically)."""
    path = run_dir / SAMPLES_DIR / f"step-{step}.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    return path


def remove_training_state(run_dir: Path, *, keep_checkpoints: bool) -> None:
    """After a finished run: delete ``best/`` and, unless ``keep_checkpoints``, ``checkpoints/``."""
    if not keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
