"""COLA on two processes (CPU, gloo): DDP and FSDP2 runs equal a one-process run with the same global batch.

One ``torchrun --nproc_per_node 2`` launch runs this file as its worker (``__main__`` below): every scenario
writes what it saw under an output folder, and the tests compare it with one-process references computed here.
Data order is exact by construction: step t trains on rows ``[t·G, (t+1)·G)`` of a fixed tensor, and process
p of P takes the p-th slice of G/P rows of it; DDP/FSDP average the gradients of the per-process mean losses,
which (equal token counts per row) is the gradient of the mean loss over the G rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from chainlora import ChainOfLoRACallback, ChainSchedule, tie_knot
from chainlora.callback import knot_generator
from chainlora.distributed import cpu_fp32_copy, world_size
from chainlora.errors import ConfigError
from chainlora.links import chain_length, layer_chain, lora_layers
from chainlora.state import CHAIN_STATE_FILE, load_chain_state
from chainlora.testing import tiny_causal_lm

VOCAB, LENGTH, GLOBAL_BATCH, STEPS, KNOTS, SEED, LR = 320, 10, 4, 6, (2, 4), 7, 1e-2
TORCHRUN = Path(sys.executable).parent / "torchrun"


# ------------------------------------------------------------------------------- shared by both sides


def lora_model(rank: int = 4) -> nn.Module:
    """The same tiny Llama + LoRA(q, v) on every process (seeded: FSDP2, unlike DDP, broadcasts nothing)."""
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    config = LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config)


def global_batch(step: int) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (STEPS * GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    return ids[(step - 1) * GLOBAL_BATCH : step * GLOBAL_BATCH]


def train_manual(model: nn.Module, forward: nn.Module, process: int = 0, processes: int = 1) -> None:
    """AdamW on the links; a COLA knot after each of KNOTS (same generator on every process)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    per_process = GLOBAL_BATCH // processes
    for step in range(1, STEPS + 1):
        ids = global_batch(step)[process * per_process : (process + 1) * per_process]
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in KNOTS:
            tie_knot(model, optimizer, generator=knot_generator(SEED, chain_length(model) + 1))
            assert not optimizer.state, "a knot must leave no optimizer state"


def chain_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole (gathered) base weight, A and B of every LoRA layer, and the tied links, fp32 on CPU."""
    weights = {}
    for name, layer, adapter in lora_layers(model):
        weights[f"{name}.base"] = cpu_fp32_copy(layer.get_base_layer().weight)
        weights[f"{name}.A"] = cpu_fp32_copy(layer.lora_A[adapter].weight)
        weights[f"{name}.B"] = cpu_fp32_copy(layer.lora_B[adapter].weight)
        for i, link in enumerate(layer_chain(layer).links):
            weights[f"{name}.link{i}.A"], weights[f"{name}.link{i}.B"] = link.lora_A, link.lora_B
    return weights


class Rows(torch.utils.data.Dataset):
    """The rows of all global batches in order (the Trainer is run with a sequential sampler)."""

    def __init__(self) -> None:
        self.ids = torch.cat([global_batch(step) for step in range(1, STEPS + 1)])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(output_dir: Path, per_device_batch: int, schedule: ChainSchedule, rank: int = 4):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=per_device_batch,
        learning_rate=LR, lr_scheduler_type="linear", save_strategy="steps", save_steps=3, logging_steps=1,
        report_to=[], seed=SEED, data_seed=SEED, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callback = ChainOfLoRACallback(schedule)
    trainer = SequentialTrainer(model=lora_model(rank), args=args, train_dataset=Rows(), callbacks=[callback])
    return trainer, callback


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def save_tiny_base(folder: Path) -> Path:
    """The tiny Llama of ``lora_model`` saved, so that it can be loaded quantized (bitsandbytes quantizes on load)."""
    torch.manual_seed(0)
    tiny_causal_lm("llama", vocab_size=VOCAB).save_pretrained(folder)
    return folder


def qlora_model(folder: Path, scheme: str, rank: int = 4) -> nn.Module:
    """The tiny Llama quantized by bitsandbytes (fp32 compute) + LoRA(q, v), the residuals attached."""
    from transformers import AutoModelForCausalLM

    from chainlora import quantized

    config = quantized.bnb_config(scheme, torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    model.train()
    quantized.attach_residuals(model)
    return model


def qlora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's residual, A and B (whole, fp32, CPU)."""
    from chainlora.quantized import residual_of

    weights = {}
    for name, layer, adapter in lora_layers(model):
        residual = residual_of(layer)
        weights[f"{name}.U"], weights[f"{name}.V"] = residual.residual_U.float(), residual.residual_V.float()
        weights[f"{name}.A"] = cpu_fp32_copy(layer.lora_A[adapter].weight)
        weights[f"{name}.B"] = cpu_fp32_copy(layer.lora_B[adapter].weight)
    return weights


