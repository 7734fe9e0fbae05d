"""Real-task training throughput: length-grouped batches vs HF's default (random batches padded to the longest).

Data: the task's real training view (``chainlora.tasks.build_training_dataset``: every candidate of an example is
a row, left-padded by ``TrainingCollator``), seed-0 draw of ``--num-train`` examples (the paper: 1000), tokenized
by the model's tokenizer. Plans for one epoch of batches of ``--batch-size`` examples:

    random    HF Trainer's default: a random permutation, each batch padded to its longest row (multiple of 8)
    grouped   ``chainlora.tasks.length_grouped_sampler``: HF's ``LengthGroupedSampler`` (random megabatches of
              50 batches, sorted by length inside) over the dataset's real lengths; same collator
    grouped-nopad8  the same without rounding the padded length up to a multiple of 8 (``--cpu`` only matters)

Two figures per plan: the exact padded/real token ratio over the whole epoch, and measured examples/s of real
training steps (forward + ``tasks.compute_loss`` + backward + AdamW). To measure an epoch's cost without running
it, each plan's batches are sorted by padded length and cut into ``--strata`` equal strata; the middle batch of
each stratum is timed (``--reps`` times, interleaved across plans, median) and stands for its stratum.

    python bench/batching.py                            # CPU: smollm2-135m, sst2 + boolq, batch 8
    python bench/batching.py --device cuda --model <folder or registry name>
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from chainlora import perf, tasks
from chainlora.tasks.shared_prompt import SharedPromptCollator, shared_prompt_loss, shared_prompt_view


def plans_for(dataset, batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    n = len(dataset)
    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    grouped_order = list(
        tasks.length_grouped_sampler(dataset, batch_size, torch.Generator().manual_seed(seed))
    )

    def batches(order: list[int]) -> list[list[int]]:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    return {"random": batches(random_order), "grouped": batches(grouped_order)}


def padded_length(dataset, batch: list[int], multiple: int | None) -> int:
    longest = max(dataset.lengths[i] for i in batch)
    return math.ceil(longest / multiple) * multiple if multiple else longest


def rows_of(item: dict) -> list:
    """A training item's rows: a list of rows (TrainingDataset), or one prefix row (shared-prompt view)."""
    ids = item["input_ids"]
    return ids if ids and isinstance(ids[0], list) else [ids]


def padding_stats(dataset, batches: list[list[int]], multiple: int | None) -> dict[str, float]:
    real = padded = 0
    for batch in batches:
        width = padded_length(dataset, batch, multiple)
        for i in batch:
            rows = rows_of(dataset[i])
            real += sum(len(r) for r in rows)
            padded += width * len(rows)
    return {"real_tokens": real, "padded_tokens": padded, "padded_over_real": padded / real}


