"""CPU thread count vs training-step time, interleaved in one process (one model, ``torch.set_num_threads``).

On a dedicated machine one thread per core is fastest. On a shared, oversubscribed one (load average above the
core count) OpenMP threads wait at every barrier for a sibling the OS has descheduled, and more threads can be
many times slower; this measures which case the machine is in right now.

    python bench/threads.py                        # smollm2-135m, bf16 autocast, 4×128, threads 1 and 2
    python bench/threads.py --counts 1,2,4 --precision fp32
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import train_step


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--counts", default=None, help="comma-separated thread counts (default: 1 and all cores)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (32 if args.quick else 128)
    args.reps = args.reps or (2 if args.quick else 4)
    counts = [int(c) for c in args.counts.split(",")] if args.counts else sorted({1, os.cpu_count() or 1})
    # what train_step.build_runner reads
    args.rank, args.lr, args.knot_every = 8, 1e-4, 10**9
    runner = train_step.build_runner(
        train_step.Variant.parse(f"peft:{args.precision}"),
        args,
        benchlib.random_batch(args, benchlib.vocab_size(args)),
    )

    def with_threads(n: int):
        def run() -> None:
            torch.set_num_threads(n)
            runner.step()

        return run

    times = benchlib.interleaved({n: with_threads(n) for n in counts}, args.reps, args.device, warmup=1)
    first = counts[0]
    rows = [
        [
            n,
            f"{benchlib.median(times[n]):.2f}",
            f"{benchlib.median(times[first]) / benchlib.median(times[n]):.2f}",
        ]
        for n in counts
    ]
    name = benchlib.default_model(args)
    print(
        f"\n### threads: {name}, {args.precision}, batch {args.batch_size}×{args.seq_len}, load {os.getloadavg()[0]:.1f}"
    )
    print(benchlib.markdown_table(["threads", "s/step (median)", f"speed × {first} thread(s)"], rows))
    results = {str(n): {"seconds_per_step": times[n], "median": benchlib.median(times[n])} for n in counts}
    benchlib.write_results("threads", args, {"model": name, "precision": args.precision, "counts": results})
    return results


if __name__ == "__main__":
    main()
