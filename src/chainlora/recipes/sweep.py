"""``chainlora sweep``: the runs of a grid, each ``chainlora train`` in its own subprocess, resumable, on one or
several devices.

The sweep YAML and its grid are ``chainlora.recipes.grid``; how a sweep runs is ``chainlora.config.SweepOptions``
(the YAML's ``sweep:`` block, overridden by the command line); the folder's names are ``chainlora.rundir``.

Invariants:

* A run is finished iff its folder holds ``metrics.json`` (the train recipe writes it last); finished runs are
  never started again, so a killed sweep is continued by running the same command.
* An unfinished run folder is resumed with the train CLI's ``--resume <run dir>`` when it holds the run's
  ``config.yaml`` (the recipe continues from its newest checkpoint), and otherwise cleared and restarted.
* Each run holds an exclusive ``flock`` on ``<output_dir>/.locks/<name>.lock``, inherited by its subprocess, so
  two sweep processes (or a sweep and the orphan of a killed one) never run the same run at once.
* A failed run (non-zero exit, timeout, no ``metrics.json``) is recorded in ``sweep_state.json`` with its log
  path and the sweep continues; running the sweep again retries it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from chainlora import rundir
from chainlora.config import SweepOptions
from chainlora.errors import ConfigError
from chainlora.io import atomic_path, write_json_atomic
from chainlora.recipes.grid import RunSpec, SweepConfig, load_sweep_config
from chainlora.rundir import is_finished

# ------------------------------------------------------------------------------------------------ state


def finished_seconds(run_dir: str | Path) -> float | None:
    """Wall seconds a finished run took (``session_seconds`` of its ``metrics.json``; the last session only for
    a resumed run), or None."""
    try:
        value = rundir.read_metrics(run_dir).get("session_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def estimate_seconds_left(
    left: Sequence[RunSpec], finished: Mapping[str, tuple[RunSpec, float]], workers: int
) -> float | None:
    """Seconds until the runs in ``left`` are done on ``workers`` workers, from the runs already finished:
    each run is predicted by the mean time of finished runs of its cell (every axis but LR and seed), else of
    its task with the same extra axes, else of its task, else of all. None before any run has finished."""
    if not finished:
        return None
    by_key: dict[tuple[Any, ...], list[float]] = {}
    for spec, seconds in finished.values():
        for key in (("cell", spec.cell), ("task", spec.task, spec.extras), ("task", spec.task), ("all",)):
            by_key.setdefault(key, []).append(seconds)
    total = 0.0
    for spec in left:
        for key in (("cell", spec.cell), ("task", spec.task, spec.extras), ("task", spec.task), ("all",)):
            if key in by_key:
                total += sum(by_key[key]) / len(by_key[key])
                break
    return total / max(1, workers)


def format_duration(seconds: float) -> str:
    """``3h 05m``, ``12m``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


@dataclass
class RunOutcome:
    """What happened to one run in this sweep invocation (stored in ``sweep_state.json``)."""

    name: str
    status: Literal["done", "skipped", "failed", "busy", "pending"]
    returncode: int | None = None
    seconds: float | None = None
    attempts: int = 0
    resumed: bool = False
    log: str | None = None
    error: str | None = None


@dataclass
class SweepSummary:
    """The result of :func:`run_sweep`: every run's outcome and the sweep's wall time."""

    output_dir: Path
    outcomes: dict[str, RunOutcome]
    wall_seconds: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    @property
    def ok(self) -> bool:
        return all(o.status in ("done", "skipped") for o in self.outcomes.values())


class _State:
    """``sweep_state.json``: the per-run outcome, the invocation history; written atomically under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"invocations": [], "runs": {}}
        if path.is_file():
            # a torn file cannot happen (atomic writes); a broken hand-edited one is replaced
            with contextlib.suppress(json.JSONDecodeError):
                self.data = json.loads(path.read_text())
            self.data.setdefault("invocations", [])
            self.data.setdefault("runs", {})

    def record(self, outcome: RunOutcome) -> None:
        with self.lock:
            previous = self.data["runs"].get(outcome.name, {})
            entry = asdict(outcome)
            entry["total_attempts"] = int(previous.get("total_attempts", 0)) + outcome.attempts
            entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.data["runs"][outcome.name] = entry
            write_json_atomic(self.path, self.data)

    def start(self, info: dict[str, Any]) -> None:
        with self.lock:
            self.data["invocations"].append(info)
            write_json_atomic(self.path, self.data)

    def finish(self, info: dict[str, Any]) -> None:
        with self.lock:
            if self.data["invocations"]:
                self.data["invocations"][-1].update(info)
            write_json_atomic(self.path, self.data)


# ------------------------------------------------------------------------------------------------ running


def _cli_value(value: Any) -> str:
    """How a value is spelled for jsonargparse: lists as JSON, numbers exactly, booleans lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def train_command(
    spec: RunSpec, base_file: Path, run_dir: Path, python: str | None = None, resume_args: Sequence[str] = ()
) -> list[str]:
    """``python -m chainlora train --config <base> --key value ... --output_dir <dir> [--resume <dir>]``."""
    cmd = [python or sys.executable, "-m", "chainlora", "train", "--config", str(base_file)]
    for key, value in spec.overrides:
        cmd += [f"--{key}", _cli_value(value)]
    cmd += ["--output_dir", str(run_dir), *resume_args]
    return cmd


