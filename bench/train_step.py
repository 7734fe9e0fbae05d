"""Training-step throughput (tokens/s) and peak memory: chainlora COLA vs a plain PEFT LoRA loop.

Each *variant* is ``method:option+option...``:

    method   peft   plain PEFT LoRA loop (r=8, α=16, q_proj/v_proj), no knots
             cola   the same loop with ``tie_knot(model, optimizer)`` every ``--knot-every`` steps
             full   full fine-tuning (every weight trained)
    options  fp32 | bf16 | fp16     autocast precision (weights stay as loaded, LoRA params fp32)
             w16                    store the frozen base in the autocast dtype (COLA then keeps fp32 master
                                    copies of the targeted weights for exact knots: ``tie_knot(precise=None)``)
             fused | foreach        AdamW implementation (default: torch's choice for the device)
             compile                ``torch.compile(model)``; recompilations after warm-up are counted

One step is what the HF Trainer does: forward under autocast, backward, ``clip_grad_norm_(1.0)``, AdamW step,
LR-scheduler step, ``zero_grad(set_to_none=True)``, then the knot when one is due (its cost is inside the step).
All variants get the same random batch (``--batch-size`` × ``--seq-len``) and models with the same weights, and
are timed interleaved in one process. Peak memory: CUDA, in process (resident bytes of the variant + the
largest transient of its steps, from ``torch.cuda`` allocator stats); CPU, one fresh subprocess per variant
(peak RSS over steady-state steps, after warm-up, glibc told to return freed memory at once).

MFU = model FLOPs per second (``chainlora.recipes.flops``: 6·N·tokens for trained weights, 2N or 4N for a
frozen base, plus the LoRA links and attention) over the dense matmul rate *measured* in this process
(``benchlib.MatmulPeak``: a large square ``torch.matmul`` of random inputs in the variant's compute dtype, timed
interleaved with the steps, so at the same clocks, thread count and load), not a datasheet figure; on CUDA the
MFU against the GPU's datasheet dense bf16 peak (``benchlib.PEAK_TFLOPS_BF16``) is reported beside it.

    python bench/train_step.py                         # CPU: smollm2-135m, 4×128
    python bench/train_step.py --compile               # CPU, adds the torch.compile variants (slow to compile)
    python bench/train_step.py --device cuda           # CUDA: random-init OPT-1.3B shape, bf16
    python bench/train_step.py --device cuda --model llama-2-7b
    python bench/train_step.py --model opt-1.3b --batch-size 2 --threads 1    # CPU, the OPT-1.3B shape
    python bench/train_step.py --quick --compile-backend aot_eager --variants peft:bf16+compile   # seconds
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import perf, tie_knot
from chainlora.links import layer_chains

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIONS = {*PRECISIONS, "w16", "fused", "foreach", "compile"}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    precision: str = "fp32"
    w16: bool = False
    optimizer: str = "default"  # default | fused | foreach
    compile: bool = False

    @classmethod
    def parse(cls, spec: str) -> Variant:
        method, _, rest = spec.partition(":")
        if method not in ("peft", "cola", "full"):
            raise SystemExit(f"variant {spec!r}: method must be peft, cola or full")
        options = [o for o in rest.split("+") if o]
        unknown = set(options) - OPTIONS
        if unknown:
            raise SystemExit(
                f"variant {spec!r}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}"
            )
        precision = next((o for o in options if o in PRECISIONS), "fp32")
        optimizer = next((o for o in options if o in ("fused", "foreach")), "default")
        return cls(spec, method, precision, "w16" in options, optimizer, "compile" in options)

    @property
    def same_settings_baseline(self) -> str:
        """The plain PEFT variant with this variant's precision, weight storage and compilation (PEFT's loop
        keeps torch's default AdamW): what "COLA/LoRA at the same settings" compares against."""
        return f"peft:{self.precision}" + ("+w16" if self.w16 else "") + ("+compile" if self.compile else "")


def default_variants(args) -> list[str]:
    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        return ["peft:fp32", "cola:fp32", "cola:fp32+fused"]
    if not cuda:  # chainlora's CPU defaults (perf.speed_defaults) vs PEFT at fp32 and at the same settings
        fast = perf.speed_defaults("cpu")
        same = fast.precision + ("+w16" if fast.base_dtype != "fp32" else "")
        best = f"cola:{same}" + ("+fused" if fast.optim.endswith("fused") else "")
        variants = ["peft:fp32", "cola:fp32", f"peft:{same}", best]
        if args.compile:
            variants += [f"peft:{same}+compile", best + "+compile"]
        return list(dict.fromkeys(variants))
    if default_model_name(args) == "llama-2-7b":  # fp32 7B weights would not fit four times
        return ["peft:bf16+w16", "peft:bf16+w16+compile", "cola:bf16+w16", "cola:bf16+w16+fused+compile"]
    return [
        "peft:bf16",
        "peft:bf16+compile",
        "full:bf16+fused",
        "cola:bf16",
        "cola:bf16+fused+compile",
        "peft:bf16+w16+compile",
        "cola:bf16+w16+fused+compile",
    ]


