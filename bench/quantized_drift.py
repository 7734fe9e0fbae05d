"""How far ``quantized_merge: requantize`` drifts from the exact residual after a few knots, on a real task.

One COLA chain is trained on a bitsandbytes-quantized base (``--scheme``, fp32 compute; LoRA r=8 on q_proj,
v_proj; AdamW; the task's training loss) for ``--knots`` links of ``--steps`` steps, each tied into the exact
residual (``chainlora.tie_knot``; each link recorded here before its knot). The *same* links are then
re-quantized one after another into a freshly quantized copy of the base (``chainlora.quantized.requantize_``: dequantize → add → quantize, as
the ReLoRA tools merge), so the two models differ by the rounding of the requantize merges alone. Reported:

* per layer and knot, the requantize error ``‖deq(Q(W+Δ)) − (W+Δ)‖ / ‖Δ‖`` (median, max);
* on ``--num-eval`` test examples of ``--task``: the logit drift ``‖y_req − y_exact‖ / ‖y_exact − y_base‖``
  (Frobenius over every real token; y_base: the quantized base without the chain), its max abs value, and
  the task score and mean candidate log-prob margin of the three models.

    python bench/quantized_drift.py --threads 1                   # smollm2-135m, nf4, sst2, 3 knots
    python bench/quantized_drift.py --quick --data-dir ../shared/data   # tiny random model: a smoke run
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
from chainlora import models, quantized, tasks, tie_knot
from chainlora.chain import link_delta
from chainlora.links import lora_layers

PREFIX = "base_model.model."


def load_base(folder: Path, scheme: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = quantized.bnb_config(scheme, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map={"": "cpu"}, dtype=torch.float32
    )
    quantized.disable_cpu_bf16_repack(model)
    return model.train()  # the CPU int8 path multiplies by deq(W) in training mode only; no dropout here


def eval_batches(task, examples, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    dataset = tasks.build_training_dataset(task, examples, tokenizer)
    collate = tasks.TrainingCollator(tokenizer)
    return [
        collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        for i in range(0, len(dataset), batch_size)
    ]


@torch.no_grad()
def outputs(model, batches) -> tuple[torch.Tensor, float]:
    """Logits of every real token of every row (concatenated), and the mean task loss."""
    logits, losses = [], []
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits.append(out[batch["attention_mask"].bool()])
        losses.append(float(tasks.compute_loss(model, batch)))
    return torch.cat(logits), sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> dict:
    parser = benchlib.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--scheme", default="nf4", choices=quantized.QUANT_SCHEMES)
    parser.add_argument("--task", default="sst2")
    parser.add_argument(
        "--data-dir", type=Path, default=benchlib.SHARED_DATA if benchlib.SHARED_DATA.is_dir() else None
    )
    parser.add_argument("--knots", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per link")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-eval", type=int, default=None)
    args = parser.parse_args(argv)
    benchlib.setup(args)
    args.steps = args.steps or (2 if args.quick else 10)
    args.num_eval = args.num_eval or (8 if args.quick else 64)
    name = benchlib.default_model(args)
    if name == "tiny":  # a random tiny Llama with a tokenizer (no download)
        from chainlora.testing import tiny_model_dir

        folder = tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama")
    else:
        folder = Path(name) if Path(name).is_dir() else models.ensure_converted(name)
    from transformers import AutoConfig, AutoTokenizer

    # a converted folder's tokenizer was prepared (BOS) when it was saved
    tokenizer = models.prepare_tokenizer(
        AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    )

    task = tasks.get_task(args.task)
    data = args.data_dir / args.task if args.data_dir is not None else None
    splits = tasks.load_task_data(task, data=data).sample(
        args.seed, num_train=args.knots * args.steps * args.batch_size, num_dev=0, num_eval=args.num_eval
    )
    train_set = tasks.build_training_dataset(task, splits.train, tokenizer)
    collate = tasks.TrainingCollator(tokenizer)
    test = eval_batches(task, splits.test, tokenizer, args.batch_size)

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_base(folder, args.scheme), lora)
    quantized.attach_residuals(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    train_losses = []
    deltas: dict[
        str, list[torch.Tensor]
    ] = {}  # each layer's tied links s·B·A (the residual holds only their sum)
    for link in range(1, args.knots + 1):
        for step in range(args.steps):
            i = ((link - 1) * args.steps + step) * args.batch_size
            loss = tasks.compute_loss(model, collate([train_set[j] for j in range(i, i + args.batch_size)]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_losses.append(float(loss.detach()))
        for layer_name, layer, adapter in lora_layers(model):
            deltas.setdefault(layer_name, []).append(link_delta(layer, adapter)[0].detach().cpu())
        tie_knot(model, optimizer, generator=torch.Generator().manual_seed(args.seed * 1000 + link))
    train_seconds = time.perf_counter() - start

    # the same links, re-quantized into a fresh copy of the base one knot after another
    requantized = load_base(folder, args.scheme)
    modules = dict(requantized.named_modules())
    errors: list[list[float]] = [[] for _ in range(args.knots)]
    for layer_name, links in deltas.items():
        bnb_layer = modules[layer_name.removeprefix(PREFIX)]
        for i, delta in enumerate(links):
            errors[i].append(quantized.requantize_(bnb_layer, delta).relative_to_update)
    base = load_base(folder, args.scheme)

    y_exact, loss_exact = outputs(model, test)
    y_req, loss_req = outputs(requantized, test)
    y_base, loss_base = outputs(base, test)
    chain_change = float((y_exact - y_base).norm())
    drift = float((y_req - y_exact).norm())
    scores = {}
    for label, m in (("base", base), ("exact_residual", model), ("requantize", requantized)):
        m.eval()
        scores[label] = tasks.evaluate(m, tokenizer, task, splits.test, batch_size=args.batch_size)["score"]
        m.train()
    flat = [e for knot in errors for e in knot]
    result: dict[str, Any] = {
        "model": name,
        "scheme": args.scheme,
        "bitsandbytes": quantized.bitsandbytes_version(),
        "task": args.task,
        "knots": args.knots,
        "steps_per_link": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_eval": len(splits.test),
        "train_seconds": train_seconds,
        "train_loss_first_last": [train_losses[0], train_losses[-1]],
        "requantize_error_over_update": {
            "per_knot_median": [float(torch.tensor(k).median()) for k in errors],
            "median": float(torch.tensor(flat).median()),
            "max": max(flat),
        },
        "logit_drift_over_chain_change": drift / chain_change if chain_change > 0 else None,
        "logit_drift_max_abs": float((y_req - y_exact).abs().max()),
        "logit_chain_change_max_abs": float((y_exact - y_base).abs().max()),
        "test_loss": {"base": loss_base, "exact_residual": loss_exact, "requantize": loss_req},
        "test_score": scores,
    }
    print(
        f"\n### quantized drift: {name} in {args.scheme}, {args.task}, {args.knots} knots × {args.steps} steps"
    )
    rows = [
        [
            "requantize error / ‖Δ‖ (median, max over layers × knots)",
            f"{result['requantize_error_over_update']['median']:.3f}, {result['requantize_error_over_update']['max']:.3f}",
        ],
        [
            "logit drift ‖y_req − y_exact‖ / ‖y_exact − y_base‖",
            f"{result['logit_drift_over_chain_change']:.3f}",
        ],
        [
            "max abs(y_req − y_exact) (max abs(y_exact − y_base))",
            f"{result['logit_drift_max_abs']:.4f} ({result['logit_chain_change_max_abs']:.4f})",
        ],
        [
            "test loss base / exact / requantize",
            " / ".join(f"{result['test_loss'][k]:.4f}" for k in ("base", "exact_residual", "requantize")),
        ],
        [
            "test score base / exact / requantize",
            " / ".join(f"{scores[k]:.4f}" for k in ("base", "exact_residual", "requantize")),
        ],
    ]
    print(benchlib.markdown_table(["measure", "value"], rows))
    benchlib.write_results(f"quantized_drift_{args.scheme}", args, result)
    return result


if __name__ == "__main__":
    main()
