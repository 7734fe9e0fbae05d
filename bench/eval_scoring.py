"""Evaluation throughput: batched candidate scoring with the shared prompt run once vs one forward per candidate.

    fast    ``chainlora.tasks.score_candidates``: the candidates' shared token prefix runs once per example, batched
            over length-sorted examples (``--batch-size``), each candidate's remaining tokens on a copy of its
            cache; single-token options (Yes/No, great/terrible) need no second pass
    naive   ``chainlora.tasks.score_candidates_naive``: the MeZO harness, one unpadded forward per candidate

Both score the same test examples (seed-0 draw of the task's test pool), alternately in one process; reported:
examples/s of each (median over ``--reps``), the speed-up, the largest absolute difference between their
scores, and whether they pick the same candidate. fp32 round-off alone moves a 30-layer model's scores by
~1e-5 (the naive path with 1 vs 2 threads differs that much), so both are also compared with an fp64 run of the
naive path on the first ``--fp64-examples`` examples: the fast path must be as exact as the reference
(error vs fp64 ≤ the naive path's + 1e-5), or the script fails.

    python bench/eval_scoring.py                           # CPU: smollm2-135m, sst2 + boolq + copa + cb
    python bench/eval_scoring.py --device cuda --num-eval 1000
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import tasks

TOLERANCE = 1e-5


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b], "both paths must score the same candidates"
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


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
        "--fp64-examples", type=int, default=None, help="examples also scored in fp64 (0: none)"
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
    cached: list[torch.nn.Module] = []

    def model64() -> torch.nn.Module:
        """An fp64 copy of the model (built once), the exact reference for both paths."""
        if not cached:
            cached.append(copy.deepcopy(model).double())
        return cached[0]

    results, table = {}, []
    for task_name in args.tasks.split(","):
        task = tasks.get_task(task_name)
        data = tasks.load_task_data(task, data_dir=args.data_dir)
        examples = data.sample(args.seed, num_train=0, num_dev=0, num_eval=args.num_eval).test
        out: dict[str, list[list[float]]] = {}

        def fast(examples=examples, out=out) -> None:
            out["fast"] = tasks.score_candidates(model, tokenizer, examples, batch_size=args.batch_size)

        def naive(examples=examples, out=out) -> None:
            out["naive"] = tasks.score_candidates_naive(model, tokenizer, examples)

        times = benchlib.interleaved({"fast": fast, "naive": naive}, args.reps, args.device, warmup=1)
        diff = max_abs_diff(out["fast"], out["naive"])
        same_choice = sum(
            int(max(range(len(f)), key=f.__getitem__) == max(range(len(n)), key=n.__getitem__))
            for f, n in zip(out["fast"], out["naive"], strict=True)
        )
        exact = {}
        if args.fp64_examples:
            k = min(args.fp64_examples, len(examples))
            reference = tasks.score_candidates_naive(model64(), tokenizer, examples[:k])
            exact = {
                "fp64_examples": k,
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
                f"{diff:.1e}",
                f"{same_choice}/{len(examples)}",
                f"{exact['naive_vs_fp64']:.1e} / {exact['fast_vs_fp64']:.1e}" if exact else "–",
            ]
        )
        print(f"{task_name}: done", flush=True)
    print(
        f"\n### eval_scoring: {name}, fp32, {args.device}, fast batch {args.batch_size}, median of {args.reps} reps"
    )
    headers = ["task", "examples", "candidates/ex", "naive ex/s", "fast ex/s", "speed-up", "max |Δscore|"]
    headers += ["same choice", "error vs fp64: naive / fast"]
    print(benchlib.markdown_table(headers, table))
    benchlib.write_results(
        "eval_scoring",
        args,
        {
            "model": name,
            "batch_size": args.batch_size,
            "num_eval": args.num_eval,
            "reps": args.reps,
            "tasks": results,
        },
    )
    for task_name, r in results.items():
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
