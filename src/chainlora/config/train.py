"""The config of ``chainlora train``: :class:`TrainConfig` with its LoRA and chain settings; YAML files mirror it.

Every field has a docstring (shown by ``chainlora train --help``). ``__post_init__`` validates and fills the
method-dependent defaults (``lr``, ``chain.length``), so a config that exists is a runnable one: a bad field
raises :class:`~chainlora.errors.ConfigError` with one line that names it (``lora.r: must be ...``).
What needs the data or the model (the knot schedule against the real number of steps, target modules present
in the model) is checked by ``chainlora.recipes.train.setup``, still before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chainlora.config.checks import SEED_MAX, choice, fail, number, positive_int
from chainlora.config.data import DataSpec
from chainlora.errors import ConfigError

Method = Literal["lora", "cola", "full"]
Optimizer = Literal["adamw", "sgd", "adagrad"]
LRSchedule = Literal["linear", "jagged", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
CompileMode = Literal["auto", "on", "off"]
Selection = Literal["dev_loss", "dev_score", "last"]
LoRAInit = Literal["gaussian", "kaiming"]
NonFinite = Literal["skip", "halt"]
Quantize = Literal["none", "nf4", "fp4", "int8"]
QuantizedMerge = Literal["residual", "requantize"]

# Paper defaults (REFERENCE.md): LoRA/COLA and full fine-tuning search different LR grids; these are the
# middle of each grid, used when ``lr`` is not given.
DEFAULT_LR: dict[str, float] = {"lora": 5e-4, "cola": 5e-4, "full": 1e-5}
DEFAULT_CHAIN_LENGTH: dict[str, int] = {"lora": 1, "cola": 3, "full": 1}


@dataclass
class LoRASettings:
    """LoRA links (each link of a COLA chain is one LoRA adapter; ignored by method full)."""

    r: int = 8
    """Rank of the LoRA link (the paper: 8). With chain.ranks, must equal chain.ranks[0]."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora). The paper: 16."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input (the harness: 0)."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt (the paper: q_proj, v_proj of every attention layer) or 'all-linear'."""
    bias: bool | None = None
    """Train a bias in each LoRA B (the paper: on for OPT, off for Llama). null = on iff the model is OPT."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r."""
    init: LoRAInit = "gaussian"
    """Init of A in every link: 'gaussian' (std 1/r, the paper) or 'kaiming' (uniform a=sqrt(5), the harness)."""

    def __post_init__(self) -> None:
        positive_int("lora.r", self.r)
        number("lora.alpha", self.alpha, open_low=True)
        number("lora.dropout", self.dropout, high=1.0)
        if self.dropout >= 1.0:
            raise fail("lora.dropout", f"must be < 1, got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise fail(
                    "lora.target_modules",
                    f"must be a list of names or 'all-linear', got {self.target_modules!r}",
                )
        elif not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise fail(
                "lora.target_modules",
                f"must be a non-empty list of module names, got {self.target_modules!r}",
            )
        else:
            self.target_modules = list(self.target_modules)
        if self.bias is not None and not isinstance(self.bias, bool):
            raise fail("lora.bias", f"must be true, false or null, got {self.bias!r}")
        choice("lora.init", self.init, LoRAInit)


@dataclass
class AutoKnotSettings:
    """Adaptive knots (``chain.knots: auto``): a knot when the current link stops improving (chainlora.schedules)."""

    min_link_steps: int | None = None
    """Every link trains at least this many optimizer steps. null = a quarter of an even link's length."""
    patience: int | None = None
    """Window (in steps) over which the smoothed loss must improve by ``threshold``. null = min_link_steps // 2."""
    threshold: float = 0.01
    """Relative improvement of the smoothed training loss over ``patience`` steps below which a link is done."""
    ema: float = 0.9
    """Smoothing of the training loss: L ← ema·L + (1 − ema)·loss."""
    signal: Literal["loss", "dev", "either"] = "either"
    """What decides a knot: the smoothed training loss, a stalling dev score (per epoch), or either."""
    rank_rule: Literal["fixed", "halve"] = "fixed"
    """Rank of later links when chain.ranks is not given: keep lora.r, or halve it at every knot."""

    def __post_init__(self) -> None:
        for name in ("min_link_steps", "patience"):
            if getattr(self, name) is not None:
                positive_int(f"chain.auto.{name}", getattr(self, name))
        number("chain.auto.threshold", self.threshold, open_low=True)
        if not (isinstance(self.ema, int | float) and not isinstance(self.ema, bool) and 0 <= self.ema < 1):
            raise fail("chain.auto.ema", f"must be in [0, 1), got {self.ema!r}")