def default_model_name(args) -> str:
    return benchlib.default_model(args)


# ------------------------------------------------------------------------------------------------- one variant


@dataclass
class Runner:
    """One variant's model, optimizer and step function."""

    variant: Variant
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    steps_done: int = 0
    knots: int = 0
    resident_bytes: int = 0
    transient_bytes: list[int] = field(default_factory=list)
    flops_per_step: int = 0
    warmup_seconds: float = 0.0


SHARED_BASES: dict[torch.dtype, torch.nn.Module] = {}  # --share-base: one unwrapped base per weight dtype


def build_runner(variant: Variant, args, batch: dict[str, torch.Tensor]) -> Runner:
    from peft import LoraConfig, get_peft_model

    name = default_model_name(args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant.precision, torch.float32)
    base_dtype = dtype if variant.w16 else torch.float32
    share = args.share_base and variant.method == "peft"  # PEFT never writes into its base; COLA's knots do
    if share and base_dtype in SHARED_BASES:
        model = benchlib.shared_copy(SHARED_BASES[base_dtype])
    else:
        model, _ = benchlib.load_model(
            name, args.device, dtype=base_dtype, layers=args.layers, seed=args.seed
        )
        if share:  # kept unwrapped: get_peft_model below wraps ``model``'s modules in place
            SHARED_BASES[base_dtype] = benchlib.shared_copy(model)
    if variant.method == "full":
        model.requires_grad_(True)
    else:
        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=benchlib.lora_targets(name),
        )
        model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    kwargs = (
        {"fused": True}
        if variant.optimizer == "fused"
        else {"foreach": True}
        if variant.optimizer == "foreach"
        else {}
    )
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    forward = torch.compile(model, backend=args.compile_backend) if variant.compile else model
    runner: Runner

    optimizer_step = benchlib.training_step(
        forward, batch, optimizer, args.device, variant.precision, scheduler
    )

    def step() -> None:
        optimizer_step()
        runner.steps_done += 1
        if variant.method == "cola" and runner.steps_done % args.knot_every == 0:
            tie_knot(model, optimizer)
            runner.knots += 1

    runner = Runner(variant, model, optimizer, step)
    try:
        from chainlora.recipes.flops import flop_model, step_flops

        rows, seq_len = batch["input_ids"].shape
        runner.flops_per_step = step_flops(flop_model(model), rows, seq_len)
    except ImportError:  # the recipes package is optional for this benchmark
        pass
    return runner


def master_copy_mib(model: torch.nn.Module) -> float:
    """fp32 master copies that knots keep for a half-precision base (``tie_knot(precise=None)``), MiB."""
    copies = [chain.master_weight for *_, chain in layer_chains(model)]
    return sum(c.numel() * c.element_size() for c in copies if c is not None) / 2**20


# ---------------------------------------------------------------------------------------------- memory probe


def probe(args) -> None:
    """Child process: one variant, warm-up, then peak RSS over ``--probe-steps`` steady-state steps."""
    variant = Variant.parse(args.probe)
    batch = benchlib.random_batch(args, benchlib.vocab_size(args))
    before = benchlib.rss_mib()
    runner = build_runner(variant, args, batch)
    for _ in range(args.warmup):
        runner.step()
    gc.collect()
    # first: the high-water mark restarts at the current RSS, so peak >= resident (within
    # benchlib.RSS_COUNTER_SLACK_MIB)
    benchlib.reset_peak_rss()
    resident = benchlib.rss_mib()
    for _ in range(args.probe_steps):
        runner.step()
    print(
        json.dumps(
            {
                "variant": variant.name,
                "peak_rss_mib": benchlib.peak_rss_mib(),
                "resident_mib": resident,
                "before_model_mib": before,
                "knots": runner.knots,
            }
        )
    )


def cpu_memory(args, variants: list[Variant]) -> dict[str, dict]:
    out = {}
    for v in variants:
        if v.compile:
            out[v.name] = {
                "skipped": "compiled variants are not probed on CPU (compiling again takes minutes)"
            }
            continue
        argv = [str(Path(__file__).resolve()), *forwarded_args(args), "--probe", v.name]
        try:
            out[v.name] = benchlib.run_probe(argv)
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # e.g. killed for memory: keep the timings
            print(f"memory probe of {v.name} failed: {str(error)[-300:]}", flush=True)
            out[v.name] = {"failed": str(error)[-1000:]}
    return out