# --------------------------------------------------------------------------- the worker (2 processes)


def _ddp_manual(out: Path, process: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = lora_model()
    train_manual(model, DistributedDataParallel(model), process, world_size())
    torch.save(chain_weights(model), out / f"ddp_manual.{process}.pt")


def _fsdp2_manual(out: Path, process: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from chainlora.state import load_chain_state, save_chain_state

    def sharded() -> nn.Module:
        model = lora_model()
        mesh = init_device_mesh("cpu", (world_size(),))
        for block in model.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = sharded()
    train_manual(model, model, process, world_size())
    weights = chain_weights(model)  # gathers: a collective
    save_chain_state(model, out / "fsdp_ckpt", [], main=process == 0)
    torch.distributed.barrier()
    restored = sharded()
    load_chain_state(restored, out / "fsdp_ckpt")  # every process reads the file and keeps its own slices
    restored_weights = chain_weights(restored)
    if process == 0:
        torch.save(weights, out / "fsdp_manual.pt")
        torch.save(restored_weights, out / "fsdp_restored.pt")


def _fsdp2_merge_math(out: Path, process: int) -> None:
    """A knot on uneven shards: nn.Linear (7×5, LoRA bias) and a transposed Conv1D (fan_in_fan_out), r = 3."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.conv = nn.Linear(5, 7), Conv1D(7, 5)  # Conv1D(nf=out, nx=in): weight (5, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.conv(x)

    def build() -> nn.Module:
        torch.manual_seed(3)
        config = LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "conv"], lora_bias=True)
        model = get_peft_model(Tiny(), config)
        with torch.no_grad():
            for _, layer, adapter in lora_layers(model):  # a non-zero B, so the merge cannot pass trivially
                for p in layer.lora_B[adapter].parameters():
                    p.normal_(0, 0.5)
        return model

    reference = build()
    tie_knot(reference, generator=knot_generator(SEED, 2))
    model = build()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size(),)))
    model.unshard()  # as inside forward/backward: the registered parameters are whole, not the shards
    with pytest.raises(ConfigError, match="not sharded DTensors"):
        tie_knot(model)
    model.reshard()
    with pytest.raises(ConfigError, match="not supported on FSDP2-sharded"):  # refused before any change
        tie_knot(model, optimizer_reset=0.5)
    record = tie_knot(model, generator=knot_generator(SEED, 2))
    expected, got = chain_weights(reference), chain_weights(model)
    for name, layer, _ in lora_layers(model):
        expected[f"{name}.bias"] = reference.get_submodule(name).get_base_layer().bias.detach().clone()
        got[f"{name}.bias"] = cpu_fp32_copy(layer.get_base_layer().bias)
    if process == 0:
        torch.save({"expected": expected, "got": got, "delta_norm": record.delta_norm}, out / "fsdp_math.pt")


def _trainer_ddp(out: Path, process: int) -> None:
    """The callback under DDP: the run, then a resume from checkpoint-3 (after knot 1) in the same processes."""
    run = out / "trainer"
    trainer, callback = make_trainer(run, GLOBAL_BATCH // world_size(), ChainSchedule(KNOTS, STEPS))
    trainer.train()
    result = {"knots": [k.step for k in callback.knots], "weights": chain_weights(trainer.model)}
    resumed, resumed_callback = make_trainer(run, GLOBAL_BATCH // world_size(), ChainSchedule(KNOTS, STEPS))
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    result |= {
        "resumed_knots": [k.step for k in resumed_callback.knots],
        "resumed": chain_weights(resumed.model),
    }
    torch.save(result, out / f"trainer.{process}.pt")


def _refusals(out: Path, process: int) -> None:
    """A rank step-down with 2 processes fails before the first step (Trainer) and in ``tie_knot``."""
    messages = {}
    trainer, _ = make_trainer(out / "refused", 2, ChainSchedule((2,), 4, ranks=(4, 2)))
    trainer.args.max_steps = 4
    try:
        trainer.train()
    except ConfigError as error:
        messages["trainer"] = str(error)
        messages["steps_done"] = trainer.state.global_step
    model = lora_model()
    before = chain_weights(model)
    try:
        tie_knot(model, rank=2)
    except ConfigError as error:
        messages["tie_knot"] = str(error)
    after = chain_weights(model)
    messages["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    fsdp1 = torch.distributed.fsdp.FullyShardedDataParallel(
        lora_model(), device_id=torch.device("cpu"), use_orig_params=True
    )
    try:
        tie_knot(fsdp1)
    except ConfigError as error:
        messages["fsdp1"] = str(error)
    if process == 0:
        (out / "refusals.json").write_text(json.dumps(messages))


def _sync(out: Path, process: int) -> None:
    """``sync_replicas`` detects replicas that differ and re-broadcasts them from rank 0."""
    from chainlora.distributed import sync_replicas

    model = lora_model()
    agreed = sync_replicas(model)
    if process == 1:
        with torch.no_grad():
            next(iter(lora_layers(model)))[1].get_base_layer().weight.add_(1e-3)
    repaired = sync_replicas(model)
    again = sync_replicas(model)
    torch.save(
        {"flags": (agreed, repaired, again), "weights": chain_weights(model)}, out / f"sync.{process}.pt"
    )


def _qlora(out: Path, process: int) -> None:
    """A bitsandbytes base: nf4 under DDP and FSDP2 (knots into the replicated residual); int8 under FSDP2 refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from chainlora.distributed import check_training_setup

    folder = out / "qlora_base"
    if process == 0:
        save_tiny_base(folder)
    torch.distributed.barrier()
    model = qlora_model(folder, "nf4")
    train_manual(model, DistributedDataParallel(model), process, world_size())
    torch.save(qlora_weights(model), out / f"qlora_ddp.{process}.pt")

    def sharded(scheme: str) -> nn.Module:
        model = qlora_model(folder, scheme)
        mesh = init_device_mesh("cpu", (world_size(),))
        for block in model.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = sharded("nf4")
    train_manual(model, model, process, world_size())
    weights = qlora_weights(model)  # gathers: a collective
    messages = {}
    try:
        check_training_setup(sharded("int8"), ChainSchedule(KNOTS, STEPS))
    except ConfigError as error:
        messages["fsdp2_int8"] = str(error)
    try:
        tie_knot(model, quantized_merge="requantize")
    except ConfigError as error:
        messages["fsdp2_requantize"] = str(error)
    if process == 0:
        torch.save(weights, out / "qlora_fsdp2.pt")
        (out / "qlora_refusals.json").write_text(json.dumps(messages))


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    process = torch.distributed.get_rank()
    try:
        scenarios = [_ddp_manual, _fsdp2_manual, _fsdp2_merge_math, _trainer_ddp, _refusals, _sync]
        for scenario in scenarios + ([_qlora] if HAS_BNB else []):
            scenario(out, process)
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


# --------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Run every scenario once on 2 processes (torchrun, gloo); returns the folder they wrote to."""
    out = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one_process_manual() -> dict[str, torch.Tensor]:
    model = lora_model()
    train_manual(model, model)
    return chain_weights(model)


def assert_weights_close(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=0, msg=key)


def test_ddp_knots_keep_replicas_identical_and_equal_one_process(two_processes, one_process_manual):
    rank0 = torch.load(two_processes / "ddp_manual.0.pt")
    rank1 = torch.load(two_processes / "ddp_manual.1.pt")
    assert_weights_close(rank1, rank0, atol=0.0)  # replicas: bit-identical
    assert any(k.endswith("link1.A") for k in rank0)  # two knots were tied
    assert_weights_close(rank0, one_process_manual)


def test_fsdp2_knots_merge_into_shards_and_equal_one_process(two_processes, one_process_manual):
    assert_weights_close(torch.load(two_processes / "fsdp_manual.pt"), one_process_manual)


def test_fsdp2_merge_on_uneven_and_transposed_shards(two_processes):
    result = torch.load(two_processes / "fsdp_math.pt")
    assert_weights_close(result["got"], result["expected"], atol=1e-6)
    assert result["delta_norm"] > 0


def test_fsdp2_chain_checkpoint_round_trip_and_one_process_format(two_processes, one_process_manual):
    trained = torch.load(two_processes / "fsdp_manual.pt")
    assert_weights_close(torch.load(two_processes / "fsdp_restored.pt"), trained, atol=0.0)
    # the file written from shards is the one-process format: a plain model loads it
    model = lora_model()
    load_chain_state(model, two_processes / "fsdp_ckpt")
    assert_weights_close(chain_weights(model), one_process_manual)


def test_trainer_ddp_equals_one_process_and_resumes_exactly(two_processes, tmp_path):
    rank0 = torch.load(two_processes / "trainer.0.pt")
    rank1 = torch.load(two_processes / "trainer.1.pt")
    assert rank0["knots"] == rank1["knots"] == list(KNOTS)
    assert rank0["resumed_knots"] == list(KNOTS)
    assert (two_processes / "trainer" / "checkpoint-3" / CHAIN_STATE_FILE).is_file()
    assert_weights_close(rank1["weights"], rank0["weights"], atol=0.0)
    assert_weights_close(rank1["resumed"], rank0["weights"], atol=1e-6)  # every process restored the chain

    trainer, callback = make_trainer(tmp_path, GLOBAL_BATCH, ChainSchedule(KNOTS, STEPS))
    trainer.train()
    assert [k.step for k in callback.knots] == list(KNOTS)
    assert_weights_close(rank0["weights"], chain_weights(trainer.model))


def test_rank_change_with_two_processes_fails_before_training(two_processes):
    messages = json.loads((two_processes / "refusals.json").read_text())
    assert "not supported with 2 processes" in messages["trainer"]
    assert "link 2 has rank 2" in messages["trainer"]
    assert messages["steps_done"] == 0
    assert "[4] → 2" in messages["tie_knot"]
    assert messages["unchanged"]
    assert messages["fsdp1"].startswith("FSDP1 (FullyShardedDataParallel, flat parameters) is not supported")


needs_bnb = pytest.mark.skipif(
    not HAS_BNB, reason="bitsandbytes is not installed (the dev extra installs it)"
)


@pytest.fixture(scope="module")
def qlora_one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    model = qlora_model(save_tiny_base(tmp_path_factory.mktemp("qlora_base")), "nf4")
    train_manual(model, model)
    return qlora_weights(model)


@needs_bnb
def test_qlora_ddp_and_fsdp2_equal_one_process(two_processes, qlora_one_process):
    """nf4 base: DDP replicas hold bit-identical residuals; DDP and FSDP2 (shards of packed 4-bit data, the
    residual replicated) both equal the one-process chain."""
    rank0 = torch.load(two_processes / "qlora_ddp.0.pt")
    rank1 = torch.load(two_processes / "qlora_ddp.1.pt")
    assert_weights_close(rank1, rank0, atol=0.0)
    assert {v.shape[0] for k, v in rank0.items() if k.endswith(".V")} == {
        4 * len(KNOTS)
    }  # two knots folded in
    assert_weights_close(rank0, qlora_one_process)
    assert_weights_close(torch.load(two_processes / "qlora_fsdp2.pt"), qlora_one_process)


@needs_bnb
def test_qlora_fsdp2_refuses_int8_and_requantize_in_one_line(two_processes):
    messages = json.loads((two_processes / "qlora_refusals.json").read_text())
    assert "int8 (bitsandbytes Linear8bitLt) base cannot be sharded by FSDP2" in messages["fsdp2_int8"]
    assert "quantized_merge 'requantize' is not supported with FSDP2" in messages["fsdp2_requantize"]
    assert all("\n" not in m for m in messages.values())


def test_deepspeed_is_refused():
    from types import SimpleNamespace

    from chainlora.distributed import check_training_setup

    model = lora_model()
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        check_training_setup(model, ChainSchedule(KNOTS, STEPS), SimpleNamespace(deepspeed="ds.json"))
    next(p for p in model.parameters() if p.requires_grad).ds_id = 0  # a ZeRO-3 partitioned parameter
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        tie_knot(model)


def test_sync_replicas_repairs_diverged_processes(two_processes):
    rank0 = torch.load(two_processes / "sync.0.pt")
    rank1 = torch.load(two_processes / "sync.1.pt")
    assert rank0["flags"] == rank1["flags"] == (True, False, True)
    assert_weights_close(rank1["weights"], rank0["weights"], atol=0.0)


def test_one_process_needs_no_collective():
    assert world_size() == 1
    model = lora_model()
    tie_knot(model, rank=2)  # a rank change is fine on one process
    assert {layer.r[a] for _, layer, a in lora_layers(model)} == {2}


def test_rank_schedule_check_needs_one_rank_per_chain_with_several_processes():
    from chainlora.distributed import check_rank_schedule
    from chainlora.schedules import AutoChainSchedule

    step_down = ChainSchedule((2, 4), STEPS, ranks=(8, 4, 4))
    check_rank_schedule(step_down, 8, processes=1)  # one process: anything goes
    check_rank_schedule(ChainSchedule((2, 4), STEPS, ranks=(8, 8, 8)), 8, processes=2)
    check_rank_schedule(step_down, 4, processes=2, first_link=3)  # resumed after the last change
    with pytest.raises(
        ConfigError, match=r"link 2 has rank 4, the LoRA layers \[8\]\) is not supported with 2"
    ):
        check_rank_schedule(step_down, 8, processes=2)
    halve = AutoChainSchedule(
        STEPS, max_links=3, min_link_steps=1, patience=1, threshold=0.01, ranks="halve", rank=8
    )
    with pytest.raises(ConfigError, match="link 2 has rank 4"):
        check_rank_schedule(halve, 8, processes=2)
    fixed = AutoChainSchedule(STEPS, max_links=3, min_link_steps=1, patience=1, threshold=0.01)
    check_rank_schedule(fixed, 8, processes=2)


# `torchrun -m chainlora train` on two processes, killed and resumed: tests/test_ddp_exact.py