@dataclass
class ChainSettings:
    """Where the COLA knots go and the rank of each link (method cola only)."""

    length: int | None = None
    """Number of links M (the paper: 3). null = 3 for cola, 1 for lora. Knots fall on epoch boundaries as in
    the paper (5 epochs, M=2: epochs 1-3 | 4-5) when there are at least M epochs, else evenly in steps."""
    knots: list[int | float] | Literal["auto"] | None = None
    """Explicit knots instead of length: optimizer steps (integers, e.g. [40, 80]) or fractions of the budget
    strictly between 0 and 1 (e.g. [0.6]). A knot is tied right after that step. ``auto``: knots where the
    current link stops improving (chain.auto), with chain.length as the maximum number of links."""
    auto: AutoKnotSettings = field(default_factory=AutoKnotSettings)
    """Settings of ``knots: auto``."""
    ranks: list[int] | None = None
    """Rank of every link (rank step-down, e.g. [8, 4]); one entry per link. null = lora.r throughout."""
    max_relative_delta: float | None = None
    """Refuse a knot whose merged update of some layer is larger than this times that layer's weight norm
    (an exploding link); the run then halts with the model at its last good state. A non-finite update is
    always refused. null = no size limit."""
    quantized_merge: QuantizedMerge = "residual"
    """With quantize: what a knot does with a link. 'residual' folds it into a frozen low-rank residual beside the
    quantized weight (exact; the weight is untouched); 'requantize' adds it to the dequantized weight and
    re-quantizes (the ReLoRA tools' merge: lossy, the error is recorded per knot in metrics.json)."""
    max_residual_rank: int | None = None
    """With quantize and quantized_merge 'residual': cap each layer's residual rank (it grows by r per knot) by
    a truncated SVD; the relative error that drops is recorded per knot. null = no cap (exact)."""
    optimizer_reset: float = 1.0
    """What a knot does to the links' optimizer state. 1.0 (the paper): clear it all, moments and step count, so
    each link starts with a true first step. 0 < x < 1: zero that fraction of every moment, smallest magnitudes
    first, keeping the step count (ReLoRA's and axolotl's relora_prune_ratio, e.g. 0.9). 0.0: keep it all (a
    control). Below 1 it cannot go with a rank change. The fraction zeroed is recorded per knot in metrics.json."""

    def __post_init__(self) -> None:
        if isinstance(self.auto, dict):
            self.auto = AutoKnotSettings(**self.auto)
        if self.length is not None:
            positive_int("chain.length", self.length)
        if self.knots is not None and self.knots != "auto":
            if not isinstance(self.knots, list | tuple):
                raise fail("chain.knots", f"must be a list, got {self.knots!r}")
            self.knots = list(self.knots)
            steps = all(isinstance(k, int) and not isinstance(k, bool) for k in self.knots)
            fractions = all(isinstance(k, float) for k in self.knots)
            if not (steps or fractions):
                raise fail("chain.knots", f"give all steps (integers) or all fractions, got {self.knots!r}")
            for k in self.knots:
                if steps and k < 1:
                    raise fail("chain.knots", f"step {k} must be >= 1")
                if fractions and not 0.0 < k < 1.0:
                    raise fail(
                        "chain.knots", f"fraction {k} must be strictly between 0 and 1 (steps: integers)"
                    )
            if sorted(set(self.knots)) != self.knots:
                raise fail("chain.knots", f"must be strictly increasing, got {self.knots!r}")
            if self.length is not None and self.length != len(self.knots) + 1:
                raise fail(
                    "chain.length",
                    f"{self.length} links do not match {len(self.knots)} knot(s) in chain.knots",
                )
        if self.ranks is not None:
            if not isinstance(self.ranks, list | tuple) or not self.ranks:
                raise fail("chain.ranks", f"must be a non-empty list of ranks, got {self.ranks!r}")
            self.ranks = list(self.ranks)
            for r in self.ranks:
                positive_int("chain.ranks", r)
        if self.max_relative_delta is not None:
            number("chain.max_relative_delta", self.max_relative_delta, open_low=True)
        choice("chain.quantized_merge", self.quantized_merge, QuantizedMerge)
        if self.max_residual_rank is not None:
            positive_int("chain.max_residual_rank", self.max_residual_rank)
        number("chain.optimizer_reset", self.optimizer_reset, high=1.0)

    @property
    def links(self) -> int:
        """Number of links (after TrainConfig has filled ``length``)."""
        if self.knots is not None and self.knots != "auto":
            return len(self.knots) + 1
        return int(self.length or 1)


