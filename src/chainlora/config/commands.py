"""The configs of the other commands: ``chainlora eval``, ``export``, ``sweep`` and ``report``.

Like :class:`~chainlora.config.TrainConfig`, each is a dataclass with a docstring per field (``--help`` shows
them) that validates in ``__post_init__``; the CLI parses the command line into it (``chainlora.config.parse``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from chainlora.config.checks import SEED_MAX, choice, fail, positive_int
from chainlora.config.data import DataSpec
from chainlora.config.train import Method, Precision, TrainConfig
from chainlora.errors import ConfigError

EvalSplit = Literal["test", "dev"]
ResumeMode = Literal["auto", "restart"]


@dataclass
class EvalConfig:
    """chainlora eval: score a model folder (or a registry model: the 0-shot baseline) on a task's test set."""

    model: str = "smollm2-135m"
    """A model folder (e.g. a run's final/) or a registry name."""
    task: str | None = None
    """Task name (see `chainlora tasks`); null: your own data (--data FILE)."""
    data: DataSpec = field(default_factory=DataSpec)
    """With --task: that task's files (null = $CHAINLORA_DATA, then a PyPI-packaged copy). Without: your own
    data, as in `chainlora train --data` (the same format fields, the same per-seed split)."""
    seed: int = 0
    """Sampling seed: which validation rows form the test set (same draw as `chainlora train`)."""
    num_eval: int | None = None
    """Test examples (a task: drawn from its validation split, default 1000; your data: its test file, or
    that many rows held out of one file as `chainlora train` does with the same seed)."""
    split: EvalSplit = "test"
    """Score the test set, or the dev set of the same draw (needs num_train/num_dev as in training)."""
    num_train: int | None = None
    """With split dev: the num_train of the training run (dev is drawn after train; a task's default 1000)."""
    num_dev: int | None = None
    """With split dev: the num_dev of the training run (null = the task's default)."""
    max_length: int = 2048
    """Longest encoded example in tokens (left truncation keeping BOS)."""
    batch_size: int = 8
    """Examples per scoring batch."""
    precision: Precision = "fp32"
    """Weights dtype for scoring."""
    output: str | None = None
    """Also write the result as JSON to this file."""

    def __post_init__(self) -> None:
        self.data = DataSpec.build(self.data)
        if not isinstance(self.model, str) or not self.model.strip():
            raise fail("model", f"must be a non-empty string, got {self.model!r}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise fail("task", f"must be a task name, got {self.task!r}")
        if self.task is None and self.data.path is None:
            raise fail("task", "name a task (--task boolq; see `chainlora tasks`) or your data (--data FILE)")
        if self.task is not None and self.data.is_custom:
            raise fail("data", "format fields describe your own data; with --task only data.path applies")
        positive_int("seed", self.seed, allow_zero=True, high=SEED_MAX)
        if self.num_eval is not None:
            positive_int("num_eval", self.num_eval)
        choice("split", self.split, EvalSplit)
        if self.num_train is not None:
            positive_int("num_train", self.num_train, allow_zero=True)
        if self.num_dev is not None:
            positive_int("num_dev", self.num_dev, allow_zero=True)
        positive_int("max_length", self.max_length)
        positive_int("batch_size", self.batch_size)
        choice("precision", self.precision, Precision)


@dataclass
class ExportConfig:
    """chainlora export RUN_DIR --adapter [--rank R]: the run's whole chain as one standard PEFT LoRA adapter."""

    run_dir: str
    """A `chainlora train` run folder (or a checkpoint / chain folder inside it)."""
    adapter: bool = True
    """Export the chain as a PEFT adapter (the only export there is; accepted for clarity)."""
    rank: int | None = None
    """Compress every layer's summed update to this rank by SVD (reports the relative error per layer)."""
    out: str | None = None
    """Output folder (default: RUN_DIR/adapter, or RUN_DIR/adapter-r{R} with --rank)."""
    overwrite: bool = False
    """Replace an existing, different adapter folder."""
    score: bool = True
    """With --rank: also score the full and the truncated adapter on the run's task and test draw."""


@dataclass
class ReportConfig:
    """chainlora report SWEEP_DIR: the sweep's tables in the paper's layout (mean ± sd over seeds, gain of
    COLA over LoRA, bold best), chain-length and rank step-down tables and plots, paired tests, LR choices."""

    sweep_dir: str
    """The sweep's output folder (holds sweep_plan.json and the run folders). Also the first positional."""
    output: str | None = None
    """The markdown file (default: SWEEP_DIR/report.md)."""
    plots_dir: str | None = None
    """Where the PNG plots go (default: SWEEP_DIR/plots)."""
    percent: bool | None = None
    """Show scores x100 (default: when every score is a fraction in [0, 1])."""
    merge: list[str] | str = field(default_factory=list)
    """Other sweep folders (one, or a list: [A,B]) whose finished runs join the report where they share a task
    and setting with this sweep's runs, e.g. the baselines a follow-up or control sweep is compared with."""


@dataclass
class SweepOptions:
    """chainlora sweep SWEEP_YAML: run a grid of `chainlora train` runs, one subprocess each; resumable (run
    the same command again to continue a killed sweep). See configs/sweeps/ for the paper's tables.

    Every option can also be set in the YAML's ``sweep:`` block; the command line overrides it."""

    sweep: str | None = None
    """The sweep YAML (blocks base, grid, sweep). Also accepted as the first positional argument."""
    output_dir: str = "runs/sweep"
    """Root folder of the runs, the sweep's plan, state and logs."""
    workers: int = 1
    """Runs at once, each in its own subprocess."""
    devices: list[str] | str | None = None
    """GPU ids, e.g. 0,1: worker i gets CUDA_VISIBLE_DEVICES=devices[i % len]. null: no pinning."""
    threads_per_worker: int | None = None
    """CPU threads per run. null: 1 for CPU runs (on shared cores a 2-thread torch job beside another one waits on
    OpenMP barriers and runs 5-15x slower), usable cores // workers for GPU runs (devices)."""
    resume: ResumeMode = "auto"
    """auto: continue an unfinished run with `train --resume`; restart: clear it and start over."""
    resume_args: list[str] = field(default_factory=lambda: ["--resume", "{run_dir}"])
    """How `chainlora train` is told to resume a run ({run_dir} is replaced by its folder)."""
    run_timeout_s: float | None = None
    """Kill a run after this many seconds and record it as failed."""
    max_attempts: int = 1
    """Tries per run within one sweep invocation."""
    python: str | None = None
    """Interpreter for the runs (default: this one)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every run."""
    report: bool = True
    """Write report.md and plots (`chainlora report`) when the sweep ends."""
    cleanup: list[str] = field(default_factory=list)
    """Run subfolders deleted once a run is done (e.g. final: the report needs metrics.json only)."""
    vary_train_seed: bool = True
    """train_seed = seed, so LoRA init and batch order vary with the seed too (false: the harness's fixed 42)."""
    only: str | None = None
    """Regular expression: run only the runs whose name matches (e.g. '^sst2/')."""
    dry_run: bool = False
    """Print the train commands of the unfinished runs and exit."""

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"sweep.workers must be a positive integer, got {self.workers!r}")
        if self.resume not in ("auto", "restart"):
            raise ConfigError(f"sweep.resume must be 'auto' or 'restart', got {self.resume!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"sweep.max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(f"sweep.threads_per_worker must be >= 1, got {self.threads_per_worker!r}")
        if isinstance(self.devices, str):
            self.devices = parse_devices(self.devices)
        if self.devices is not None:
            self.devices = [str(d) for d in self.devices]
            if not self.devices:
                raise ConfigError("sweep.devices is empty: name at least one device id, or leave it unset")
        self.env = {str(k): str(v) for k, v in (self.env or {}).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepOptions:
        """Build (and validate) from a YAML ``sweep:`` block, or that block under command-line values."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(data) - known
        if bad:
            raise ConfigError(f"unknown sweep option(s) {sorted(bad)}; known: {sorted(known)}")
        return cls(**data)


def parse_devices(devices: str | Sequence[str | int] | None) -> list[str] | None:
    """``"0,1"`` or ``[0, 1]`` → ``["0", "1"]``; ``None``/``""`` → ``None`` (no GPU pinning)."""
    if devices is None or devices == "":
        return None
    if isinstance(devices, str):
        items = [d.strip() for d in devices.split(",") if d.strip()]
    else:
        items = [str(d) for d in devices]
    return items or None


@dataclass
class CompareConfig(TrainConfig):
    """chainlora compare: the same training budget for several methods on paired seeds, then whether they differ.

    Every train field applies to every method (the budget is the same); ``methods`` x ``seeds`` runs go through
    ``chainlora sweep`` (resumable, parallel workers) and the report pairs them by seed."""

    methods: list[str] = field(default_factory=lambda: ["lora", "cola"])
    """The methods to run (lora, cola, full); every other is compared with `baseline`."""
    baseline: str = "lora"
    """The method the others are compared with (one of methods)."""
    seeds: int = 5
    """Paired seeds 0..N-1: with seed s every method draws the same data split and the same LoRA init."""
    lrs: dict[str, float] = field(default_factory=dict)
    """A learning rate per method (e.g. {full: 1e-5}); the others use lr."""
    workers: int = 1
    """Runs in parallel (each with its own threads or device, as in chainlora sweep)."""
    devices: list[str] | str | None = None
    """Devices for the workers, as in chainlora sweep (e.g. 0,1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.methods, list) or len(self.methods) < 2:
            raise fail("methods", f"must list at least two methods to compare, got {self.methods!r}")
        for method in self.methods:
            if method not in typing.get_args(Method):
                raise fail("methods", f"unknown method {method!r}: expected lora, cola or full")
        if len(set(self.methods)) != len(self.methods):
            raise fail("methods", f"names a method twice: {self.methods!r}")
        if self.baseline not in self.methods:
            raise fail("baseline", f"{self.baseline!r} is not one of methods {self.methods}")
        positive_int("seeds", self.seeds)
        if not isinstance(self.lrs, dict):
            raise fail("lrs", f"must map method -> learning rate, got {self.lrs!r}")
        for method, lr in self.lrs.items():
            if method not in self.methods:
                raise fail("lrs", f"{method!r} is not one of methods {self.methods}")
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
                raise fail(f"lrs.{method}", f"must be a positive number, got {lr!r}")
        positive_int("workers", self.workers)
        if self.chain.knots not in (None, "auto"):
            raise fail("chain.knots", "explicit knot steps fit one method's run; compare sets chain.length")
        if self.resume is not None:
            raise fail("resume", "compare resumes by itself: run the same command again")

    def train_fields(self) -> dict[str, Any]:
        """The train config every run starts from (the compare-only fields removed)."""
        data = self.to_dict()
        for name in ("methods", "baseline", "seeds", "lrs", "workers", "devices", "output_dir", "resume"):
            data.pop(name)
        return data

    def for_method(self, method: str) -> TrainConfig:
        """The train config of ``method``'s runs (without the seed's overrides): the chain fields are COLA's."""
        data = self.train_fields() | {"method": method}
        if method != "cola":
            data["chain"] = {**data["chain"], "length": None, "ranks": None, "knots": None}
        return TrainConfig.from_dict(data)


@dataclass
class ChatConfig:
    """chainlora chat RUN_DIR [--prompt TEXT]: talk to a trained model (its merged final/, or base + adapter/)."""

    run_dir: str
    """A `chainlora train` run folder, a model folder, or a registry name (0-shot)."""
    prompt: str | None = None
    """Answer this one message and exit (no interactive session)."""
    system: str | None = None
    """A system message put first in the conversation."""
    adapter: bool = False
    """Load the run's base model + adapter/ (the whole chain as one PEFT adapter) instead of final/."""
    max_new_tokens: int = 256
    """Longest answer, in tokens."""
    temperature: float = 0.0
    """0 = greedy (the default); above 0, sampling at this temperature."""
    chat_template: str | None = None
    """A Jinja chat template (its text, or a file holding it) instead of the model's own."""
    seed: int = 0
    """Seed of the sampling (with temperature > 0)."""

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, str) or not self.run_dir.strip():
            raise fail(
                "run_dir", f"must name a run folder, model folder or registry model, got {self.run_dir!r}"
            )
        positive_int("max_new_tokens", self.max_new_tokens)
        positive_int("seed", self.seed, allow_zero=True)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise fail("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise fail("temperature", f"must be in [0, 100], got {self.temperature!r}")
        for name in ("prompt", "system", "chat_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise fail(name, f"must be a non-empty string, got {value!r}")
