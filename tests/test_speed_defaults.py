"""The fast training paths are the defaults of ``chainlora train``, and each is a pure speed-up or states its cost:

* ``shared_prompt``: one row per example trains exactly like the harness's one row per candidate;
* ``group_by_length``: batches of similar length, in an order that is a pure function of (seed, epoch);
* ``precision: auto`` / ``base_dtype: auto``: bf16 autocast on a bf16 base where the device has bf16 matmuls,
  LoRA parameters in fp32, knots exact through fp32 master copies kept on the CPU;
* AdamW fused where torch has the kernel;
* ``compile``: on CUDA by default; a compiled graph survives a knot without recompiling; under ``auto`` a
  compilation that fails falls back to eager (``on`` fails loudly).

Every automatic choice that differs on CUDA (``chainlora.perf``'s list) is checked here on the CPU, from
made-up device capabilities.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from chainlora import models, perf, tasks
from chainlora.chain import master_copy, master_device
from chainlora.cli import main
from chainlora.config import TrainConfig, parse_config
from chainlora.errors import ConfigError
from chainlora.links import layer_chain, lora_layers
from chainlora.perf import Capabilities, resolve_speed
from chainlora.recipes.train import train
from chainlora.tasks.training import EpochSeededLengthGroupedSampler
from chainlora.testing import tiny_model_dir

train_module = importlib.import_module("chainlora.recipes.train")  # the module (the package exports `train`)

# SST-2's verbalizers as single tokens (as in a real vocabulary), so the task has a shared-prompt view
VERBALIZER_TOKENS = [" great", " terrible"]
SMALL = ["--num_train", "16", "--num_dev", "8", "--num_eval", "8", "--batch_size", "4", "--epochs", "2"]


@pytest.fixture(scope="module")
def sst2_model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-sst2"), "llama", extra_tokens=VERBALIZER_TOKENS)


def run(model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    args = [
        "--model",
        str(model_dir),
        "--task",
        "sst2",
        "--data",
        str(data / "sst2"),
        "--output_dir",
        str(out),
    ]
    assert main(["train", *args, *SMALL, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_auto_settings_follow_the_device():
    defaults = perf.speed_defaults("cuda" if torch.cuda.is_available() else "cpu")
    cola = resolve_speed(TrainConfig(method="cola"))
    assert (cola.precision, cola.base_dtype) == (defaults.precision, defaults.precision)
    assert cola.optim == defaults.optim  # fused AdamW where torch has the kernel
    full = resolve_speed(TrainConfig(method="full"))
    assert (full.precision, full.base_dtype) == (defaults.precision, "fp32")  # trained weights stay fp32
    assert resolve_speed(TrainConfig(method="lora", precision="fp32")).base_dtype == "fp32"
    assert resolve_speed(TrainConfig(method="lora", optimizer="sgd")).optim == "sgd"
    assert (cola.compiled, cola.compile) == (defaults.compiled, defaults.compile)  # CUDA only
    on, off = resolve_speed(TrainConfig(compile="on")), resolve_speed(TrainConfig(compile="off"))
    assert (on.compiled, on.compile, off.compiled, off.compile) == (True, "on", False, "off")
    defaults_of_the_cli = TrainConfig()
    assert defaults_of_the_cli.group_by_length and defaults_of_the_cli.shared_prompt
    assert (defaults_of_the_cli.precision, defaults_of_the_cli.base_dtype) == ("auto", "auto")


# ------------------------------------------------- the automatic choices that differ on CUDA, decided on a CPU

H100 = Capabilities("cuda", bf16=True, fused_adamw=True)
V100 = Capabilities("cuda", bf16=False, fused_adamw=True)  # no bf16 matmuls before Ampere
AMX_CPU = Capabilities("cpu", bf16=True, fused_adamw=True)
OLD_CPU = Capabilities("cpu", bf16=False, fused_adamw=False)  # no AVX512-BF16; torch < 2.4


@pytest.mark.parametrize(
    ("caps", "precision", "optim", "compile_"),
    [
        (H100, "bf16", "adamw_torch_fused", "auto → on"),
        (V100, "fp32", "adamw_torch_fused", "auto → on"),
        (AMX_CPU, "bf16", "adamw_torch_fused", "auto → off"),
        (OLD_CPU, "fp32", "adamw_torch", "auto → off"),
    ],
)
def test_each_automatic_choice_follows_the_capabilities(caps, precision, optim, compile_):
    """autocast, base dtype, fused AdamW and compile, from made-up capabilities (``perf``'s list)."""
    defaults = perf.speed_defaults(caps)
    assert (defaults.precision, defaults.optim, defaults.compile) == (precision, optim, compile_)
    assert defaults.compiled == (compile_ == "auto → on") == perf.compile_by_default(caps)
    cola = resolve_speed(TrainConfig(method="cola"), caps)
    assert (cola.precision, cola.base_dtype, cola.optim, cola.compile) == (
        precision,
        precision,
        optim,
        compile_,
    )
    full = resolve_speed(TrainConfig(method="full"), caps)
    assert (full.precision, full.base_dtype) == (precision, "fp32")
    assert resolve_speed(TrainConfig(method="cola", optimizer="sgd"), caps).optim == "sgd"
    assert not resolve_speed(TrainConfig(compile="off"), caps).compiled
    if caps.device == "cpu":
        with pytest.raises(ConfigError, match="fp16 autocast needs a GPU"):
            resolve_speed(TrainConfig(precision="fp16"), caps)
    else:
        assert resolve_speed(TrainConfig(precision="fp16"), caps).base_dtype == "fp16"


def test_capabilities_are_read_from_torch(monkeypatch):
    """bf16: ``torch.cuda.is_bf16_supported()`` on CUDA, oneDNN's check on the CPU; fused AdamW: torch's list."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16 in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert perf.capabilities("cuda") == Capabilities("cuda", bf16=bf16, fused_adamw=True)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda bf16=bf16: bf16)
        assert perf.capabilities("cpu").bf16 is bf16
    assert perf.training_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not perf.bf16_supported("cuda") and perf.training_device() == torch.device("cpu")


def test_fp32_masters_stay_on_the_cpu_whatever_the_weight_device():
    """On a GPU the masters take no accelerator memory; an FSDP2 shard keeps its own beside it."""
    assert master_device(torch.device("cuda", 1)) == torch.device("cpu")
    assert master_device("cuda:1", sharded=True) == torch.device("cuda", 1)
    assert master_device("cpu") == torch.device("cpu")
    weight = torch.randn(4, 4, dtype=torch.bfloat16)
    master = master_copy(weight)
    assert (master.dtype, master.device.type) == (
        torch.float32,
        "cpu",
    ) and master.data_ptr() != weight.data_ptr()


def test_training_batches_pad_to_a_multiple_of_8_only_on_cuda(monkeypatch, tiny_llama_dir):
    """The padded width: tensor-core tiles on CUDA, the longest row on the CPU (rounding only adds tokens there);
    the recipes' collators take it from the training device."""
    from chainlora.data import DataSpec, PaddedCollator
    from chainlora.recipes.workload import load_workload

    assert perf.pad_multiple("cuda") == 8 and perf.pad_multiple("cuda:1") == 8
    assert (
        perf.pad_multiple("cpu") is None
        and perf.pad_multiple("cpu", 128) == perf.pad_multiple("cuda", 128) == 128
    )
    items = [{"input_ids": [5] * 9, "labels": [1] * 9}, {"input_ids": [5] * 3, "labels": [1] * 3}]
    assert PaddedCollator(0)(items)["input_ids"].shape == (2, 9)
    assert PaddedCollator(0, perf.pad_multiple("cuda"))(items)["input_ids"].shape == (2, 16)
    _, tokenizer = models.load(str(tiny_llama_dir))
    root = Path(__file__).resolve().parents[1] / "examples" / "data"
    for name in ("text.jsonl", "choices.jsonl"):
        config = TrainConfig(model=str(tiny_llama_dir), data=DataSpec(path=str(root / name)), num_eval=0)
        for device, multiple in (("cpu", None), ("cuda", 8)):
            monkeypatch.setattr(perf, "training_device", lambda device=device: torch.device(device))
            _, _, collator, _ = load_workload(config).datasets(tokenizer, config)
            assert collator.pad_to_multiple_of == multiple, (name, device)
        fixed = TrainConfig(
            model=str(tiny_llama_dir), data=DataSpec(path=str(root / name)), num_eval=0, pad_to_multiple_of=64
        )
        assert load_workload(fixed).datasets(tokenizer, fixed)[2].pad_to_multiple_of == 64


def test_attention_is_sdpa_and_scoring_batches_follow_the_device(tiny_llama_dir):
    """chainlora never sets ``attn_implementation``: transformers' default, SDPA, on every device. Prefix
    batches are cut by a measured forward cost on the CPU, kept full where it was not measured (CUDA)."""
    model, _ = models.load(str(tiny_llama_dir))
    assert model.config._attn_implementation == "sdpa"
    assert tasks.scoring.default_forward_cost("cpu") == 48.0
    assert tasks.scoring.default_forward_cost("cuda") == math.inf


# ------------------------------------------------------------------ compile: auto falls back to eager


def sst2_folder(folder: Path, rows: int = 24) -> Path:
    """SST-2 rows of random words in the task's file layout (no ``../shared`` needed)."""
    rng = random.Random(0)
    words = ["good", "bad", "film", "great", "plot", "terrible", "story", "fun", "long", "dull"]
    folder.mkdir(parents=True)
    for split in ("train", "validation"):
        lines = [
            json.dumps(
                {"sentence": " ".join(rng.choices(words, k=rng.randint(3, 9))), "label": i % 2, "idx": i}
            )
            for i in range(rows)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def failing_backend(where: str):
    """A ``torch.compile`` backend that raises while compiling the forward, or (lazily) the backward."""
    from torch._dynamo.backends.common import aot_autograd

    def fail(gm, example_inputs):
        raise RuntimeError(f"forced {where} compile failure")

    if where == "forward":
        return fail
    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=fail)


@pytest.fixture(scope="module")
def sst2_run(sst2_model_dir, tmp_path_factory):
    data = sst2_folder(tmp_path_factory.mktemp("sst2") / "sst2")
    args = ["--model", str(sst2_model_dir), "--task", "sst2", "--data", str(data), *SMALL]
    args += ["--method", "cola", "--chain.length", "2", "--lr", "1e-2", "--precision", "fp32"]

    def config(out: Path, compile_: str) -> TrainConfig:
        return parse_config(
            TrainConfig, [*args, "--output_dir", str(out), "--compile", compile_], prog="test"
        )

    eager = train(config(tmp_path_factory.mktemp("eager") / "run", "off"))
    return config, eager


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_compile_auto_falls_back_to_eager_when_compiling_fails(
    sst2_run, where, tmp_path, monkeypatch, caplog
):
    """``compile: auto`` resolved to on (made-up CUDA capabilities) with a backend that fails: one warning line,
    metrics.json says why, and the run trains exactly like the eager run (the failed step is redone)."""
    config, eager = sst2_run
    monkeypatch.setattr(perf, "capabilities", lambda device: V100)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=failing_backend(where)))
    with caplog.at_level(logging.WARNING, logger="chainlora"):
        metrics = train(config(tmp_path / "auto", "auto"))
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "chainlora" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and "training eagerly" in warnings[0], warnings
    assert metrics["speed"]["compile"].startswith("failed → eager: ")
    assert f"forced {where} compile failure" in metrics["speed"]["compile"]
    assert not metrics["speed"]["compiled"] and eager["speed"]["compile"] == "off"
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["speed"] == metrics["speed"]
    assert metrics["knots"] == eager["knots"] and len(metrics["knots"]) == 1
    for mine, theirs in zip(metrics["train_loss"], eager["train_loss"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)


def test_compile_on_fails_loudly(sst2_run, tmp_path, monkeypatch):
    config, _ = sst2_run
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compile_(model, backend=failing_backend("forward"))
    )
    with pytest.raises(Exception, match="forced forward compile failure"):
        train(config(tmp_path / "on", "on"))