@dataclass
class TrainConfig:
    """chainlora train: fine-tune a causal LM on a task with LoRA, COLA or full fine-tuning."""

    # --- what ---------------------------------------------------------------------------------------------
    model: str = "smollm2-135m"
    """Registry name (see `chainlora models`) or a local Hugging Face model folder."""
    task: str | None = None
    """A benchmark task of the paper (see `chainlora tasks`), or null to train on your own data (--data)."""
    data: DataSpec = field(default_factory=DataSpec)
    """Your own data (--data FILE, or --data.path FILE --data.format ...), or with --task that task's files."""
    method: Method = "cola"
    """lora (one link), cola (a chain of links, knots merged into the base) or full (all weights train)."""
    quantize: Quantize = "none"
    """Load the base quantized by bitsandbytes (QLoRA; lora and cola): nf4 or fp4 (4-bit) or int8. A knot folds
    each link into a frozen low-rank residual beside the quantized weight (exact, see chain.quantized_merge);
    adapter/ loads onto the quantized base. Needs bitsandbytes: pip install 'chainlora[quantized]'."""

    # --- data sampling (the MeZO harness: 1000 / 500 / 1000) ---------------------------------------------------
    seed: int = 0
    """Sampling seed: which train/dev/test rows are drawn (the harness's seed S; for your data, the split)."""
    num_train: int | None = None
    """Training examples drawn from the train split. null = 1000 for a task (the paper), all rows for your data."""
    num_dev: int | None = None
    """Dev examples (model selection), drawn from the train split too. null = the task's default (500, 100
    for CB/COPA); for your data its validation file, else 10% of the rows (at most 500); 0 = no dev set (then
    selection must be 'last')."""
    num_eval: int | None = None
    """Test examples. null = 1000 for a task (drawn from its validation split; smaller splits whole); for your
    data its test file, else none (set it to hold out that many rows for testing)."""
    max_length: int = 2048
    """Longest encoded example in tokens; longer prompts are left-truncated keeping BOS (the harness: 2048)."""
    harness_quirks: bool = False
    """Reproduce the harness's WSC split quirk (54 train / 500 dev); off: dev is cut to a quarter of the draw."""

    # --- optimisation ----------------------------------------------------------------------------------------
    optimizer: Optimizer = "adamw"
    """adamw, sgd (no momentum) or adagrad (the paper's Table 5)."""
    lr: float | None = None
    """Peak learning rate. null = 5e-4 for lora/cola, 1e-5 for full (the middle of the paper's grids)."""
    weight_decay: float = 0.0
    """Weight decay (not applied to biases and norms; the harness: 0)."""
    lr_schedule: LRSchedule = "linear"
    """'linear': one warmup + linear decay over the whole run, across links (the paper's natural reading);
    'jagged': warmup + linear decay restarted at every knot; 'constant': warmup then constant."""
    warmup: float = 0.0
    """Warmup: a fraction of the steps if < 1 (of each link with 'jagged'), else a number of steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (the HF default 1.0); 0 = off."""
    nonfinite: NonFinite = "skip"
    """A step whose loss or gradient is NaN/inf: 'skip' it (no update at all, logged) or 'halt' the run before
    the update. Either way no non-finite value ever reaches the weights."""
    max_nonfinite_skips: int = 3
    """With nonfinite 'skip': at most this many consecutive steps are skipped; the next non-finite one halts."""
    epochs: int = 5
    """Training epochs (the paper: 5). The chain splits this budget; it does not add to it."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead of after `epochs` (knot fractions refer to it)."""
    batch_size: int = 8
    """Examples per optimizer step and device, before gradient accumulation (the paper: 8 for OPT-1.3B)."""
    grad_accum: int = 1
    """Gradient accumulation: micro-batches of batch_size per optimizer step."""
    eval_batch_size: int | None = None
    """Examples per scoring batch (dev/test). null = batch_size."""
    precision: TrainPrecision = "auto"
    """Autocast dtype: fp32, bf16 or fp16. auto = bf16 where the device has native bf16 matmuls (CUDA bf16
    GPUs; CPUs with AMX or AVX512-BF16), else fp32 (chainlora.perf.speed_defaults; BENCHMARKS.md §1). LoRA
    parameters, their gradients and the optimizer state are fp32 in every case."""
    base_dtype: TrainPrecision = "auto"
    """Dtype of the frozen base weights (lora/cola). auto = the autocast dtype: a bf16 base under bf16 autocast
    (no weight cast every step, half the weight memory); knots and the final merge stay exact through fp32
    master copies of the targeted weights, kept on the CPU. Full fine-tuning always keeps fp32 weights."""
    compile: CompileMode = "auto"
    """torch.compile the model: on, off, or auto = on where it pays (CUDA: chainlora.perf.speed_defaults), off on
    the CPU, where compiling takes over a minute and is repaid only after ~300 steps (BENCHMARKS.md §1). Under
    auto, if compiling or a compiled step raises, the run trains eagerly after one warning (metrics.json:
    speed.compile "failed → eager: <reason>"); on fails loudly. A knot re-initialises the links in place, so
    the compiled graph survives it; a rank change compiles once more."""
    group_by_length: bool = True
    """Batch examples of similar token length together (HF's length grouping, seeded per epoch by
    train_seed) instead of random batches padded to their longest row (BENCHMARKS.md §3)."""
    shared_prompt: bool = True
    """Verbalized classification tasks (every option one token after a shared prompt: sst2, rte, cb, boolq,
    wsc, wic, multirc): one row per example instead of one per candidate, the same loss (BENCHMARKS.md §3).
    Other tasks train on the harness's rows whatever this says."""
    pad_to_multiple_of: int | None = None
    """Training batches are padded to a multiple of this many tokens. null = auto: 8 on CUDA (tensor-core tiles),
    the longest row elsewhere, where rounding only adds tokens (chainlora.perf.pad_multiple; BENCHMARKS.md §3,
    §8). Setting it to max_length gives every batch the same width, e.g. to compare runs on different numbers of
    processes to float rounding."""
    train_seed: int = 42
    """Seed of LoRA init, dropout and batch order (the harness keeps it at 42 for every sampling seed)."""

    # --- model selection and evaluation ----------------------------------------------------------------------
    selection: Selection = "dev_loss"
    """Which epoch's state is tested and exported: lowest dev loss (the harness: HF's default), highest dev
    score, or the last one."""
    zero_shot: bool = True
    """Also score the pretrained model on the test set (0-shot baseline), before training."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where to log: tensorboard (in RUN_DIR/tb) and/or any integration the HF Trainer knows by name (wandb,
    mlflow, comet_ml, ...; installed separately); [] or [none] logs nowhere but metrics.json."""

    # --- the LoRA links and the chain ------------------------------------------------------------------------
    lora: LoRASettings = field(default_factory=LoRASettings)
    chain: ChainSettings = field(default_factory=ChainSettings)

    # --- outputs ---------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Run directory. null = runs/<task>-<method>-<model>-s<seed>."""
    overwrite: bool = False
    """Replace a run directory that already holds a run."""
    resume: str | None = None
    """Continue the interrupted run in this directory (its config.yaml is the base config)."""
    save_steps: int | None = None
    """Also checkpoint every this many optimizer steps (null: once per epoch); resume starts from the last."""
    keep_checkpoints: bool = False
    """Keep checkpoints/ after a successful run (they are deleted once final/ is written)."""
    save_adapter: bool = True
    """Write adapter/ beside final/: the whole chain (every tied link + the current one) as ONE standard PEFT
    LoRA adapter that loads onto the original base model (lora and cola; method full has none)."""
    save_final: bool | None = None
    """Write final/, the merged model, and test it. null = yes, except with quantize: then the trained model
    (quantized base + chain) is tested and adapter/ is the result; true merges the chain into the dequantized
    base in bf16 (the cast's error is recorded in metrics.json)."""
    logging_steps: int = 1
    """Log the training loss every this many optimizer steps."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRASettings(**self.lora)
        if isinstance(self.chain, dict):
            self.chain = ChainSettings(**self.chain)
        self.data = DataSpec.build(self.data)
        if not isinstance(self.model, str) or not self.model.strip():
            raise fail("model", f"must be a non-empty string, got {self.model!r}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise fail("task", f"must be a task name or null, got {self.task!r}")
        if self.task is not None and self.data.is_custom:
            raise fail("data", f"task {self.task} has its own format: with --task, only data.path applies")
        choice("method", self.method, Method)
        positive_int("seed", self.seed, allow_zero=True, high=SEED_MAX)
        positive_int("train_seed", self.train_seed, allow_zero=True, high=SEED_MAX)
        if self.num_train is not None:
            positive_int("num_train", self.num_train)
        if self.num_dev is not None:
            positive_int("num_dev", self.num_dev, allow_zero=True)
        if self.num_eval is not None:
            positive_int("num_eval", self.num_eval, allow_zero=True)
        positive_int("max_length", self.max_length)
        if self.max_length < 8:
            raise fail("max_length", f"must be at least 8 tokens, got {self.max_length}")
        choice("optimizer", self.optimizer, Optimizer)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        number("lr", self.lr, open_low=True)
        number("weight_decay", self.weight_decay)
        choice("lr_schedule", self.lr_schedule, LRSchedule)
        number("warmup", self.warmup)
        if self.warmup >= 1 and not float(self.warmup).is_integer():
            raise fail("warmup", f"a number of steps must be whole, got {self.warmup!r}")
        number("max_grad_norm", self.max_grad_norm)
        choice("nonfinite", self.nonfinite, NonFinite)
        positive_int("max_nonfinite_skips", self.max_nonfinite_skips, allow_zero=True)
        positive_int("epochs", self.epochs)
        if self.max_steps is not None:
            positive_int("max_steps", self.max_steps)
        positive_int("batch_size", self.batch_size)
        positive_int("grad_accum", self.grad_accum)
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        positive_int("eval_batch_size", self.eval_batch_size)
        choice("precision", self.precision, TrainPrecision)
        choice("base_dtype", self.base_dtype, TrainPrecision)
        choice("compile", self.compile, CompileMode)
        choice("quantize", self.quantize, Quantize)
        if self.save_final is not None and not isinstance(self.save_final, bool):
            raise fail("save_final", f"must be true, false or null, got {self.save_final!r}")
        if self.pad_to_multiple_of is not None:
            positive_int("pad_to_multiple_of", self.pad_to_multiple_of)
        for name in ("group_by_length", "shared_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, f"must be true or false, got {getattr(self, name)!r}")
        choice("selection", self.selection, Selection)
        if self.num_dev == 0 and self.selection != "last":
            raise fail("selection", f"{self.selection!r} needs a dev set, but num_dev is 0: use 'last'")
        if self.save_steps is not None:
            positive_int("save_steps", self.save_steps)
        positive_int("logging_steps", self.logging_steps)
        if not isinstance(self.report_to, list) or not all(isinstance(r, str) and r for r in self.report_to):
            raise fail("report_to", f"must be a list of integration names, got {self.report_to!r}")
        for name in ("output_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise fail(name, f"must be a path, got {value!r}")
        self._check_method()

    def _check_method(self) -> None:
        """Cross-field rules of the three methods (the chain is COLA's; plain LoRA is a chain of one link)."""
        chain = self.chain
        if self.method == "cola":
            if chain.length is None and chain.knots in (None, "auto"):
                chain.length = DEFAULT_CHAIN_LENGTH["cola"]
            if chain.knots == "auto" and self.logging_steps != 1:
                raise fail(
                    "logging_steps", "knots: auto decides from every step's loss: it needs logging_steps 1"
                )
            if chain.knots == "auto" and self.lr_schedule == "jagged":
                raise fail(
                    "lr_schedule", "'jagged' restarts at known knots; knots: auto decides them on the fly"
                )
        elif chain.knots or (chain.length or 1) > 1:
            raise fail(
                "chain.knots" if chain.knots else "chain.length",
                f"method {self.method} has no knots; use method cola for a chain of links",
            )
        elif chain.length is None:
            chain.length = 1
        if self.method == "full" and chain.ranks is not None:
            raise fail("chain.ranks", "method full has no LoRA links")
        if self.method == "full" and self.base_dtype not in ("auto", "fp32"):
            raise fail(
                "base_dtype", f"method full trains the base weights: they stay fp32, not {self.base_dtype}"
            )
        if chain.ranks is not None:
            if len(chain.ranks) != chain.links:
                raise fail(
                    "chain.ranks",
                    f"{len(chain.ranks)} rank(s) {chain.ranks} for a chain of {chain.links} link(s)",
                )
            if chain.ranks[0] != self.lora.r:
                raise fail(
                    "chain.ranks", f"first link rank {chain.ranks[0]} differs from lora.r={self.lora.r}"
                )
        if self.lr_schedule == "jagged" and self.method != "cola":
            raise fail("lr_schedule", "'jagged' restarts at knots; only method cola has knots")
        if chain.optimizer_reset != 1.0:
            if self.method != "cola":
                raise fail("chain.optimizer_reset", "acts at knots; only method cola has knots")
            ranks_change = (chain.ranks is not None and len(set(chain.ranks)) > 1) or (
                chain.knots == "auto" and chain.auto.rank_rule == "halve"
            )
            if ranks_change:
                raise fail(
                    "chain.optimizer_reset",
                    f"{chain.optimizer_reset} keeps optimizer state across knots, which a rank change cannot "
                    "(the next link's parameters have another shape); use 1.0 with chain.ranks or rank_rule halve",
                )
        if self.quantize != "none" and self.method == "full":
            raise fail(
                "quantize", "method full trains every weight, which cannot stay quantized; use lora or cola"
            )
        if self.quantize == "none" and (
            chain.quantized_merge != "residual" or chain.max_residual_rank is not None
        ):
            name = (
                "chain.max_residual_rank" if chain.max_residual_rank is not None else "chain.quantized_merge"
            )
            raise fail(name, "applies to a quantized base only: add --quantize nf4|fp4|int8")
        if chain.quantized_merge == "requantize" and chain.max_residual_rank is not None:
            raise fail(
                "chain.max_residual_rank",
                "caps the residual, which quantized_merge 'requantize' leaves empty",
            )

    @property
    def workload_name(self) -> str:
        """What the run trains on, in a word: the task, or your data file's (or folder's) name without suffix.
        A config that names neither cannot run: one ``ConfigError`` line says what to give."""
        if self.task is not None:
            return self.task
        if self.data.path is None:
            raise fail(
                "task",
                "name a benchmark task (--task sst2; see `chainlora tasks`) or your data (--data FILE)",
            )
        return Path(self.data.path).name.split(".")[0] or "data"

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build (and validate) from a nested dict; an unknown key raises ConfigError naming it."""
        return _from_dict(cls, data)

    def comparable(self) -> dict[str, Any]:
        """The fields that define a run's result (everything but where/how it is started)."""
        data = self.to_dict()
        for key in ("overwrite", "resume", "keep_checkpoints"):
            data.pop(key)
        return data


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        key = unknown[0]
        shown = (
            key if isinstance(key, str) and key.isidentifier() else repr(key)
        )  # one line, whatever the key
        raise ConfigError(f"{prefix}{shown}: unknown field (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        nested = _NESTED.get((cls, name))
        if nested is not None and hasattr(nested, "coerce"):
            value = nested.coerce(value)  # e.g. `data: FILE` for `data: {path: FILE}`
        kwargs[name] = _from_dict(nested, value or {}, f"{prefix}{name}.") if nested else value
    return cls(**kwargs)


_NESTED: dict[tuple[type, str], type] = {
    (TrainConfig, "lora"): LoRASettings,
    (TrainConfig, "chain"): ChainSettings,
    (TrainConfig, "data"): DataSpec,
}
