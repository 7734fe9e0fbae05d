"""Shared pieces of the benchmarks: models, interleaved timing, peak memory, tables and JSON results.

Every figure a benchmark reports is a ratio against a baseline measured in the same process, the two timed
alternately (A, B, B, A, A, B, ...: the order flips every repetition so neither side always runs first), and
summarised by medians. The machine may be shared, so absolute times are kept in the JSON but never trusted
alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Paper shapes (COLA: OPT-1.3B; Llama-2-7B), built with random weights directly on the device.
SHAPES: dict[str, dict[str, Any]] = {
    "opt-1.3b": dict(
        arch="opt", hidden=2048, layers=24, heads=32, ffn=8192, vocab=50272, targets=["q_proj", "v_proj"]
    ),
    "llama-2-7b": dict(
        arch="llama", hidden=4096, layers=32, heads=32, ffn=11008, vocab=32000, targets=["q_proj", "v_proj"]
    ),
    "tiny": dict(
        arch="llama", hidden=64, layers=2, heads=4, ffn=128, vocab=320, targets=["q_proj", "v_proj"]
    ),
    "tiny-opt": dict(  # the OPT code path of the smoke runs
        arch="opt", hidden=64, layers=2, heads=4, ffn=128, vocab=320, targets=["q_proj", "v_proj"]
    ),
}
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls transformers' deprecated names
START_LOAD = os.getloadavg()[0]  # 1-minute load average when the benchmark started (the CPU may be shared)


# ------------------------------------------------------------------------------------------------- arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model",
        default=None,
        help="smollm2-135m (CPU default), a model folder, 'tiny' (random, for smoke tests), "
        "or a random-init paper shape: opt-1.3b (CUDA default), llama-2-7b",
    )
    parser.add_argument("--layers", type=int, default=None, help="override the layer count of a paper shape")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few reps: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default bench/results/)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core). On a shared, oversubscribed CPU use 1: "
        "OpenMP threads waiting at barriers for a descheduled sibling make 2-thread steps 5-15x slower",
    )
    return parser


def setup(args: argparse.Namespace) -> None:
    """Apply the process-wide settings of the parsed arguments (CPU threads)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def default_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.quick:
        return "tiny"
    return "opt-1.3b" if torch.device(args.device).type == "cuda" else "smollm2-135m"


def add_step_arguments(parser: argparse.ArgumentParser, *, warmup: int, warmup_help: str) -> None:
    """The arguments of a benchmark that times LoRA training steps on a fixed random batch and probes their peak
    memory in fresh subprocesses (``--probe``, hidden): batch shape, LoRA rank, learning rate, warm-up, memory."""
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    parser.add_argument("--memory", choices=("auto", "none"), default="auto")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=2, help=argparse.SUPPRESS)


def probe_argv(args: argparse.Namespace) -> list[str]:
    """The arguments a memory probe (a fresh ``--probe`` subprocess of the same script) shares with its parent:
    device, batch shape, rank, seed, warm-up, probe steps, model, layers and threads (``add_step_arguments``)."""
    argv = ["--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    argv += ["--rank", str(args.rank), "--seed", str(args.seed), "--warmup", str(args.warmup)]
    argv += ["--probe-steps", str(args.probe_steps), "--model", default_model(args)]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


# ---------------------------------------------------------------------------------------------------- models


def shape_config(name: str, layers: int | None = None):
    """A transformers config of paper shape ``name`` (optionally with fewer layers)."""
    from transformers import LlamaConfig, OPTConfig

    s = SHAPES[name]
    n_layers = layers or s["layers"]
    if s["arch"] == "opt":
        return OPTConfig(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            num_hidden_layers=n_layers,
            ffn_dim=s["ffn"],
            num_attention_heads=s["heads"],
            max_position_embeddings=2048,
            word_embed_proj_dim=s["hidden"],
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=1,
        )
    return LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=n_layers,
        intermediate_size=s["ffn"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=4096,
        pad_token_id=0,
        tie_word_embeddings=name == "tiny",
    )


def load_model(
    name: str, device: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0
):
    """``(model, tokenizer or None)``: a registry model / folder (real weights), or a random-init shape built
    directly on ``device`` (no CPU round trip: a 7B model builds in seconds on a GPU). SDPA attention."""
    from transformers import AutoModelForCausalLM

    if name in SHAPES:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                shape_config(name, layers), dtype=dtype, attn_implementation="sdpa"
            )
        tokenizer = None
        if name == "tiny":
            from chainlora.testing import tiny_tokenizer

            tokenizer = tiny_tokenizer()
    else:
        from chainlora import models

        model, tokenizer = models.load(name, dtype=dtype)
        model.to(device)
    model.eval()
    return model, tokenizer


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that shares the storage of all its parameters and buffers (no memory): new
    ``Parameter`` objects (own ``requires_grad`` and ``.grad``, ties kept), the same data. Only for variants
    that never write into their weights (a PEFT loop's frozen base): an in-place write shows in both."""
    import copy

    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()
    }
    memo |= {id(b): b for b in model.buffers()}
    return copy.deepcopy(model, memo)


