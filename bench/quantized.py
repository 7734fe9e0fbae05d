"""QLoRA (plain PEFT LoRA) vs COLA on the same bitsandbytes-quantized base: training-step throughput and memory.

Both variants load the same model quantized the same way (``--scheme``: nf4, fp4 or int8; 4-bit layers compute
in ``--precision``), get LoRA r=8 (α=16) on q_proj, v_proj and train with AdamW under autocast:

    qlora   PEFT's QLoRA loop, no knots
    cola    the same loop after ``--knots`` knots tied (``chainlora.tie_knot``: each folds the finished link into
            a frozen residual of rank +r beside the quantized weight), training link ``--knots`` + 1

They are timed interleaved in one process (A, B, B, A, ...: the machine may be shared, only the ratio counts), in
wall seconds and in CPU seconds of the process (on a shared CPU the latter leaves out the time spent waiting
for a core).
Peak memory: one fresh subprocess per variant (peak RSS over steady-state steps; CPU) or the CUDA allocator's
peak. The residual's size is counted exactly (its buffers), and is what COLA's memory may exceed QLoRA's by.

    python bench/quantized.py --threads 1                    # CPU: smollm2-135m in nf4, 4×128 tokens
    python bench/quantized.py --threads 1 --scheme int8
    python bench/quantized.py --quick                        # tiny random model: a smoke run
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import perf, quantized, tie_knot


def load_quantized(args) -> torch.nn.Module:
    """The model of ``--model`` loaded quantized (``--scheme``)."""
    from transformers import AutoModelForCausalLM

    name = benchlib.default_model(args)
    compute = perf.DTYPES[args.precision]
    config = quantized.bnb_config(args.scheme, compute)
    if name in benchlib.SHAPES:  # a random-init shape: saved once, then loaded quantized like a real model
        folder = Path(tempfile.gettempdir()) / f"chainlora-bench-{name}-{args.layers}-{args.seed}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(benchlib.shape_config(name, args.layers))
            model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, device_map={"": args.device}, dtype=compute
        )
    else:
        from chainlora import models

        model, _ = models.load(name, dtype=compute, quantization_config=config, device=args.device)
    quantized.disable_cpu_bf16_repack(model)
    return model


def build(variant: str, args, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A variant's model, optimizer and step function (the knots of ``cola`` are tied here, before timing)."""
    from peft import LoraConfig, get_peft_model

    model = load_quantized(args)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(model, config)
    quantized.attach_residuals(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    step = benchlib.training_step(model, batch, optimizer, args.device, args.precision)

    knot_seconds = []
    if variant == "cola":
        for link in range(1, args.knots + 1):
            step()  # a trained (non-zero) link to tie
            benchlib.synchronize(args.device)
            start = time.perf_counter()
            tie_knot(model, optimizer, generator=torch.Generator().manual_seed(link))
            benchlib.synchronize(args.device)
            knot_seconds.append(time.perf_counter() - start)
    return {
        "model": model,
        "step": step,
        "knot_seconds": knot_seconds,
        "residual_mib": quantized.residual_memory_bytes(model) / 2**20,
        "trainable_mib": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
    }


def probe(args) -> None:
    """One variant in this fresh process: peak RSS over ``--probe-steps`` steady-state steps (CPU)."""
    import json

    built = build(args.probe, args, benchlib.random_batch(args, benchlib.vocab_size(args)))
    for _ in range(args.warmup):
        built["step"]()
    benchlib.release_memory()
    benchlib.reset_peak_rss()  # first: the high-water mark restarts at the current RSS, so peak >= resident
    resident = benchlib.rss_mib()
    for _ in range(args.probe_steps):
        built["step"]()
    print(json.dumps({"resident_mib": resident, "peak_rss_mib": benchlib.peak_rss_mib()}))


def forwarded(args, variant: str) -> list[str]:
    argv = [__file__, "--probe", variant, *benchlib.probe_argv(args), "--scheme", args.scheme]
    return [*argv, "--precision", args.precision, "--knots", str(args.knots)]


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--scheme", default="nf4", choices=quantized.QUANT_SCHEMES)
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="default: fp32 on CPU")
    benchlib.add_step_arguments(parser, warmup=1, warmup_help="untimed steps per variant")
    parser.add_argument("--knots", type=int, default=3, help="COLA: knots tied before timing (links tied)")
    args = parser.parse_args(argv)
    benchlib.setup(args)
    cuda = torch.device(args.device).type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or (2 if args.quick else 16 if cuda else 4)
    args.seq_len = args.seq_len or (32 if args.quick else 512 if cuda else 128)
    args.reps = args.reps or (2 if args.quick else 8 if cuda else 5)
    if args.probe:
        probe(args)
        return {}

    name = benchlib.default_model(args)
    batch = benchlib.random_batch(args, benchlib.vocab_size(args))
    variants = {v: build(v, args, batch) for v in ("qlora", "cola")}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}

    def timed(variant: str) -> Any:
        """The step, also timed in CPU seconds of this process (on a shared CPU, wall time includes the
        time the process waited for a core; its CPU time does not)."""

        def step() -> None:
            start = time.process_time()
            variants[variant]["step"]()
            cpu_times[variant].append(time.process_time() - start)

        return step

    times = benchlib.interleaved({v: timed(v) for v in variants}, args.reps, args.device, args.warmup)
    cpu_times = {v: t[args.warmup :] for v, t in cpu_times.items()}  # the timed repetitions only
    memory: dict[str, dict] = {}
    if cuda:
        for v, b in variants.items():  # resident + the largest transient of a step, as train_step.py
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            b["step"]()
            torch.cuda.synchronize()
            memory[v] = {
                "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                "resident_mib": before / 2**20,
            }
    summary = {
        v: {k: b[k] for k in ("knot_seconds", "residual_mib", "trainable_mib")} for v, b in variants.items()
    }
    variants.clear()
    benchlib.release_memory()
    if not cuda and args.memory == "auto":
        for v in ("qlora", "cola"):
            probed = benchlib.run_probe(forwarded(args, v))
            memory[v] = {"peak_mib": probed["peak_rss_mib"], **probed}

    tokens = args.batch_size * args.seq_len
    results: dict[str, Any] = {}
    for v in ("qlora", "cola"):
        t = benchlib.median(times[v])
        results[v] = {
            "seconds_per_step": times[v],
            "median_seconds": t,
            "tokens_per_s": tokens / t,
            "cpu_seconds_per_step": cpu_times[v],
            "tokens_per_cpu_s": tokens / benchlib.median(cpu_times[v]),
            "peak_mib": memory.get(v, {}).get("peak_mib"),
            "memory": memory.get(v),
            **summary[v],
        }
    ratio = benchlib.paired_ratio(times["qlora"], times["cola"])
    cpu_ratio = benchlib.paired_ratio(cpu_times["qlora"], cpu_times["cola"])
    extra = (
        results["cola"]["peak_mib"] - results["qlora"]["peak_mib"]
        if results["cola"]["peak_mib"] and results["qlora"]["peak_mib"]
        else None
    )
    rows = [
        [
            v,
            f"{results[v]['tokens_per_s']:,.1f}",
            f"{ratio:.3f}" if v == "cola" else "1",
            f"{results[v]['tokens_per_cpu_s']:,.1f}",
            f"{cpu_ratio:.3f}" if v == "cola" else "1",
            f"{results[v]['peak_mib']:,.0f}" if results[v]["peak_mib"] else "–",
            f"{results[v]['residual_mib']:.2f}",
        ]
        for v in ("qlora", "cola")
    ]
    print(
        f"\n### quantized: {name} in {args.scheme} ({args.precision} compute), batch {args.batch_size}×"
        f"{args.seq_len}, {args.device}, {args.reps} reps, COLA with {args.knots} links tied"
    )
    print(
        benchlib.markdown_table(
            [
                "variant",
                "tokens/s",
                "× qlora (paired)",
                "tokens/CPU-s",
                "× qlora (CPU time, paired)",
                "peak MiB",
                "residual MiB",
            ],
            rows,
        )
    )
    if extra is not None:
        print(
            f"\nCOLA peak − QLoRA peak: {extra:+.1f} MiB (the residual: {results['cola']['residual_mib']:.2f} MiB)"
        )
    benchlib.write_results(
        f"quantized_{args.scheme}",
        args,
        {
            "model": name,
            "scheme": args.scheme,
            "bitsandbytes": quantized.bitsandbytes_version(),
            "precision": args.precision,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "knots": args.knots,
            "reps": args.reps,
            "variants": results,
            "cola_over_qlora_throughput": ratio,
            "cola_over_qlora_throughput_cpu_time": cpu_ratio,
            "cola_minus_qlora_peak_mib": extra,
        },
    )
    return results


if __name__ == "__main__":
    main()