def usable_cpus() -> int:
    """Cores this process may run on (cgroup/affinity aware where the platform says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def worker_env(slot: int, options: SweepOptions, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a run on worker ``slot``: GPU pinning from ``devices``; CPU threads
    ``threads_per_worker``, by default one per CPU run (see :class:`SweepOptions`) and the usable cores split
    evenly between GPU runs."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(options.env)
    if options.devices:
        env["CUDA_VISIBLE_DEVICES"] = options.devices[slot % len(options.devices)]
    threads = options.threads_per_worker
    if threads is None:
        threads = max(1, usable_cpus() // options.workers) if options.devices else 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class SweepInterrupted(Exception):
    """Raised in the main thread by SIGTERM/SIGINT: stop launching, terminate the running children."""


class SweepRunner:
    """Runs the unfinished runs of a sweep on ``options.workers`` workers; see the module docstring."""

    def __init__(self, config: SweepConfig, *, echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.options = config.options
        self.root = Path(self.options.output_dir)
        self.echo = echo or (lambda msg: print(msg, flush=True))
        self.specs = config.runs()
        if self.options.only:
            pattern = re.compile(self.options.only)
            self.specs = [s for s in self.specs if pattern.search(s.name)]
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._children_lock = threading.Lock()
        self._stop = threading.Event()
        self._slots: list[int] = list(range(self.options.workers))
        self._slots_lock = threading.Lock()

    # -- files
    def run_dir(self, spec: RunSpec) -> Path:
        return self.root / spec.name

    def log_path(self, spec: RunSpec) -> Path:
        return self.root / rundir.SWEEP_LOG_DIR / f"{spec.name}.log"

    def write_plan(self) -> Path:
        """Write the resolved base config and the plan (every run's cell, axes and overrides).

        The plan of an existing sweep folder is extended, never shrunk: runs planned by an earlier grid stay
        listed (a report shows them as not yet run). The base config must not change, because run names only
        encode grid axes: a finished run would silently stand for other settings.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        plan_path = self.root / rundir.SWEEP_PLAN_FILE
        previous: list[dict[str, Any]] = []
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if json.loads(json.dumps(old.get("base"))) != json.loads(json.dumps(self.config.base)):
                raise ConfigError(
                    f"the base config differs from the one this sweep folder was started with "
                    f"({plan_path}); finished runs would not match it: use another output_dir"
                )
            previous = old.get("runs", [])
        runs = [s.to_json() for s in self.config.runs()]  # the whole grid, even under --only
        names = {r["name"] for r in runs}
        runs = [r for r in previous if r["name"] not in names] + runs
        base_file = self.root / rundir.SWEEP_BASE_FILE
        with atomic_path(base_file) as tmp:
            tmp.write_text(
                "# Resolved base train config of this sweep (written by `chainlora sweep`).\n"
                + yaml.safe_dump(self.config.base, sort_keys=False)
            )
        plan = {
            "source": self.config.source,
            "base": self.config.base,
            "grid": self.config.grid,
            "options": asdict(self.options),
            "runs": runs,
        }
        write_json_atomic(plan_path, plan)
        return base_file

    # -- one run
    def _acquire_slot(self) -> int:
        with self._slots_lock:
            return self._slots.pop(0)

    def _release_slot(self, slot: int) -> None:
        with self._slots_lock:
            self._slots.append(slot)
            self._slots.sort()

    def _execute(self, spec: RunSpec, base_file: Path) -> RunOutcome:
        run_dir = self.run_dir(spec)
        log = self.log_path(spec)
        outcome = RunOutcome(name=spec.name, status="pending", log=str(log))
        if is_finished(run_dir):
            outcome.status = "skipped"
            return outcome
        lock_path = self.root / rundir.SWEEP_LOCK_DIR / f"{spec.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                outcome.status = "busy"
                outcome.error = "another process holds this run's lock (still running?)"
                return outcome
            if is_finished(run_dir):  # finished while we waited for the lock
                outcome.status = "skipped"
                return outcome
            slot = self._acquire_slot()
            try:
                for attempt in range(1, self.options.max_attempts + 1):
                    if self._stop.is_set():
                        outcome.status = "pending"
                        break
                    outcome.attempts = attempt
                    self._run_once(spec, base_file, run_dir, log, slot, lock_fd, outcome)
                    if outcome.status == "done":
                        break
            finally:
                self._release_slot(slot)
        finally:
            os.close(lock_fd)  # the child keeps its inherited copy: the lock lives until both are gone
        return outcome

    def _run_once(
        self,
        spec: RunSpec,
        base_file: Path,
        run_dir: Path,
        log: Path,
        slot: int,
        lock_fd: int,
        outcome: RunOutcome,
    ) -> None:
        resume_args: list[str] = []
        if run_dir.exists():
            if self.options.resume == "auto" and rundir.is_started(run_dir):
                resume_args = [a.replace("{run_dir}", str(run_dir)) for a in self.options.resume_args]
                outcome.resumed = True
            else:
                shutil.rmtree(run_dir)  # unfinished and nothing to resume from: start clean
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = train_command(spec, base_file, run_dir, self.options.python, resume_args)
        env = worker_env(slot, self.options)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "ab") as out:
            header = (
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {outcome.attempts} slot {slot}"
                f"{' (resume)' if resume_args else ''}\n$ {shlex.join(cmd)}\n"
            )
            out.write(header.encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(lock_fd,),
                start_new_session=True,  # its own process group: we terminate it (and its children) as one
            )
            with self._children_lock:
                self._children[spec.name] = proc
            try:
                rc = proc.wait(timeout=self.options.run_timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _terminate(proc)
                rc = proc.wait()
                timed_out = True
            finally:
                with self._children_lock:
                    self._children.pop(spec.name, None)
        outcome.seconds = round(time.perf_counter() - start, 1)
        outcome.returncode = rc
        if rc == 0 and is_finished(run_dir):
            outcome.status, outcome.error = "done", None
            # e.g. final/ (the merged model, 0.5 GB for 135M params): the report needs metrics.json only
            for sub in self.options.cleanup:
                target = (run_dir / sub).resolve()
                if run_dir.resolve() in target.parents:
                    shutil.rmtree(target, ignore_errors=True)
        elif self._stop.is_set():
            outcome.status, outcome.error = "pending", "interrupted (the sweep was stopped)"
        else:
            outcome.status = "failed"
            if timed_out:
                outcome.error = f"timed out after {self.options.run_timeout_s} s"
            elif rc == 0:
                outcome.error = f"exited 0 but wrote no {rundir.METRICS_FILE}"
            else:
                outcome.error = f"exit code {rc}: " + (_tail(log, 5).replace("\n", " | ")[-600:])

    # -- the sweep
    def terminate_children(self) -> None:
        with self._children_lock:
            procs = list(self._children.values())
        for proc in procs:
            _terminate(proc)

    def run(self) -> SweepSummary:
        """Run every unfinished run (``options.dry_run``: print their commands); return their outcomes. Safe to
        call again after a kill."""
        start = time.perf_counter()
        base_file = self.write_plan()
        state = _State(self.root / rundir.SWEEP_STATE_FILE)
        todo = [s for s in self.specs if not is_finished(self.run_dir(s))]
        outcomes = {s.name: RunOutcome(s.name, "skipped") for s in self.specs if s not in todo}
        self.echo(
            f"sweep {self.config.source or ''} -> {self.root}: {len(self.specs)} runs, "
            f"{len(self.specs) - len(todo)} finished, {len(todo)} to run on {self.options.workers} worker(s)"
            + (f", devices {','.join(self.options.devices)}" if self.options.devices else "")
        )
        if self.options.dry_run:
            for s in todo:
                self.echo(shlex.join(train_command(s, base_file, self.run_dir(s), self.options.python)))
            return SweepSummary(self.root, outcomes, time.perf_counter() - start)
        state.start(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv,
                "workers": self.options.workers,
                "devices": self.options.devices,
                "todo": len(todo),
            }
        )
        previous = _install_signal_handlers()
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="sweep")
        futures: dict[Future[RunOutcome], RunSpec] = {}
        done_count = 0
        durations = {
            s.name: (s, seconds)
            for s in self.specs
            if s not in todo and (seconds := finished_seconds(self.run_dir(s))) is not None
        }
        left = {s.name: s for s in todo}
        try:
            for spec in todo:
                futures[pool.submit(self._execute, spec, base_file)] = spec
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = futures[fut]
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # a bug in the runner itself: record, keep going
                        outcome = RunOutcome(spec.name, "failed", error=f"runner error: {exc!r}")
                    outcomes[spec.name] = outcome
                    if outcome.status != "pending":
                        state.record(outcome)
                    done_count += 1
                    secs = f" in {outcome.seconds:.0f} s" if outcome.seconds is not None else ""
                    note = f" ({outcome.error})" if outcome.error else ""
                    resumed = " [resumed]" if outcome.resumed else ""
                    if outcome.status != "pending":
                        left.pop(spec.name, None)
                    if outcome.status == "done" and outcome.seconds:
                        durations[spec.name] = (spec, outcome.seconds)
                    eta = estimate_seconds_left(list(left.values()), durations, self.options.workers)
                    eta_note = f"; ~{format_duration(eta)} left" if eta is not None and left else ""
                    self.echo(
                        f"[{done_count}/{len(todo)}] {outcome.status:7s} {spec.name}{secs}{resumed}{note}"
                        f"{eta_note}"
                    )
        except SweepInterrupted:
            self._stop.set()
            self.echo("sweep interrupted: stopping running runs (continue later with the same command)")
            for fut in futures:
                fut.cancel()
            self.terminate_children()
            pool.shutdown(wait=True)
            for fut, spec in futures.items():  # runs that ended while we were being stopped
                if spec.name in outcomes or fut.cancelled() or fut.exception() is not None:
                    continue
                outcome = fut.result()
                if outcome.status not in ("pending", "skipped"):
                    state.record(outcome)
                    self.echo(f"[stopped] {outcome.status:7s} {spec.name}")
            raise
        finally:
            _restore_signal_handlers(previous)
            pool.shutdown(wait=True)
            wall = time.perf_counter() - start
            state.finish({"ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": round(wall, 1)})
        summary = SweepSummary(self.root, outcomes, time.perf_counter() - start)
        self.echo(
            f"sweep done in {summary.wall_seconds:.0f} s: {summary.count('done')} ran, "
            f"{summary.count('skipped')} already finished, {summary.count('failed')} failed, "
            f"{summary.count('busy')} busy elsewhere"
        )
        for o in outcomes.values():
            if o.status == "failed":
                self.echo(f"  FAILED {o.name}: {o.error} (log: {o.log})")
        return summary


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the run's process group, then SIGKILL it if it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise SweepInterrupted(signal.Signals(signum).name)


