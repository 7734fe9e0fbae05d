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
  file, its size and its content hash, xxh3-128). The Trainer writes ``checkpoint-N`` in place, so an unsealed one
  may be torn; it is never resumed from, and neither is a sealed one whose files no longer match their seal or do
  not parse (:func:`latest_checkpoint` falls back to the newest intact one, with one warning line).
* ``best/`` is replaced as a whole, so the state and its record (``best.json``, with the hash of every file)
  always belong together; it is verified before it is restored.
* A run is resumable once ``config.yaml`` exists; it is written before anything else, so a run killed without one
  had written nothing yet (:func:`load_run_config` says so in one line).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
import yaml
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from chainlora.config import TrainConfig, read_yaml_mapping
from chainlora.errors import ChainLoRAError, ConfigError, OutputError
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
COMPLETE_MARKER = "chainlora_complete.json"  # in a checkpoint, written last: every file, its size and hash
HASH = "xxh3_128"  # content hash of sealed files: ~2 GiB/s on a loaded core, sha256 0.3 (BENCHMARKS.md §6)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folders

SWEEP_PLAN_FILE = "sweep_plan.json"
SWEEP_BASE_FILE = "sweep_base.yaml"
SWEEP_STATE_FILE = "sweep_state.json"
SWEEP_LOCK_DIR = ".locks"
SWEEP_LOG_DIR = "logs"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

logger = logging.getLogger("chainlora")


