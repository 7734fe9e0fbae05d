"""The benchmarks in bench/ run end to end (--quick: tiny random model, a few steps), and their fast paths are
correct. No timing is asserted anywhere: the machine is shared, only ratios measured in one process mean
anything, and those belong in BENCHMARKS.md, not in a test."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from chainlora import perf, tie_knot
from chainlora.testing import tiny_causal_lm

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """Import ``bench/<name>.py`` as a module (its ``main(argv)`` runs the benchmark in this process)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / f"{name}.json"
    bench_module(name).main(["--quick", "--device", "cpu", "--out", str(out), *argv])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == name and saved["machine"]["device"] == "cpu"
    return saved


# ------------------------------------------------------------------------------------------- smoke runs


def test_train_step_quick(tmp_path):
    cola_name = "cola:bf16+w16+fused"  # bf16 base: knots keep fp32 master copies of the targeted weights
    saved = run_bench("train_step", tmp_path, "--variants", f"peft:fp32,{cola_name}", "--knot-every", "1")
    peft_run, cola = saved["variants"]["peft:fp32"], saved["variants"][cola_name]
    assert peft_run["x_first"] == 1.0 and cola["tokens_per_s"] > 0 and cola["flops_per_step"] > 0
    assert saved["knots_total"] == {"peft:fp32": 0, cola_name: saved["reps"] + 2}  # + 2 warm-up steps
    assert peft_run["fp32_master_copies_mib"] == 0 < cola["fp32_master_copies_mib"]
    # CPU MFU is against the matmul rate measured in the same process, per compute dtype (no value asserted)
    assert set(saved["matmul_peak"]) == {"fp32", "bf16"} and "measured" in saved["mfu_peak_source"]
    assert cola["mfu_peak_tflops"] == saved["matmul_peak"]["bf16"]["tflops"] and cola["mfu"] > 0
    # The CPU memory probe ran in its own process. peak >= resident holds up to the kernel's RSS counter slack
    # (CI once read a peak 0.18 MiB below the resident figure read before the steps).
    slack_mib = bench_module("benchlib").RSS_COUNTER_SLACK_MIB
    for variant in (peft_run, cola):
        memory = variant["memory"]
        assert memory["resident_mib"] > 0
        assert memory["peak_rss_mib"] >= memory["resident_mib"] - slack_mib


def test_knot_cost_quick(tmp_path):
    saved = run_bench("knot_cost", tmp_path)
    assert saved["lora_layers"] == 4  # tiny llama: 2 layers × (q_proj, v_proj)
    assert len(saved["knot_seconds"]) == len(saved["step_seconds"]) == saved["reps"]
    assert 0 < saved["knot_over_epoch"] < saved["knot_over_step"]


def test_checkpoint_seal_quick(tmp_path):
    saved = run_bench("checkpoint_seal", tmp_path)
    assert {"chainlora_chain.safetensors", "adapter_model.safetensors", "optimizer.pt"} <= set(
        saved["file_bytes"]
    )
    assert all(len(values) == saved["reps"] for values in saved["seconds"].values())
    assert saved["medians"]["seal"] > 0 and "hash_share" in saved


def test_batching_quick(tmp_path, shared_data):
    saved = run_bench("batching", tmp_path, "--tasks", "sst2")
    plans = saved["tasks"]["sst2"]["plans"]
    assert {"random", "grouped", "grouped-nopad8"} <= set(plans)
    for plan in plans.values():
        assert sum(s["size"] for s in plan["strata"]) == plan["batches"]
        assert plan["padded_tokens"] >= plan["real_tokens"]
    # grouping never pads more than random batches of the same examples
    assert plans["grouped"]["padded_tokens"] <= plans["random"]["padded_tokens"]
    assert plans["grouped-nopad8"]["padded_tokens"] <= plans["grouped"]["padded_tokens"]


def test_eval_scoring_quick_scores_identical(tmp_path, shared_data):
    saved = run_bench("eval_scoring", tmp_path, "--tasks", "sst2,copa")
    for result in saved["tasks"].values():
        assert result["max_abs_diff"] <= 1e-5 and result["identical_within_tolerance"]
        assert (
            result["fp64_examples"] == 2 and result["fast64_vs_naive64"] <= 1e-9
        )  # same method, not just close
        assert result["weight_macs_ratio"] > 1  # the fast path does less work


