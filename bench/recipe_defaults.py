"""`chainlora train` end to end: its speed defaults vs the harness's way of training, same run, same machine.

    defaults   the recipe as shipped: precision/base_dtype auto (bf16 on a bf16 base where the device has bf16
               matmuls), length-grouped batches, shared-prompt rows for verbalized tasks, fused AdamW
    harness    --precision fp32 --base_dtype fp32 --group_by_length false --shared_prompt false: fp32, random
               batches padded to their longest row, one row per candidate (the MeZO harness). AdamW is fused in
               both (its share is measured by train_step.py)

Each run is a `python -m chainlora train` subprocess on the same config (0-shot scoring off); the two are
alternated (A, B, B, A, ...) and compared by the median of the per-pair ratios of the training loop's seconds
(`train_seconds` in metrics.json: optimizer steps plus the dev evaluation of each epoch). Test scores of both
are reported too: a bf16 base changes numerics, so they need not be equal.

    python bench/recipe_defaults.py --threads 1                     # the README's main job (BoolQ, SmolLM2-135M)
    python bench/recipe_defaults.py --config configs/x.yaml --reps 3
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

HARNESS = [
    "--precision",
    "fp32",
    "--base_dtype",
    "fp32",
    "--group_by_length",
    "false",
    "--shared_prompt",
    "false",
]
DEFAULT_CONFIG = benchlib.ROOT / "configs" / "quick_boolq_cola.yaml"


def train_once(config_args: list[str], extra: list[str], out: Path, threads: int | None) -> dict:
    """One ``chainlora train`` subprocess; its metrics.json."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-m",
        "chainlora",
        "train",
        *config_args,
        "--output_dir",
        str(out),
        "--zero_shot",
        "false",
    ]
    done = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"chainlora train failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a train config (YAML)")
    parser.add_argument("--data-dir", type=Path, default=None, help="CHAINLORA_DATA for the runs")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="chainlora-bench-") as tmp:
        tmp = Path(tmp)
        if args.quick:  # a tiny random model whose SST-2 verbalizers are single tokens, a few steps
            from chainlora.testing import tiny_model_dir

            model = tiny_model_dir(tmp / "tiny", extra_tokens=[" great", " terrible"])
            data = (args.data_dir or benchlib.SHARED_DATA) / "sst2"
            config_args = ["--model", str(model), "--task", "sst2", "--data", str(data), "--num_train", "16"]
            config_args += ["--num_dev", "8", "--num_eval", "8", "--batch_size", "4", "--epochs", "1"]
        else:
            config_args = ["--config", str(args.config)]
        if args.data_dir:
            os.environ["CHAINLORA_DATA"] = str(args.data_dir)
        variants = {"defaults": [], "harness": HARNESS}
        metrics: dict[str, list[dict]] = {name: [] for name in variants}
        for rep in range(reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                out = tmp / f"{name}-{rep}"
                metrics[name].append(train_once(config_args, variants[name], out, args.threads))
                print(f"rep {rep} {name}: {metrics[name][-1]['train_seconds']:.1f} s", flush=True)

    seconds = {name: [m["train_seconds"] for m in runs] for name, runs in metrics.items()}
    speedup = benchlib.paired_ratio(seconds["harness"], seconds["defaults"])
    rows = [
        [
            name,
            str(metrics[name][0]["speed"]),
            benchlib.median(seconds[name]),
            speedup if name == "defaults" else 1.0,
            ", ".join(f"{m['test_score']:.3f}" for m in metrics[name]),
        ]
        for name in variants
    ]
    print(
        benchlib.markdown_table(["variant", "speed settings", "train s (median)", "× harness", "test"], rows)
    )
    payload = {
        "config": config_args,
        "reps": reps,
        "threads": args.threads,
        "train_seconds": seconds,
        "speedup": speedup,
        "speed": {name: metrics[name][0]["speed"] for name in variants},
        "test_scores": {name: [m["test_score"] for m in metrics[name]] for name in variants},
    }
    benchlib.write_results("recipe_defaults", args, payload)
    return payload


if __name__ == "__main__":
    main()