# ---------------------------------------------------------------------------------------------- the run


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<task or data>-<method>-<model>-s<seed>`` (the model's folder name for a local model)."""
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model
    return Path("runs") / f"{config.workload_name}-{config.method}-{model}-s{config.seed}"


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The config a run directory was started with.

    ``config.yaml`` is the first thing a run writes, so a folder without it (missing, empty, or holding only
    temporaries) belongs to a run killed during its checks, before it wrote anything: nothing to resume, and the
    one-line error says to start it again.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        again = "start it again with the command that started it (not --resume)"
        if not run_dir.exists():
            raise ConfigError(
                f"resume: {run_dir} does not exist (a run killed before it wrote anything leaves no folder): {again}"
            )
        if run_dir.is_dir() and all(p.name.startswith(TEMP_PREFIX) for p in run_dir.iterdir()):
            raise ConfigError(f"resume: {run_dir} was stopped before it wrote anything: {again}")
        raise ConfigError(f"resume: {path} not found: {run_dir} is not a chainlora run directory")
    return TrainConfig.from_dict(read_yaml_mapping(path, name="resume:"))


def is_started(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a run that ``chainlora train --resume`` can continue (its ``config.yaml``)."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def is_finished(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``metrics.json``, written last)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run (one ``ChainLoRAError`` line if it does not parse)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ChainLoRAError(f"{path}: unreadable ({_first_line(err)})") from None
    if not isinstance(metrics, dict):
        raise ChainLoRAError(f"{path}: expected a JSON object")
    return metrics


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_run_dir(config: TrainConfig) -> tuple[Path, bool]:
    """The run directory of ``config`` and whether this is a resume; writes nothing.

    Refuses, with one ``ConfigError`` line: a resume whose config differs from the run's ``config.yaml``, a path
    that is not a folder, a folder holding something other than a run, a run without ``overwrite``, and a
    folder this process cannot write.
    """
    if config.resume is not None:
        run_dir = check_resumed_config(config)
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


def check_resumed_config(config: TrainConfig) -> Path:
    """The run directory of ``config.resume``, once its ``config.yaml`` is found and every field that defines the
    run's result is the same in ``config`` (one ``ConfigError`` line naming the first that differs). The same
    check for an interrupted and a completed run."""
    assert config.resume is not None
    run_dir = Path(config.resume).expanduser()
    saved = load_run_config(run_dir)
    given, stored = config.comparable(), saved.comparable()
    given.pop("output_dir"), stored.pop("output_dir")
    flat_stored = _flatten(stored)
    for key, value in _flatten(given).items():
        if flat_stored.get(key) != value:
            raise ConfigError(
                f"{key}: {value!r} differs from the run's config.yaml ({flat_stored.get(key)!r}); "
                "a resumed run must keep its config (start a new run instead)"
            )
    return run_dir


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
    _remove_replaced(run_dir)
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
    created = (
        run_dir  # the outermost folder this call creates: removed again if config.yaml cannot be written
    )
    while not created.parent.exists():
        created = created.parent
    created = created if not created.exists() else None
    saved = config.to_dict() | {"output_dir": str(run_dir), "overwrite": False, "resume": None}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(saved, sort_keys=False))
    except OSError as err:  # e.g. a full disk: leave nothing behind, not even an empty folder
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise OutputError(
            f"output_dir: cannot write {run_dir / CONFIG_FILE} ({err.strerror or err}); nothing was written"
        ) from None


def _remove_replaced(run_dir: Path) -> None:
    """Delete what a run killed during ``--overwrite`` left beside ``run_dir``: the old run, moved away to be
    deleted (``.tmp-<name>.replaced-<pid>``)."""
    if run_dir.parent.is_dir():
        for old in run_dir.parent.glob(f"{TEMP_PREFIX}{run_dir.name}.replaced-*"):
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ storage errors mid-run

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_STORAGE_TEXT = {  # how writers that raise their own errors (torch's zip writer, safetensors) say it
    "no space left": os.strerror(errno.ENOSPC),
    "disk quota": os.strerror(errno.EDQUOT),
    "file too large": os.strerror(errno.EFBIG),
    "read-only file system": os.strerror(errno.EROFS),
    "file write failed": "",
    "unexpected pos": "",
    "storagefull": os.strerror(errno.ENOSPC),
}


def _storage_problem(err: BaseException, run_dir: Path) -> str | None:
    """What went wrong with the storage, if ``err`` (or what caused it) is a failed write: ``OSError`` with a
    storage errno, or a writer's own error saying so (or any write error while the disk is nearly full)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen.strerror or os.strerror(seen.errno)
        text = str(seen).lower()
        for needle, problem in _STORAGE_TEXT.items():
            if needle in text:
                if problem:
                    return problem
                # a failed write that does not say why
                return (
                    os.strerror(errno.ENOSPC)
                    if _nearly_full(run_dir)
                    else f"a write failed ({_first_line(seen)[:200]})"
                )
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, OSError | RuntimeError) and _nearly_full(run_dir):
        return f"{os.strerror(errno.ENOSPC)} ({_first_line(err)[:200]})"
    return None


def _nearly_full(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


@contextlib.contextmanager
def storage_errors(run_dir: Path, *, chain: bool) -> Iterator[None]:
    """Turn a failed write under ``run_dir`` (a full disk, a quota, an I/O error) into one ``OutputError`` line
    that names the last sealed checkpoint, which stays resumable, and the command that resumes it."""
    try:
        yield
    except ChainLoRAError:
        raise
    except Exception as err:
        problem = _storage_problem(err, run_dir)
        if problem is None:
            raise
        checkpoint = latest_checkpoint(run_dir / CHECKPOINTS_DIR, chain=chain, quiet=True)
        kept = (
            f"nothing is lost: {checkpoint.name} is sealed and resumable"
            if checkpoint is not None
            else "no checkpoint was sealed yet, so the run resumes from step 0"
        )
        raise OutputError(
            f"cannot write to {run_dir}: {problem}; {kept}: free some space, then run "
            f"`chainlora train --resume {run_dir}`"
        ) from None


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """The Trainer's folder for the checkpoint after optimizer step ``step``."""
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-N`` folder; -1 for any other name."""
    match = CHECKPOINT_RE.match(folder.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(
    folder: Path, *, chain: bool, quiet: bool = False, before: int | None = None
) -> Path | None:
    """The newest intact checkpoint in ``folder`` (of a step below ``before``, when given), or None.

    Intact (:func:`checkpoint_problem`): sealed by :func:`seal_checkpoint` (its marker is written last), every
    file the seal lists still there with its size and content hash, HF's trainer state and (``chain``) the chain
    state present and parseable. A torn checkpoint (killed while the Trainer wrote it in place, or while an old
    one was being deleted) is skipped silently; a sealed one that fails verification is treated as absent, with
    one warning line naming it and the checkpoint resumed from instead (unless ``quiet``).
    """
    if not folder.is_dir():
        return None
    found = sorted(
        (checkpoint_step(p), p)
        for p in folder.iterdir()
        if checkpoint_step(p) >= 0 and p.is_dir() and (before is None or checkpoint_step(p) < before)
    )
    damaged: list[str] = []
    chosen = None
    for _, path in reversed(found):
        if not (path / COMPLETE_MARKER).exists():
            continue  # torn: killed before its seal
        problem = checkpoint_problem(path, chain=chain)
        if problem is None:
            chosen = path
            break
        damaged.append(f"{path.name} ({problem})")
    if damaged and not quiet:
        instead = f"resuming from {chosen.name}" if chosen else "no intact checkpoint: the run starts over"
        logger.warning("warning: %s failed verification and is not used; %s", "; ".join(damaged), instead)
    return chosen


def best_in_history(
    log_history: list[dict[str, Any]], key: str | None, *, lower_is_better: bool
) -> tuple[float | None, int | None]:
    """The best value of ``key`` (``eval_loss``, ``eval_score``) in a Trainer's log history and its step (the
    first of equal ones); ``(None, None)`` without any or without a ``key``."""
    best, step = None, None
    for entry in log_history:
        if key is None or key not in entry:
            continue
        value = entry[key]
        if best is None or (value < best if lower_is_better else value > best):
            best, step = value, entry["step"]
    return best, step


def resume_checkpoint(
    run_dir: Path, *, chain: bool, key: str | None, lower_is_better: bool = False
) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest intact one (:func:`latest_checkpoint`), provided
    ``best/`` is the intact state of the best step its log history names (``key``: what selection compares).
    If it is not (damaged, missing, or of another step), ``best/`` cannot be trusted: the run resumes from the
    newest intact checkpoint before that step, so the replay evaluates the step again and rewrites ``best/``
    (from step 0 when there is none), with one warning line. None: start over."""
    folder = run_dir / CHECKPOINTS_DIR
    checkpoint = latest_checkpoint(folder, chain=chain)
    if checkpoint is None or key is None:
        return checkpoint
    state = json.loads((checkpoint / "trainer_state.json").read_bytes())  # parsed by checkpoint_problem
    _, step = best_in_history(state.get("log_history") or [], key, lower_is_better=lower_is_better)
    problem = None if step is None else best_problem(run_dir, step)
    if problem is None:
        return checkpoint
    assert step is not None
    older = latest_checkpoint(folder, chain=chain, quiet=True, before=step)
    instead = (
        f"resuming from {older.name} to evaluate step {step} again"
        if older is not None
        else f"no intact checkpoint before step {step}: the run starts over to evaluate it again"
    )
    logger.warning("warning: %s/ failed verification (%s) and is not used; %s", BEST_DIR, problem, instead)
    return older