def test_quantized_quick(tmp_path):
    """QLoRA vs COLA on the same nf4 base (tiny model; the memory probes are subprocesses: skipped here)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "quantized.json"
    bench_module("quantized").main(["--quick", "--device", "cpu", "--out", str(out), "--memory", "none"])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "quantized_nf4" and saved["scheme"] == "nf4"
    qlora, cola = saved["variants"]["qlora"], saved["variants"]["cola"]
    assert len(cola["knot_seconds"]) == saved["knots"] == 3 and qlora["knot_seconds"] == []
    # 4 LoRA layers (tiny shape: 2 × q, v, 64 × 64), residual rank 3·8, fp32 factors (out + in = 128)
    assert cola["residual_mib"] == pytest.approx(4 * 3 * 8 * 128 * 4 / 2**20) and qlora["residual_mib"] == 0
    assert saved["cola_over_qlora_throughput"] > 0


def test_quantized_drift_quick(tmp_path, shared_data):
    """The same links re-quantized one knot after another vs folded into the exact residual (tiny model, sst2)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "drift.json"
    bench_module("quantized_drift").main(["--quick", "--out", str(out), "--data-dir", str(shared_data)])
    saved = json.loads(out.read_text())
    errors = saved["requantize_error_over_update"]
    assert len(errors["per_knot_median"]) == saved["knots"] == 3 and 0 < errors["median"] <= errors["max"]
    assert saved["logit_drift_over_chain_change"] > 0 and saved["logit_chain_change_max_abs"] > 0
    assert set(saved["test_score"]) == {"base", "exact_residual", "requantize"}


def test_sft_vs_trl_quick(tmp_path):
    """chainlora COLA (length-grouped and packed batches) vs TRL's SFTTrainer on a tiny ChatML model and
    examples/data/chat.jsonl: no ../shared, no network. TRL's variant is dropped only where trl is missing."""
    bench = bench_module("sft_vs_trl")
    chainlora_level = logging.getLogger("chainlora").level
    saved = run_bench(
        "sft_vs_trl",
        tmp_path,
        "--variants",
        "cola:grouped,cola:packed,trl:default,trl:completion-only",
        "--steps",
        "3",
        "--warmup",
        "1",
    )
    runs, has_trl = saved["variants"], bench.trl_available()
    assert logging.getLogger("chainlora").level == chainlora_level  # its quiet loggers are restored
    trl_variants = ["trl:default", "trl:completion-only"]
    assert set(runs) == {"cola:grouped", "cola:packed"} | (set(trl_variants) if has_trl else set())
    assert saved["skipped"] == ([] if has_trl else trl_variants)
    measures_rss, slack_mib = bench.benchlib.reset_peak_rss(), bench.benchlib.RSS_COUNTER_SLACK_MIB
    for name, run in runs.items():
        assert run["timed_steps"] == 2 and len(run["step_seconds"]) == 3 and run["tokens_per_s"] > 0
        assert 0 < run["real_tokens"] <= run["fed_tokens"] and 0 < run["loss_tokens"] <= run["real_tokens"]
        assert run["memory"]["real_tokens"] == 3 * sum(saved["heaviest_batch_lengths"])  # 3 steps, same batch
        if measures_rss:
            assert min(run["peak_delta_mib"], run["memory"]["peak_delta_mib"]) >= -slack_mib
        if name.startswith("cola:"):  # 3 links over 3 steps: a knot after steps 1 and 2, each timed
            assert run["knots"] == [1, 2] and len(run["knot_seconds"]) == 2 and 0 < run["knot_share"] < 1
            assert run["loss_tokens"] < run["real_tokens"]  # assistant turns only
    packed = runs["cola:packed"]
    assert packed["padding_share"] == 0 and packed["real_tokens"] == packed["fed_tokens"]
    if has_trl:  # the same conversations, tokenized alike by both; TRL's default loss takes every token
        trl = runs["trl:default"]
        assert trl["dataset_tokens"] == packed["dataset_tokens"] and trl["examples"] == packed["examples"]
        assert trl["loss_tokens"] == trl["real_tokens"] and trl["gradient_checkpointing"]
        answers = runs[
            "trl:completion-only"
        ]  # the same conversations, the loss on the answers only, as COLA's
        assert (
            answers["dataset_tokens"] == packed["dataset_tokens"]
            and answers["examples"] == packed["examples"]
        )
        assert 0 < answers["loss_tokens"] < answers["real_tokens"] and answers["gradient_checkpointing"]
        assert set(saved["verdicts"]) == {"tokens_per_s", "peak_memory", "knot_share"}
    else:
        assert saved["verdicts"] == {}


@pytest.mark.parametrize("shape, billions", [("opt-1.3b", 1.316), ("llama-2-7b", 6.738)])
def test_paper_shapes_have_the_papers_parameter_counts(shape, billions):
    """The CUDA benchmarks' random-init models (built here on the meta device: no memory, no time)."""
    model, _ = bench_module("benchlib").load_model(shape, "meta")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.002)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------ correctness of fast paths