def _install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_sweep(
    config: SweepConfig | str | Path, *, echo: Callable[[str], None] | None = None, **option_overrides: Any
) -> SweepSummary:
    """Run (or continue) a sweep; ``config`` is a :class:`SweepConfig` or a sweep YAML path, and
    ``option_overrides`` replace fields of its options (``workers=2``, ``only="^sst2/"``, ``dry_run=True``, ...).
    Writes the report when the sweep ends (``options.report``). SIGINT/SIGTERM stop the running runs and raise
    ``SweepInterrupted``."""
    if not isinstance(config, SweepConfig):
        config = load_sweep_config(config, **option_overrides)
    elif option_overrides:
        opts = {k: v for k, v in option_overrides.items() if v is not None}
        config = replace(config, options=replace(config.options, **opts))
    summary = SweepRunner(config, echo=echo).run()
    options = config.options
    if options.report and not options.dry_run and summary.count("done") + summary.count("skipped"):
        from chainlora.recipes.report import write_report  # matplotlib: only once the runs are done

        out = write_report(summary.output_dir)
        (echo or print)(f"report: {out}")
    return summary


def sweep_command(options: SweepOptions) -> int:
    """``chainlora sweep``: run (or continue) the sweep in ``options.sweep`` with ``options`` (the command line
    over the YAML's ``sweep:`` block). Returns 0 when every selected run is finished (or on a dry run), 1 when
    some failed (they are retried on the next call), 130 when interrupted (SIGINT/SIGTERM; running runs are
    stopped)."""
    if options.sweep is None:
        raise ConfigError("sweep: name the sweep YAML (chainlora sweep SWEEP_YAML)")
    try:
        summary = run_sweep(load_sweep_config(options.sweep, options=options))
    except SweepInterrupted:
        return 130
    return 0 if summary.ok or options.dry_run else 1