def file_digest(path: Path) -> str:
    """The xxh3-128 hash of a file's content (hex); read through a memory map, 4 MiB at a time."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for start in range(0, size, 1 << 22):
                        digest.update(view[start : start + (1 << 22)])
                finally:
                    view.release()
    return digest.hexdigest()


def _listing(folder: Path, skip: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` but ``skip`` and temporaries, with its size and content hash."""
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, HASH: file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and not p.name.startswith(TEMP_PREFIX)
    }


def _listing_problem(folder: Path, files: Any) -> str | None:
    """Why the files under ``folder`` no longer match ``files`` (a :func:`_listing`), or None."""
    if not isinstance(files, dict) or not files:
        return "its seal lists no files"
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or HASH not in entry:
            return "its seal has no content hashes (written by an older chainlora)"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} changed size"
        if file_digest(path) != entry[HASH]:
            return f"{name} does not match its content hash"
    return None


def seal_checkpoint(folder: Path) -> None:
    """Mark ``folder`` complete: fsync every file in it, then write the marker (atomically, last) listing
    every file with its size and xxh3-128 content hash. Call it after everything else of the checkpoint is
    written."""
    with ThreadPoolExecutor(1) as pool:  # hash while the disk syncs: the hashes add little to the seal
        synced = pool.submit(fsync_tree, folder)
        files = _listing(folder, skip=(COMPLETE_MARKER,))
        synced.result()
    maybe_crash("checkpoint_write")
    write_json_atomic(
        folder / COMPLETE_MARKER, {"step": checkpoint_step(folder), "hash": HASH, "files": files}
    )


