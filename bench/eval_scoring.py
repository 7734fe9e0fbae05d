"""Evaluation throughput: batched candidate scoring with the shared prompt run once vs one forward per candidate.

    fast    ``chainlora.tasks.score_candidates``: the candidates' shared token prefix runs once per example, batched
            over length-sorted examples (at most ``--batch-size``, cut where the pad tokens saved outweigh one
            more forward: ``--forward-cost``), each candidate's remaining tokens on a copy of its cache;
            single-token options (Yes/No, great/terrible) need no second pass
    naive   ``chainlora.tasks.score_candidates_naive``: the MeZO harness, one unpadded forward per candidate

Both score the same test examples (seed-0 draw of the task's test pool), alternately in one process; reported:
examples/s of each (median over ``--reps``), the speed-up (ratio of medians, and median of the per-rep ratios),
the work each path does (tokens per example, padding included, and the ratio of weight multiply-adds: the
speed-up a CPU, whose cost is proportional to them, can reach), the largest absolute difference between their
scores, and whether they pick the same candidate. fp32 round-off alone moves a 30-layer model's scores by
~1e-5 (the naive path with 1 vs 2 threads differs that much), so on the first ``--fp64-examples``
examples both paths also run on a float64 copy of the model (``chainlora.testing.float64_copy``, norms included):
the method check is max |fast_fp64 - naive_fp64|, which must be ≤ 1e-5 (it is ~1e-12: both compute the same
thing) or the script fails; the error of each fp32 path vs the fp64 naive scores is reported too, and the script
also fails if the fast path is further from fp64 than the naive one by more than 1e-5.

    python bench/eval_scoring.py                           # CPU: smollm2-135m, sst2 + boolq + copa + cb
    python bench/eval_scoring.py --device cuda --num-eval 1000
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import tasks
from chainlora.testing import float64_copy

TOLERANCE = 1e-5


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b], "both paths must score the same candidates"
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def count_work(model: torch.nn.Module, fn: Callable[[], None]) -> dict[str, int]:
    """What one (untimed) call of ``fn`` runs through ``model``: forwards, input tokens (padding included) and
    rows of the output head."""
    counts = {"forwards": 0, "tokens": 0, "head_rows": 0}

    def on_forward(module, args, kwargs) -> None:
        counts["forwards"] += 1
        counts["tokens"] += kwargs["input_ids"].numel()

    def on_head(module, args) -> None:
        counts["head_rows"] += args[0].shape[:-1].numel()

    handles = [
        model.register_forward_pre_hook(on_forward, with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(on_head),
    ]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def weight_macs(model: torch.nn.Module, work: dict[str, int]) -> float:
    """Multiply-adds of the weight matrices for ``work``: every token through the body, head rows through the head
    (attention scores and embedding lookups left out)."""
    head = model.get_output_embeddings().weight
    embeddings = {id(head), *(id(p) for p in model.get_input_embeddings().parameters())}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return work["tokens"] * body + work["head_rows"] * head.numel()


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,boolq,copa,cb")
    parser.add_argument(
        "--data-dir", type=Path, default=benchlib.SHARED_DATA if benchlib.SHARED_DATA.is_dir() else None
    )
    parser.add_argument("--num-eval", type=int, default=None, help="test examples per task")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="fast path: examples per batch (eval_batch_size)"
    )
    parser.add_argument(
        "--forward-cost",
        type=float,
        default=None,
        help="fast path: fixed cost of a forward in tokens, for cutting prefix batches (default: "
        "tasks.scoring.default_forward_cost of the device; inf: full batches)",
    )
    parser.add_argument(
        "--fp64-examples", type=int, default=None, help="examples also scored in fp64 by both paths (0: none)"
    )
    args = parser.parse_args(argv)
    benchlib.setup(args)
    name = benchlib.default_model(args)
    if name in benchlib.SHAPES and name != "tiny":
        raise SystemExit(
            "eval_scoring needs a real tokenizer: pass a model folder or registry name, or --quick"
        )
    cuda = torch.device(args.device).type == "cuda"
    args.reps = args.reps or (1 if args.quick else 3 if cuda else 2)
    args.num_eval = args.num_eval or (8 if args.quick else 500 if cuda else 32)
    if args.fp64_examples is None:
        args.fp64_examples = 2 if args.quick else 8

    model, tokenizer = benchlib.load_model(name, args.device, layers=args.layers, seed=args.seed)
    model.eval()
    if args.forward_cost is None:
        args.forward_cost = tasks.scoring.default_forward_cost(args.device)
    cached: list[torch.nn.Module] = []

    def model64() -> torch.nn.Module:
        """An fp64 copy of the model (built once), the exact reference for both paths."""
        if not cached:
            cached.append(float64_copy(model))
        return cached[0]

    def fast_scores(model: torch.nn.Module, examples: list) -> list[list[float]]:
        return tasks.score_candidates(
            model, tokenizer, examples, batch_size=args.batch_size, forward_cost=args.forward_cost
        )

    results, table = {}, []
    for task_name in args.tasks.split(","):
        task = tasks.get_task(task_name)
        data = tasks.load_task_data(task, data_dir=args.data_dir)
        examples = data.sample(args.seed, num_train=0, num_dev=0, num_eval=args.num_eval).test
        out: dict[str, list[list[float]]] = {}

        def fast(examples=examples, out=out) -> None:
            out["fast"] = fast_scores(model, examples)

        def naive(examples=examples, out=out) -> None:
            out["naive"] = tasks.score_candidates_naive(model, tokenizer, examples)

        times = benchlib.interleaved({"fast": fast, "naive": naive}, args.reps, args.device, warmup=1)
        work = {"fast": count_work(model, fast), "naive": count_work(model, naive)}
        ideal = weight_macs(model, work["naive"]) / weight_macs(model, work["fast"])
        diff = max_abs_diff(out["fast"], out["naive"])
        same_choice = sum(
            int(max(range(len(f)), key=f.__getitem__) == max(range(len(n)), key=n.__getitem__))
            for f, n in zip(out["fast"], out["naive"], strict=True)
        )
        exact = {}
        if args.fp64_examples:
            k = min(args.fp64_examples, len(examples))
            reference = tasks.score_candidates_naive(model64(), tokenizer, examples[:k])
            fast64 = fast_scores(model64(), examples[:k])
            exact = {
                "fp64_examples": k,
                "fast64_vs_naive64": max_abs_diff(fast64, reference),
                "naive_vs_fp64": max_abs_diff(out["naive"][:k], reference),
                "fast_vs_fp64": max_abs_diff(out["fast"][:k], reference),
            }
        fast_s, naive_s = benchlib.median(times["fast"]), benchlib.median(times["naive"])
        candidates = sum(len(e.candidates) for e in examples)
        results[task_name] = {
            "examples": len(examples),
            "candidates": candidates,
            "fast_seconds": times["fast"],
            "naive_seconds": times["naive"],
            "fast_examples_per_s": len(examples) / fast_s,
            "naive_examples_per_s": len(examples) / naive_s,
            "speedup": naive_s / fast_s,
            "speedup_paired": benchlib.paired_ratio(times["naive"], times["fast"]),
            "work": work,
            "weight_macs_ratio": ideal,
            "max_abs_diff": diff,
            "identical_within_tolerance": diff <= TOLERANCE,
            "same_choice": same_choice,
            **exact,
        }
        table.append(
            [
                task_name,
                len(examples),
                f"{candidates / len(examples):.1f}",
                f"{len(examples) / naive_s:.2f}",
                f"{len(examples) / fast_s:.2f}",
                f"{naive_s / fast_s:.2f}",
                f"{benchlib.paired_ratio(times['naive'], times['fast']):.2f}",
                f"{work['naive']['tokens'] / len(examples):.0f} / {work['fast']['tokens'] / len(examples):.0f}",
                f"{ideal:.2f}",
                f"{diff:.1e}",
                f"{same_choice}/{len(examples)}",
                f"{exact['fast64_vs_naive64']:.1e} ({exact['fp64_examples']})" if exact else "–",
                f"{exact['naive_vs_fp64']:.1e} / {exact['fast_vs_fp64']:.1e}" if exact else "–",
            ]
        )
        print(f"{task_name}: done", flush=True)
    print(
        f"\n### eval_scoring: {name}, fp32, {args.device}, {torch.get_num_threads()} threads, fast batch "
        f"{args.batch_size}, forward cost {args.forward_cost:g} tokens, median of {args.reps} reps, "
        f"load average {benchlib.START_LOAD:.1f} → {os.getloadavg()[0]:.1f}"
    )
    headers = ["task", "examples", "candidates/ex", "naive ex/s", "fast ex/s", "speed-up", "paired"]
    headers += ["tokens/ex naive / fast", "MAC ratio", "max |Δscore|"]
    headers += ["same choice", "fp64: max |fast − naive| (examples)", "error vs fp64: naive / fast"]
    print(benchlib.markdown_table(headers, table))
    benchlib.write_results(
        "eval_scoring",
        args,
        {
            "model": name,
            "batch_size": args.batch_size,
            "forward_cost": args.forward_cost,
            "threads": torch.get_num_threads(),
            "load_average": [benchlib.START_LOAD, os.getloadavg()[0]],
            "num_eval": args.num_eval,
            "reps": args.reps,
            "tasks": results,
        },
    )
    for task_name, r in results.items():
        if r.get("fast64_vs_naive64", 0.0) > TOLERANCE:
            raise SystemExit(
                f"{task_name}: in fp64 the fast and naive scores differ by {r['fast64_vs_naive64']:.2e} > "
                f"{TOLERANCE}: the fast path does not compute the harness's score"
            )
        if (
            r["max_abs_diff"] > TOLERANCE
            and r.get("fast_vs_fp64", math.inf) > r.get("naive_vs_fp64", 0) + TOLERANCE
        ):
            raise SystemExit(
                f"{task_name}: fast and naive scores differ by {r['max_abs_diff']:.2e} > {TOLERANCE}, and the fast "
                "path is further from fp64 than the naive one"
            )
    return results


if __name__ == "__main__":
    main()
