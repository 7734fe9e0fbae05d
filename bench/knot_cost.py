"""Cost of one COLA knot relative to one epoch of training (target: < 0.5 %).

The knot is the real Trainer path: ``ChainOfLoRACallback.on_step_end`` after an optimizer step (merge in fp32,
finiteness check, links kept on CPU, re-init A / zero B from the seeded generator, optimizer state cleared).
Training steps (forward, backward, clip, AdamW, as in ``train_step.py``) and knots alternate in one process;
the ratio is ``median(knot) / (steps_per_epoch × median(step))`` with a realistic epoch of the paper's setup:
1000 training examples / batch 8 = 125 optimizer steps. The first knot of a run is reported apart: with a
half-precision base it also creates the fp32 master copies (``tie_knot(precise=None)``).

    python bench/knot_cost.py                          # CPU: smollm2-135m, batch 8×128, fp32
    python bench/knot_cost.py --device cuda            # CUDA: random-init OPT-1.3B shape, bf16 autocast
    python bench/knot_cost.py --device cuda --model llama-2-7b --w16
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import ChainOfLoRACallback, ChainSchedule, perf


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--w16", action="store_true", help="store the frozen base in the autocast dtype")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epoch-examples", type=int, default=1000, help="training examples per epoch")
    args = parser.parse_args(argv)
    benchlib.setup(args)
    cuda = torch.device(args.device).type == "cuda"
    name = benchlib.default_model(args)
    args.seq_len = args.seq_len or (32 if args.quick else 512 if cuda else 128)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.reps = args.reps or (2 if args.quick else 10 if cuda else 5)
    if args.quick:
        args.batch_size = min(args.batch_size, 2)

    from peft import LoraConfig, get_peft_model
    from transformers import TrainerState

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    model, _ = benchlib.load_model(
        name, args.device, dtype if args.w16 else torch.float32, args.layers, args.seed
    )
    vocab = model.config.vocab_size
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=benchlib.lora_targets(name)
    )
    model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = perf.adamw(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    total = 10_000
    callback = ChainOfLoRACallback(ChainSchedule(tuple(range(1, total)), total), seed=args.seed)
    state = TrainerState()
    trainer_args = types.SimpleNamespace(seed=args.seed)

    optimizer_step = benchlib.training_step(model, batch, optimizer, args.device, args.precision)

    def step() -> None:
        optimizer_step()
        state.global_step += 1

    def knot() -> None:
        callback.on_step_end(trainer_args, state, None, model=model, optimizer=optimizer)

    step()  # warm-up: allocate optimizer state
    benchlib.synchronize(args.device)
    start = time.perf_counter()
    knot()  # the first knot of a run (creates fp32 master copies for a half-precision base)
    benchlib.synchronize(args.device)
    first_knot = time.perf_counter() - start
    times = benchlib.interleaved({"step": step, "knot": knot}, args.reps, args.device, warmup=0)
    assert len(callback.knots) == args.reps + 1, "every knot call must tie a knot"

    step_s, knot_s = benchlib.median(times["step"]), benchlib.median(times["knot"])
    steps_per_epoch = -(-args.epoch_examples // args.batch_size)
    epoch_s = steps_per_epoch * step_s
    rows = [
        ["training step", f"{step_s * 1e3:,.1f}", "–"],
        [
            f"epoch ({args.epoch_examples} examples / batch {args.batch_size} = {steps_per_epoch} steps)",
            f"{epoch_s * 1e3:,.0f}",
            "100 %",
        ],
        ["knot (steady state)", f"{knot_s * 1e3:,.2f}", f"{knot_s / epoch_s:.4%}"],
        ["first knot of the run", f"{first_knot * 1e3:,.2f}", f"{first_knot / epoch_s:.4%}"],
    ]
    layers = callback.knots[-1].layers
    print(
        f"\n### knot_cost: {name}, {layers} LoRA layers, batch {args.batch_size}×{args.seq_len}, {args.precision}"
        f"{' (base ' + args.precision + ')' if args.w16 else ''}, {args.device}, {args.reps} reps"
    )
    print(benchlib.markdown_table(["", "ms", "of an epoch"], rows))
    print(f"\nknot / step = {knot_s / step_s:.3f}; knot / epoch = {knot_s / epoch_s:.4%} (target < 0.5 %)")
    results = {
        "model": name,
        "lora_layers": layers,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "precision": args.precision,
        "w16": args.w16,
        "reps": args.reps,
        "step_seconds": times["step"],
        "knot_seconds": times["knot"],
        "first_knot_seconds": first_knot,
        "steps_per_epoch": steps_per_epoch,
        "knot_over_step": knot_s / step_s,
        "knot_over_epoch": knot_s / epoch_s,
        "first_knot_over_epoch": first_knot / epoch_s,
        "target_met": knot_s / epoch_s < 0.005,
    }
    benchlib.write_results("knot_cost", args, results)
    return results


if __name__ == "__main__":
    main()