def lora_targets(name: str) -> list[str]:
    return SHAPES[name]["targets"] if name in SHAPES else ["q_proj", "v_proj"]


def vocab_size(args: argparse.Namespace) -> int:
    """The vocabulary of ``--model``: a paper shape's, or read from a registry model's or a folder's config."""
    name = default_model(args)
    if name in SHAPES:
        return SHAPES[name]["vocab"]
    from transformers import AutoConfig

    from chainlora import models

    return AutoConfig.from_pretrained(
        name if Path(name).is_dir() else models.ensure_converted(name)
    ).vocab_size


def random_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    """``--batch-size`` × ``--seq-len`` random token ids (seeded by ``--seed``, above the special ids 0-2), all
    attended and all labels: a language-modelling batch of fixed shape."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def training_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: str,
    precision: str,
    scheduler: Any = None,
) -> Callable[[], None]:
    """One optimizer step as the Trainer takes it: forward under autocast, backward, gradient clipping at 1.0, the
    optimizer (and scheduler) step, gradients set to None."""
    from chainlora import perf

    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> None:
        with perf.autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------------- timing


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, device: str = "cpu", warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each function, ``reps`` times, alternating between them (order flipped every rep)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repetition ratios (each pair ran back to back, so slow drift cancels)."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


# ------------------------------------------------------------------------------------------- matmul peak

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MatmulPeak:
    """The achievable dense matmul rate of this device, measured: ``size``×``size`` @ ``size``×``size``
    ``torch.matmul`` in ``precision``, repeated so one call lasts about ``target_seconds``.

    Time the instance like any other benchmark function (with ``interleaved``, next to the variants: then it
    is measured at the same thread count and under the same load as they are) and ``tflops(seconds)`` turns
    a call's wall time into TFLOP/s. It is what torch reaches on a large square matmul, not a datasheet peak.
    """

    def __init__(
        self, precision: str, device: str, size: int = 2048, target_seconds: float = 0.25, seed: int = 0
    ):
        generator = torch.Generator().manual_seed(seed)
        dtype = MATMUL_DTYPES[precision]
        self.precision, self.device, self.size, self.repeats = precision, device, size, 1
        self.a = torch.randn(size, size, generator=generator).to(device, dtype)
        self.b = torch.randn(size, size, generator=generator).to(device, dtype)
        self.out = torch.empty(size, size, dtype=dtype, device=device)
        self()  # warm-up: kernel selection, page faults
        synchronize(device)
        start = time.perf_counter()
        self()
        synchronize(device)
        self.repeats = max(1, round(target_seconds / max(time.perf_counter() - start, 1e-9)))

    def __call__(self) -> None:
        for _ in range(self.repeats):
            torch.matmul(self.a, self.b, out=self.out)

    @property
    def flops(self) -> int:
        """FLOPs of one call (a multiply-add = 2)."""
        return 2 * self.size**3 * self.repeats

    def tflops(self, seconds: float) -> float:
        return self.flops / seconds / 1e12


# ---------------------------------------------------------------------------------------------------- memory

# Linux keeps a process's RSS in per-CPU counters (percpu_counter, batch max(32, 2 * CPUs) pages) and /proc sums
# them approximately, so each read below (VmRSS, VmHWM) can be off by up to batch × online CPUs pages, and two
# reads compared with each other by twice that: peak >= resident holds to within this slack, not to the byte.
_ONLINE_CPUS = os.sysconf("SC_NPROCESSORS_ONLN")
RSS_COUNTER_SLACK_MIB = 2 * max(32, 2 * _ONLINE_CPUS) * _ONLINE_CPUS * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset (VmHWM), MiB."""
    return _status_kib("VmHWM") / 1024


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def release_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc ``malloc_trim``), so that a memory probe
    started next does not compete with memory this process no longer uses."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


PROBE_ENV = {
    # glibc: return freed blocks to the OS at once, so RSS follows live tensors (no reuse of cached heap)
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
}


def run_probe(argv: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process (the memory probe of one variant); parse its last JSON line."""
    env = {**os.environ, **PROBE_ENV}
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- reporting


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": START_LOAD,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = platform.processor() or platform.machine()
        with contextlib.suppress(AttributeError, RuntimeError):
            info["cpu_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with contextlib.suppress(OSError):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """numpy scalars and other stragglers: their Python value, else their text."""
    return value.item() if hasattr(value, "item") else str(value)


def write_results(name: str, args: argparse.Namespace, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (``<name>-quick.json`` for smoke runs) or ``--out``."""
    path = args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_info(args.device) | {"load_average_end": os.getloadavg()[0]},
        **payload,
    }
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    print(f"\nresults: {path}")
    return path