def test_batching_plans_are_epochs_and_strata_cover_them(tokenizer):
    batching = bench_module("batching")

    class Lengths:  # a dataset stand-in: a skewed (long-tailed) length distribution, one row per item
        def __init__(self, lengths):
            self.lengths = lengths

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, i):
            return {"input_ids": [[0] * self.lengths[i]]}

    generator = torch.Generator().manual_seed(0)
    dataset = Lengths((torch.distributions.Exponential(0.05).sample((203,)) + 2).long().tolist())
    plans = batching.plans_for(dataset, 8, seed=0)
    for batches in plans.values():  # every example exactly once per epoch, batches of 8 (last one shorter)
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert [len(b) for b in batches] == [8] * 25 + [3]
    assert plans["random"] != plans["grouped"]
    stats = {k: batching.padding_stats(dataset, b, None) for k, b in plans.items()}
    assert stats["grouped"]["padded_tokens"] < 0.8 * stats["random"]["padded_tokens"]
    chosen = batching.strata(dataset, plans["grouped"], 5, None)
    assert sum(size for _, size in chosen) == 26 and len(chosen) == 5
    widths = [batching.padded_length(dataset, b, None) for b, _ in chosen]
    assert widths == sorted(widths)  # one representative per length stratum, shortest to longest
    del generator


def test_compiled_model_survives_knots_without_recompiling():
    """A same-rank knot re-initialises the links in place, so Dynamo's guards still hold: no new graph.
    A rank change replaces the LoRA modules and must recompile, which shows the counter sees recompilation."""
    model = get_peft_model(
        tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    optimizer = perf.adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, backend="aot_eager")  # Dynamo's guards, without the inductor build time
    ids = torch.randint(0, 320, (2, 16))

    def step():
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    torch._dynamo.reset()
    step()
    graphs = perf.compiled_graph_count()
    for _ in range(2):
        tie_knot(model, optimizer)
        step()
    assert perf.compiled_graph_count() == graphs
    tie_knot(model, optimizer, rank=2)
    step()
    assert perf.compiled_graph_count() > graphs


def test_speed_defaults_and_fused_adamw_match_plain_adamw():
    defaults = perf.speed_defaults("cpu")
    assert defaults.precision in ("fp32", "bf16") and not defaults.compiled and defaults.group_by_length
    assert defaults.training_arguments()["bf16"] == (defaults.precision == "bf16")
    # the fused optimizer takes the same steps as the default one
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fast, plain = perf.adamw(weights, lr=0.1, fused=True), torch.optim.AdamW(copies, lr=0.1, weight_decay=0.0)
    for _ in range(3):
        for group in (weights, copies):
            sum((w**2).sum() for w in group).backward()
        fast.step(), plain.step()
        fast.zero_grad(), plain.zero_grad()
    for w, c in zip(weights, copies, strict=True):
        torch.testing.assert_close(w, c)


def test_autocast_fp32_is_a_no_op():
    with perf.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with perf.autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["peft:fp32", "cola:bf16+w16+fused+compile", "full:fp16+foreach"])
def test_train_step_variant_specs_parse(spec):
    variant = bench_module("train_step").Variant.parse(spec)
    assert variant.name == spec and variant.method == spec.split(":")[0]


def test_train_step_rejects_unknown_option():
    with pytest.raises(SystemExit, match="unknown option"):
        bench_module("train_step").Variant.parse("cola:bf16+turbo")


def test_shared_prompt_loss_equals_harness_loss_and_gradients(tokenizer):
    """One prefix row per example gives the harness's classification loss (and gradients) exactly."""
    from chainlora import tasks
    from chainlora.tasks.shared_prompt import SharedPromptCollator, shared_prompt_loss, shared_prompt_view

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_causal_lm("llama"), config)  # non-zero B: the LoRA gradients are not trivial
    items = []
    for prefix_length, candidates, label in [(5, 2, 1), (9, 3, 0), (3, 2, 0), (12, 3, 2)]:
        prefix = torch.randint(3, 320, (prefix_length,)).tolist()
        options = torch.randperm(317)[:candidates].add(3).tolist()
        items.append(
            {"input_ids": [[*prefix, t] for t in options], "option_lengths": [1] * candidates, "label": label}
        )
    dataset = tasks.TrainingDataset(items, "classification")
    view = shared_prompt_view(dataset)
    assert view is not None and view.lengths == [5, 9, 3, 12]

    def loss_and_grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full, full_grads = loss_and_grads(tasks.compute_loss(model, tasks.TrainingCollator(tokenizer)(items)))
    shared, shared_grads = loss_and_grads(
        shared_prompt_loss(model, SharedPromptCollator(tokenizer)(view.items))
    )
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(shared_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "item, objective",
    [
        ({"input_ids": [[1, 2, 3, 4], [1, 2, 5, 6]], "option_lengths": [2, 2], "label": 0}, "classification"),
        ({"input_ids": [[1, 2, 3], [1, 4, 5]], "option_lengths": [1, 1], "label": 0}, "classification"),
        ({"input_ids": [[1, 2, 3]], "option_lengths": [1], "label": 0}, "lm"),
    ],
    ids=["multi-token options", "prefixes differ (BPE merge)", "lm objective"],
)
def test_shared_prompt_view_refuses_what_it_cannot_reproduce(item, objective):
    from chainlora import tasks
    from chainlora.tasks.shared_prompt import shared_prompt_view

    assert shared_prompt_view(tasks.TrainingDataset([item], objective)) is None