def strata(dataset, batches: list[list[int]], k: int, multiple: int | None) -> list[tuple[list[int], int]]:
    """``k`` representative batches (the middle one of each equal stratum by padded length) and stratum sizes."""
    order = sorted(range(len(batches)), key=lambda b: padded_length(dataset, batches[b], multiple))
    k = min(k, len(order))
    bounds = np.linspace(0, len(order), k + 1).round().astype(int)
    return [(batches[order[(lo + hi - 1) // 2]], int(hi - lo)) for lo, hi in itertools.pairwise(bounds)]


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,boolq")
    parser.add_argument(
        "--data-dir", type=Path, default=benchlib.SHARED_DATA if benchlib.SHARED_DATA.is_dir() else None
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--strata", type=int, default=None, help="timed batches per plan")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    args = parser.parse_args(argv)
    benchlib.setup(args)
    name = benchlib.default_model(args)
    if name in benchlib.SHAPES and name != "tiny":
        raise SystemExit("batching needs a real tokenizer: pass a model folder or registry name, or --quick")
    args.reps = args.reps or (1 if args.quick else 2)
    args.strata = args.strata or (2 if args.quick else 5)
    args.precision = args.precision or perf.speed_defaults(args.device).precision
    if args.quick:
        args.num_train = min(args.num_train, 64)

    from peft import LoraConfig, get_peft_model

    model, tokenizer = benchlib.load_model(name, args.device, layers=args.layers, seed=args.seed)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    optimizer = perf.adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collators = {
        8: tasks.TrainingCollator(tokenizer, pad_to_multiple_of=8),
        None: tasks.TrainingCollator(tokenizer, pad_to_multiple_of=None),
    }

    shared_collator = SharedPromptCollator(tokenizer)

    def train_step(dataset, batch: list[int], multiple: int | None, loss_kind: str):
        collate, loss_fn = (
            (collators[multiple], tasks.compute_loss)
            if loss_kind == "rows"
            else (shared_collator, shared_prompt_loss)
        )

        def run() -> None:
            inputs = collate([dataset[i] for i in batch])
            inputs = {k: v.to(args.device) for k, v in inputs.items()}
            with perf.autocast(args.device, args.precision):
                loss = loss_fn(model, inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    results: dict[str, dict] = {}
    table = []
    for task_name in args.tasks.split(","):
        task = tasks.get_task(task_name)
        data = tasks.load_task_data(task, data_dir=args.data_dir)
        splits = data.sample(args.seed, num_train=args.num_train, num_dev=0, num_eval=0)
        dataset = tasks.build_training_dataset(task, splits.train, tokenizer)
        plans = plans_for(dataset, args.batch_size, args.seed)
        # plan name -> (dataset, batches, pad multiple, loss)
        setups = {
            "random": (dataset, plans["random"], 8, "rows"),
            "grouped": (dataset, plans["grouped"], 8, "rows"),
            "grouped-nopad8": (dataset, plans["grouped"], None, "rows"),
        }
        view = shared_prompt_view(dataset)
        if view is not None:
            setups["grouped+shared-prompt"] = (
                view,
                plans_for(view, args.batch_size, args.seed)["grouped"],
                None,
                "shared",
            )
        reps = {k: strata(d, b, args.strata, m) for k, (d, b, m, _) in setups.items()}
        fns = {}
        for k, chosen in reps.items():
            d, _, multiple, loss = setups[k]
            for s, (batch, _) in enumerate(chosen):
                fns[(k, s)] = train_step(d, batch, multiple, loss)
        # warm up once on the longest batch of all (allocations), then time interleaved: one stratum at a time
        fns[("random", len(reps["random"]) - 1)]()
        times = {key: [] for key in fns}
        for s in range(args.strata):
            chunk = {key: fn for key, fn in fns.items() if key[1] == s}
            for key, values in benchlib.interleaved(chunk, args.reps, args.device, warmup=0).items():
                times[key] = values
        lengths = np.array(dataset.lengths)
        task_result = {
            "examples": len(dataset),
            "rows_per_example": float(np.mean([len(dataset[i]["input_ids"]) for i in range(len(dataset))])),
            "length_mean": float(lengths.mean()),
            "length_median": float(np.median(lengths)),
            "length_p90": float(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
            "plans": {},
        }
        if view is not None:  # the shared-prompt loss equals the harness's loss on the same examples (fp32)
            first = list(range(min(args.batch_size, len(dataset))))
            with torch.no_grad():
                full = tasks.compute_loss(
                    model,
                    {k: v.to(args.device) for k, v in collators[8]([dataset[i] for i in first]).items()},
                )
                shared = shared_prompt_loss(
                    model,
                    {k: v.to(args.device) for k, v in shared_collator([view[i] for i in first]).items()},
                )
            task_result["shared_prompt_loss_abs_diff"] = abs(float(full) - float(shared))
        for k, (d, batches, multiple, _) in setups.items():
            epoch_s = sum(benchlib.median(times[(k, s)]) * size for s, (_, size) in enumerate(reps[k]))
            task_result["plans"][k] = {
                **padding_stats(d, batches, multiple),
                "batches": len(batches),
                "estimated_epoch_seconds": epoch_s,
                "examples_per_s": len(dataset) / epoch_s,
                "strata": [
                    {"padded_length": padded_length(d, b, multiple), "size": size, "seconds": times[(k, s)]}
                    for s, (b, size) in enumerate(reps[k])
                ],
            }
        base = task_result["plans"]["random"]
        for k, plan in task_result["plans"].items():
            plan["speedup_vs_random"] = plan["examples_per_s"] / base["examples_per_s"]
            plan["token_ratio_vs_random"] = base["padded_tokens"] / plan["padded_tokens"]
            table.append(
                [
                    task_name,
                    k,
                    f"{plan['padded_tokens']:,}",
                    f"{plan['token_ratio_vs_random']:.2f}",
                    f"{plan['examples_per_s']:.2f}",
                    f"{plan['speedup_vs_random']:.2f}",
                ]
            )
        results[task_name] = task_result
        print(f"{task_name}: done", flush=True)

    print(
        f"\n### batching: {name}, batch {args.batch_size} examples, {args.num_train} train examples, "
        f"{args.precision}, {args.device}, {args.strata} strata × {args.reps} reps"
    )
    headers = [
        "task",
        "plan",
        "tokens/epoch (with padding)",
        "fewer tokens × random",
        "examples/s",
        "× random (measured)",
    ]
    print(benchlib.markdown_table(headers, table))
    benchlib.write_results(
        "batching",
        args,
        {
            "model": name,
            "batch_size": args.batch_size,
            "num_train": args.num_train,
            "precision": args.precision,
            "strata": args.strata,
            "reps": args.reps,
            "tasks": results,
        },
    )
    return results


if __name__ == "__main__":
    main()