def forwarded_args(args) -> list[str]:
    return [*benchlib.probe_argv(args), "--knot-every", str(args.knot_every)]


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--variants", default=None, help="comma-separated variants (see the module docstring)"
    )
    parser.add_argument("--compile", action="store_true", help="CPU: add the torch.compile variants")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: Dynamo's tracing and guards without inductor's minutes of code "
        "generation on a CPU; a smoke run of the compiled paths)",
    )
    benchlib.add_step_arguments(parser, warmup=2, warmup_help="untimed steps per variant (compilation)")
    parser.add_argument("--knot-every", type=int, default=2, help="COLA: a knot every this many steps")
    parser.add_argument(
        "--share-base",
        action="store_true",
        help="peft variants with the same weight dtype share one frozen base in memory (a large shape on a "
        "small machine; same weights either way). CPU memory probes run one variant per process regardless",
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="MFU: side of the square matmul timed as the peak (default 8192 on CUDA, 2048 on CPU, 256 with --quick)",
    )
    args = parser.parse_args(argv)
    benchlib.setup(args)
    cuda = torch.device(args.device).type == "cuda"
    name = default_model_name(args)
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else (8 if name == "llama-2-7b" else 16) if cuda else 4
    if args.seq_len is None:
        args.seq_len = 32 if args.quick else 512 if cuda else 128
    if args.reps is None:
        args.reps = 2 if args.quick else 8 if cuda else 5
    if args.probe:
        probe(args)
        return {}

    variants = [
        Variant.parse(s) for s in (args.variants.split(",") if args.variants else default_variants(args))
    ]
    batch = benchlib.random_batch(args, benchlib.vocab_size(args))
    runners: dict[str, Runner] = {}
    for v in variants:
        if cuda:
            gc.collect()
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
        runner = build_runner(v, args, batch)
        started = time.perf_counter()
        for _ in range(args.warmup):  # compile, allocate optimizer state
            runner.step()
        benchlib.synchronize(args.device)
        runner.warmup_seconds = time.perf_counter() - started
        if cuda:
            torch.cuda.synchronize()
            runner.resident_bytes = torch.cuda.memory_allocated() - start
        runners[v.name] = runner
        print(f"built {v.name} (warm-up {runner.warmup_seconds:.1f} s)", flush=True)
    del runner  # only ``runners`` holds the models, so that clearing it frees them before the memory probes
    graphs_after_warmup = perf.compiled_graph_count() if any(v.compile for v in variants) else None
    # MFU: the achievable matmul rate of each compute dtype, measured next to the steps (same clocks, threads, load)
    size = args.matmul_size or (256 if args.quick else 8192 if cuda else 2048)
    precisions = (
        [v.precision for v in variants] if cuda else ["fp32", "bf16", *(v.precision for v in variants)]
    )
    seconds = 0.02 if args.quick else 0.25  # one timed call of the matmul
    peaks = {
        p: benchlib.MatmulPeak(p, args.device, size, seconds, args.seed) for p in dict.fromkeys(precisions)
    }

    def timed(runner: Runner):
        def run() -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            runner.step()
            if cuda:
                runner.transient_bytes.append(torch.cuda.max_memory_allocated() - before)

        return run

    times = benchlib.interleaved(
        {k: timed(r) for k, r in runners.items()} | {f"matmul:{p}": m for p, m in peaks.items()},
        args.reps,
        args.device,
        warmup=0,
    )
    recompiles = (
        perf.compiled_graph_count() - graphs_after_warmup if graphs_after_warmup is not None else None
    )

    knots = {k: r.knots for k, r in runners.items()}
    step_flops = {k: r.flops_per_step for k, r in runners.items()}
    masters = {k: master_copy_mib(r.model) for k, r in runners.items()}
    warmups = {k: r.warmup_seconds for k, r in runners.items()}
    memory: dict[str, dict] = {}
    if cuda:
        for k, r in runners.items():
            memory[k] = {"peak_mib": (r.resident_bytes + max(r.transient_bytes)) / 2**20}
    runners.clear()  # free this process before the CPU memory probes run
    SHARED_BASES.clear()
    benchlib.release_memory()
    if not cuda and args.memory == "auto":
        memory = {k: {"peak_mib": m.get("peak_rss_mib"), **m} for k, m in cpu_memory(args, variants).items()}

    tokens = args.batch_size * args.seq_len
    first = variants[0].name
    gpu = torch.cuda.get_device_name() if cuda else ""
    # the datasheet's dense bf16 tensor-core peak (as the H100 figures), reported beside the measured one
    datasheet = next((p for g, p in benchlib.PEAK_TFLOPS_BF16.items() if g in gpu), None) if cuda else None
    peak_of = {p: m.tflops(benchlib.median(times[f"matmul:{p}"])) for p, m in peaks.items()}
    peak_source = (
        f"measured on this {'GPU' if cuda else 'CPU'} in this process, not a datasheet figure: median of "
        f"{args.reps} {size}x{size} torch.matmul timings per dtype"
        + ("" if cuda else f", {torch.get_num_threads()} thread(s)")
        + ", interleaved with the training steps"
    )
    base_mem = memory.get(first, {}).get("peak_mib")
    rows, results = [], {}
    for v in variants:
        t = benchlib.median(times[v.name])
        same = v.same_settings_baseline
        mem = memory.get(v.name, {}).get("peak_mib")
        achieved = step_flops[v.name] / t / 1e12 if step_flops[v.name] else None
        peak = peak_of.get(v.precision)
        result = {
            "seconds_per_step": times[v.name],
            "median_seconds": t,
            "tokens_per_s": tokens / t,
            "x_first": benchlib.median(times[first]) / t,
            "x_first_paired": benchlib.paired_ratio(times[first], times[v.name]),
            # total time of all timed steps: includes the knots, which a median over steps can leave out
            "x_first_all_steps": sum(times[first]) / sum(times[v.name]),
            "x_peft_same_settings": benchlib.median(times[same]) / t if same in times else None,
            "peak_mib": mem,
            "memory_x_first": mem / base_mem if mem and base_mem else None,
            "memory": memory.get(v.name),
            "flops_per_step": step_flops[v.name],
            "fp32_master_copies_mib": masters[v.name],
            "warmup_seconds": warmups[v.name],
            # compilation ≈ the warm-up beyond its steps at the steady-state step time (not in the timed steps)
            "compile_seconds": warmups[v.name] - args.warmup * t if v.compile else None,
            "achieved_tflops": achieved,
            "mfu_peak_tflops": peak,
            "mfu": achieved / peak if achieved and peak else None,
            "mfu_datasheet": achieved / datasheet if achieved and datasheet else None,
        }
        results[v.name] = result
        rows.append(
            [
                v.name,
                f"{tokens / t:,.0f}",
                f"{result['x_first']:.2f} ({result['x_first_paired']:.2f}; {result['x_first_all_steps']:.2f})",
                f"{result['x_peft_same_settings']:.2f}" if result["x_peft_same_settings"] else "–",
                f"{mem:,.0f}" if mem else "–",
                f"{result['memory_x_first']:.2f}" if result["memory_x_first"] else "–",
                (f"{achieved:.3g}" if achieved else "–")
                + (f" ({result['mfu']:.1%})" if result["mfu"] else ""),
            ]
        )
    headers = [
        "variant",
        "tokens/s",
        f"× {first} (paired; all steps)",
        "× PEFT same settings",
        "peak MiB",
        f"memory × {first}",
    ]
    headers.append("TFLOP/s (MFU vs measured matmul peak)")
    print(
        f"\n### train_step: {name}, batch {args.batch_size}×{args.seq_len}, {args.device}, {args.reps} reps"
    )
    print(benchlib.markdown_table(headers, rows))
    rates = ", ".join(f"{p} {peak_of[p]:.3g} TFLOP/s" for p in peaks)
    print(f"\nMFU peak = dense matmul rate {peak_source}: {rates}. Model FLOPs: chainlora.recipes.flops.")
    if datasheet:
        print(f"Datasheet dense bf16 peak of the {gpu}: {datasheet:g} TFLOP/s (mfu_datasheet in the JSON)")
    for v in variants:
        if v.compile:
            print(
                f"compile time of {v.name}: {results[v.name]['compile_seconds']:.1f} s (not in the timed steps)"
            )
    if recompiles is not None:
        print(
            f"\ntorch.compile: {recompiles} recompilation(s) after warm-up, across {sum(knots.values())} knots"
        )
    benchlib.write_results(
        "train_step",
        args,
        {
            "model": name,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "knot_every": args.knot_every,
            "rank": args.rank,
            "reps": args.reps,
            "variants": results,
            "knots_total": knots,
            "recompiles_after_warmup": recompiles,
            "mfu_peak_source": peak_source,
            "datasheet_peak_tflops": datasheet,
            "compile_backend": args.compile_backend,
            "matmul_peak": {
                p: {
                    "tflops": peak_of[p],
                    "best_tflops": m.tflops(min(times[f"matmul:{p}"])),
                    "size": m.size,
                    "matmuls_per_call": m.repeats,
                    "seconds_per_call": times[f"matmul:{p}"],
                }
                for p, m in peaks.items()
            },
            "speed_defaults": perf.speed_defaults(args.device).__dict__,
        },
    )
    return results


if __name__ == "__main__":
    main()