def checkpoint_problem(folder: Path, *, chain: bool) -> str | None:
    """Why ``folder`` cannot be resumed from (unsealed, a file missing, changed or unparseable), or None."""
    try:
        seal = json.loads((folder / COMPLETE_MARKER).read_bytes())
        problem = _listing_problem(folder, seal["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable seal: {_first_line(err)}"
    if problem is not None:
        return problem
    required = ["trainer_state.json", *([CHAIN_STATE_FILE] if chain else [])]
    for name in required:
        if name not in seal["files"]:
            return f"{name} is missing"
    try:
        state = json.loads((folder / "trainer_state.json").read_bytes())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"trainer_state.json does not parse ({_first_line(err)})"
    return unloadable_safetensors(folder, seal["files"])


def unloadable_safetensors(folder: Path, names: Iterable[str]) -> str | None:
    """The first of ``names`` in ``folder`` that is a safetensors file safetensors cannot open, as a problem line."""
    for name in names:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), "pt") as f:
                    f.keys()
            except Exception as err:  # safetensors raises its own error types
                return f"{name} does not load ({_first_line(err)})"
    return None


def is_sealed(folder: Path) -> bool:
    """Whether ``folder`` holds a seal whose every listed file is still there with its size and content hash."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _listing_problem(folder, files) is None


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
        record = {"step": step, **metrics, "hash": HASH, "files": _listing(folder, skip=(BEST_RECORD,))}
        (folder / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def best_problem(run_dir: Path, step: int) -> str | None:
    """Why ``best/`` is not the intact state of ``step`` (missing, a file not matching its content hash in
    ``best.json``, unparseable, or the state of another step), or None."""
    folder = run_dir / BEST_DIR
    try:
        record = json.loads((folder / BEST_RECORD).read_bytes())
        saved_step = record["step"]
        problem = _listing_problem(folder, record["files"])
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{BEST_RECORD} unreadable: {_first_line(err)}"
    if problem is None and saved_step != step:
        problem = f"it holds the state of step {saved_step}, not of the best dev step {step}"
    return problem if problem is not None else unloadable_safetensors(folder, record["files"])


def restore_best_state(run_dir: Path, model: torch.nn.Module, step: int, *, full: bool) -> None:
    """Load ``best/`` into ``model``, after checking that it is the intact state of ``step``
    (:func:`best_problem`); otherwise one ``ChainLoRAError`` line (never a wrong state). A resumed run checked it
    already (:func:`resume_checkpoint`), so this fails only if ``best/`` was damaged during this session."""
    folder = run_dir / BEST_DIR
    problem = best_problem(run_dir, step)
    if problem is None:
        try:
            if full:
                load_model(model, str(folder / BEST_WEIGHTS))
            else:
                load_chain_state(model, folder)
            return
        except Exception as err:  # a file that matches its hash but does not load: written broken
            problem = f"it does not load ({_first_line(err)})"
    raise ChainLoRAError(
        f"{folder} is damaged ({problem}): the selected state of step {step} cannot be restored; resume the run "
        f"again (`chainlora train --resume {run_dir}`: it evaluates step {step} again)"
    )


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


def resume_finished(config: TrainConfig, *, main: bool = True) -> dict[str, Any]:
    """``--resume`` of a completed run (its ``metrics.json`` exists): the config check of an interrupted run (a
    changed field is refused in one line), then the cleanup a run killed right after ``metrics.json`` missed
    (``checkpoints/`` unless ``keep_checkpoints``, ``best/``, temporaries; ``main`` process only). Returns its
    metrics; says in one line that the run is complete."""
    run_dir = check_resumed_config(config)
    metrics = read_metrics(run_dir)
    removed = []
    if main:
        removed = [p.name for p in (run_dir / BEST_DIR, run_dir / CHECKPOINTS_DIR) if p.exists()]
        remove_temps(run_dir)
        remove_training_state(run_dir, keep_checkpoints=config.keep_checkpoints)
        removed = [name for name in removed if not (run_dir / name).exists()]
    cleaned = f"; removed its leftover {' and '.join(f'{n}/' for n in removed)}" if removed else ""
    logger.info("%s is complete (metrics.json): nothing to resume%s", run_dir, cleaned)
    return metrics


def remove_training_state(run_dir: Path, *, keep_checkpoints: bool) -> None:
    """After a finished run: delete ``best/`` and, unless ``keep_checkpoints``, ``checkpoints/``."""
    if not keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