def test_shared_prompt_batches_train_exactly_like_the_harness_rows(sst2_model_dir, shared_data, tmp_path):
    common = ["--method", "cola", "--chain.length", "2", "--precision", "fp32", "--lr", "1e-2"]
    shared = run(sst2_model_dir, shared_data, tmp_path / "shared", *common)
    rows = run(sst2_model_dir, shared_data, tmp_path / "rows", *common, "--shared_prompt", "false")
    assert shared["speed"]["batching"] == "shared_prompt" and rows["speed"]["batching"] == "rows"
    # half the rows (2 candidates per example), so fewer FLOPs for the same steps
    assert shared["train_flops"] < rows["train_flops"] and shared["train_steps"] == rows["train_steps"]
    for mine, theirs in zip(shared["train_loss"], rows["train_loss"], strict=True):
        assert mine[0] == theirs[0] and mine[1] == pytest.approx(theirs[1], abs=1e-5)
    for mine, theirs in zip(shared["dev_history"], rows["dev_history"], strict=True):
        assert mine["dev_loss"] == pytest.approx(theirs["dev_loss"], abs=1e-5)
    assert shared["knots"][0]["step"] == rows["knots"][0]["step"]
    assert shared["test_score"] == rows["test_score"]
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("shared", "rows"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


class DtypeProbe(TrainerCallback):
    """Records, after every step, the dtypes and devices the bf16 defaults promise."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _, layer, adapter = next(iter(lora_layers(model)))
        master = layer_chain(layer).master_weight
        self.seen.append(
            {
                "base": layer.get_base_layer().weight.dtype,
                "lora": {layer.lora_A[adapter].weight.dtype, layer.lora_B[adapter].weight.dtype},
                "master": None if master is None else (master.dtype, master.device.type),
            }
        )


def test_bf16_defaults_keep_lora_fp32_and_knots_exact_through_cpu_masters(
    sst2_model_dir, shared_data, tmp_path
):
    out = tmp_path / "bf16"
    args = ["--model", str(sst2_model_dir), "--task", "sst2", "--data", str(shared_data / "sst2")]
    args += ["--output_dir", str(out), *SMALL, "--method", "cola", "--chain.length", "2", "--lr", "1e-2"]
    config = parse_config(TrainConfig, [*args, "--precision", "bf16"], prog="test")
    probe = DtypeProbe()
    metrics = train(config, callbacks=[probe])
    assert metrics["speed"] == {
        "precision": "bf16",
        "base_dtype": "bf16",
        "optim": perf.speed_defaults("cpu").optim,
        "compiled": False,
        "compile": "auto → off",
        "batching": "shared_prompt",
        "group_by_length": True,
    }
    knot = metrics["knots"][0]["step"]
    for step, seen in enumerate(probe.seen, start=1):
        assert seen["base"] == torch.bfloat16 and seen["lora"] == {torch.float32}
        assert seen["master"] == (None if step < knot else (torch.float32, "cpu"))

    # final/ is written in the base's own dtype (fp32 here) from the fp32 masters, and scores exactly what the
    # run reported (the test score is computed on what is written)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.dtype == torch.float32 and metrics["test_precision"] == "fp32"
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    task = tasks.get_task("sst2")
    test = tasks.load_task_data(task, data=shared_data / "sst2").sample(0, num_train=0, num_dev=0, num_eval=8)
    assert tasks.evaluate(model, tokenizer, task, test.test, batch_size=4)["score"] == metrics["test_score"]

    # Knots did not accumulate bf16 rounding, and final/ holds none at all: every merged weight is the fp32
    # W0 + Σ links (the adapter holds every link), computed from the original fp32 base.
    base = load_file(sst2_model_dir / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    scale = json.loads((out / "adapter" / "adapter_config.json").read_text())
    final = load_file(out / "final" / "model.safetensors")
    checked = 0
    for key, weight in final.items():
        if not key.endswith(("q_proj.weight", "v_proj.weight")):
            continue
        stem = key.removesuffix(".weight")
        a = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_A.weight"))
        b = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_B.weight"))
        scaling = scale["lora_alpha"] / scale["r"]
        exact = base[key] + scaling * (b.float() @ a.float())
        torch.testing.assert_close(weight, exact, rtol=1e-6, atol=1e-7, msg=key)
        checked += 1
    assert checked == 4  # q and v of both layers


def test_length_grouped_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [int(x) for x in torch.randint(5, 200, (97,), generator=torch.Generator().manual_seed(1))]
    sampler = EpochSeededLengthGroupedSampler(4, lengths, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(97)) and list(sampler) == first  # a permutation, repeatable
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(97)) and second != first
    again = EpochSeededLengthGroupedSampler(4, lengths, seed=3)
    again.set_epoch(1)
    assert list(again) == second  # a fresh sampler (a resumed run) replays the epoch exactly

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(97, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(first) < padding(shuffled) / 2


def test_compiled_training_survives_the_knot_without_recompiling(
    sst2_model_dir, shared_data, tmp_path, monkeypatch
):
    """``--compile on``: a knot re-initialises the links in place, so a COLA run compiles exactly the graphs of
    the LoRA run with the same data (a recompile at the knot would add one) and trains like the eager run.
    Dynamo's ``eager`` backend traces and guards like inductor without generating code (seconds, not minutes)."""
    import torch._dynamo

    make_args = train_module.training_arguments

    def traced_only(*args, **kwargs):
        training_args = make_args(*args, **kwargs)
        training_args.torch_compile_backend = "eager"
        return training_args

    monkeypatch.setattr(train_module, "training_arguments", traced_only)
    common = ["--precision", "fp32", "--lr", "1e-2"]
    graphs, metrics = {}, {}
    for name, method in [
        ("lora", ["--method", "lora"]),
        ("cola", ["--method", "cola", "--chain.length", "2"]),
    ]:
        torch._dynamo.reset()
        before = perf.compiled_graph_count()
        metrics[name] = run(sst2_model_dir, shared_data, tmp_path / name, *method, *common, "--compile", "on")
        graphs[name] = perf.compiled_graph_count() - before
        assert metrics[name]["speed"]["compiled"]
    assert len(metrics["cola"]["knots"]) == 1
    assert graphs["lora"] > 0 and graphs["cola"] == graphs["lora"]
    torch._dynamo.reset()
    cola = ["--method", "cola", "--chain.length", "2"]
    eager = run(sst2_model_dir, shared_data, tmp_path / "eager", *cola, *common, "--compile", "off")
    assert not eager["speed"]["compiled"]
    for mine, theirs in zip(metrics["cola"]["train_loss"], eager["train_loss"], strict=True):
        assert mine[1] == pytest.approx(theirs[1], abs=1e-5)
