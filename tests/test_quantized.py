"""COLA on a bitsandbytes-quantized base (QLoRA): exact knots, the fp32 reference chain, export, requantize, resume.

CPU only: a tiny Llama (and OPT, for biases) saved once, then loaded with ``BitsAndBytesConfig`` (nf4, fp4, nf4
with double quantization, int8) and ``device_map="cpu"``; 4-bit layers compute in fp32
(``bnb_4bit_compute_dtype=torch.float32``), int8 in training mode (the CPU path multiplies by the dequantized
weight). Every equality is checked against a quantity that would differ if the knot lost or doubled a link (links
are made non-zero first; ``test_checks_can_fail`` shows the tolerances catch a broken knot).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chainlora import chain, quantized
from chainlora.adapter import export_adapter, export_run_adapter, read_chain_state
from chainlora.chain import KnotError, link_delta, tie_knot
from chainlora.errors import ChainLoRAError, ConfigError
from chainlora.links import layer_chain, lora_layers
from chainlora.state import load_chain_state, save_chain_state
from chainlora.testing import tiny_causal_lm

pytest.importorskip("bitsandbytes")  # installed by the dev extra: CI runs these tests

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
TOL = 1e-5
SCHEMES = ["nf4", "fp4", "int8"]
VOCAB = 320


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for arch in ("llama", "opt"):
        path = tmp_path_factory.mktemp(arch)
        tiny_causal_lm(arch, vocab_size=VOCAB, hidden=32).save_pretrained(path)
        dirs[arch] = path
    return dirs


def load_quantized(path: Path, scheme: str) -> torch.nn.Module:
    """A freshly quantized tiny model (quantization is deterministic: the same weights every time)."""
    config = quantized.bnb_config(
        scheme.removesuffix("-dq"), torch.float32, double_quant=scheme.endswith("-dq")
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    quantized.disable_cpu_bf16_repack(model)
    return model


def qlora(path: Path, scheme: str, r: int = 8, arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_bias=arch == "opt",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(load_quantized(path, scheme), config)
    model.train()  # int8 on the CPU: the training path is x·deq(W)ᵀ; dropout is 0
    quantized.attach_residuals(model)
    return model


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Non-zero B (and LoRA bias) everywhere, so a knot has something to lose."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer, adapter in lora_layers(model):
            for p in layer.lora_B[adapter].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def batch(seed: int = 0, n: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def gen(link: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + link)


def one_knot_into_a_trained_link(
    path: Path, scheme: str
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A quantized chain with a residual (one trained link tied) and a second trained link; a batch and the
    chain's logits on it."""
    model = qlora(path, scheme)
    perturb(model, seed=1)
    tie_knot(model, generator=gen(1))
    perturb(model, seed=2)
    ids = batch()
    return model, ids, logits(model, ids)


def residual(layer) -> quantized.ResidualLinear:
    wrapper = quantized.residual_of(layer)
    assert wrapper is not None
    return wrapper


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for name, module in model.named_modules():
        if quantized.quantization(module) is not None and not hasattr(module, "lora_A"):
            found[name] = quantized.dequantize_weight(module)
    return found


def train_chain(model, knot_fn, steps: int, knots: dict[int, int], *, start: int = 1, optimizer=None):
    """AdamW on fixed batches; after step s in ``knots`` a knot to rank knots[s]. Returns (losses, optimizer)."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(start, steps + 1):
        ids = batch(seed=step % 3)  # three fixed batches in turn
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step in knots:
            link = sum(1 for k in knots if k <= step)
            knot_fn(model, optimizer, rank=knots[step], generator=gen(link + 1))
    return losses, optimizer


# ------------------------------------------------------------------------------------------------- knots


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_knot_leaves_outputs_unchanged(model_dirs, scheme, arch):
    model = qlora(model_dirs[arch], scheme, arch=arch)
    ids = batch()
    before_q = quantized_weights(model)
    for link, rank in enumerate((4, 4), start=1):
        perturb(model, seed=link)
        before = logits(model, ids)
        record = tie_knot(model, rank=rank, generator=gen(link))
        assert max_diff(before, logits(model, ids)) <= TOL
        for _, layer, adapter in lora_layers(model):
            assert layer.lora_B[adapter].weight.count_nonzero() == 0
            assert layer.r[adapter] == rank
        assert (record.link, record.quantized_merge, record.residual_rank) == (
            link,
            "residual",
            8 + 4 * (link - 1),
        )
        assert record.compression_errors is None and record.requantize_errors is None
    after_q = quantized_weights(model)
    assert all(torch.equal(before_q[k], after_q[k]) for k in before_q), "a residual knot must not touch W_q"


def test_checks_can_fail(model_dirs, monkeypatch):
    """A knot that drops the link (or keeps B) is caught by the same tolerance."""
    model = qlora(model_dirs["llama"], "nf4")
    ids = batch()
    perturb(model)
    before = logits(model, ids)
    broken = copy.deepcopy(model)
    monkeypatch.setattr(quantized, "_fold_into_residual", lambda *a, **k: 0.0)  # forget to fold the link in
    tie_knot(broken, generator=gen(1))
    assert max_diff(before, logits(broken, ids)) > 100 * TOL
    monkeypatch.undo()
    doubled = copy.deepcopy(model)  # fold the link but keep B: the link counts twice
    monkeypatch.setattr(chain, "extend_link", lambda *a, **k: {})
    tie_knot(doubled, generator=gen(1))
    assert max_diff(before, logits(doubled, ids)) > 100 * TOL


@pytest.mark.parametrize("scheme", SCHEMES)
def test_three_knots_equal_fp32_reference_on_dequantized_base(model_dirs, scheme):
    """12 AdamW steps, knots after 3, 6, 9, links of rank 8, 4, 4 (then 4): the same run with ``tie_knot`` on an
    fp32 model holding deq(W_q) gives the same losses and outputs."""
    path = model_dirs["llama"]
    model = qlora(path, scheme, r=8)
    reference, _ = quantized.merge_dequantized(load_quantized(path, scheme), torch.float32)  # W = deq(W_q)
    reference = get_peft_model(
        reference, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    reference.train()
    with torch.no_grad():  # the same first link
        ref_layers = {n: m for n, m in reference.named_modules() if hasattr(m, "lora_A")}
        for name, layer, adapter in lora_layers(model):
            ref_layers[name].lora_A[adapter].weight.copy_(layer.lora_A[adapter].weight)
    ids = batch(seed=99)
    assert max_diff(logits(model, ids), logits(reference, ids)) <= TOL
    knots = {3: 4, 6: 4, 9: 4}
    losses_q, _ = train_chain(model, tie_knot, 12, knots)
    losses_r, _ = train_chain(reference, tie_knot, 12, knots)
    assert max(abs(a - b) for a, b in zip(losses_q, losses_r, strict=True)) <= TOL
    assert max_diff(logits(model, ids), logits(reference, ids)) <= TOL
    assert {residual(layer).rank for _, layer, _ in lora_layers(model)} == {8 + 4 + 4}
    # the residual is the only copy of the tied links (the fp32 reference keeps them for its export)
    assert all(
        not layer_chain(layer).links and layer_chain(layer).knots == 3 for _, layer, _ in lora_layers(model)
    )
    assert all(len(layer_chain(layer).links) == 3 for _, layer, _ in lora_layers(reference))
    assert losses_q[11] < losses_q[2]  # steps 12 and 3 see the same batch: it learns
    # not a vacuous equality: the chain moved the outputs far beyond the tolerance
    plain = load_quantized(path, scheme).train()
    assert max_diff(logits(model, ids), logits(plain, ids)) > 1000 * TOL


def test_rank_cap_recompresses_and_reports_the_dropped_energy(model_dirs):
    model = qlora(model_dirs["llama"], "nf4", r=8)
    for link in (1, 2):
        perturb(model, seed=link)
        tie_knot(model, generator=gen(link))
    full = {n: residual(lay).delta_weight().double() for n, lay, _ in lora_layers(model)}
    perturb(model, seed=3)
    current = {n: quantized.link_factors(lay, a) for n, lay, a in lora_layers(model)}
    record = tie_knot(model, generator=gen(3), max_residual_rank=12)
    assert record.residual_rank == 12
    for name, layer, _ in lora_layers(model):
        U, V, _ = current[name]
        dense = full[name] + (U @ V).double()  # rank 24 before the cap
        sigma = torch.linalg.svdvals(dense)
        expected = math.sqrt(float(sigma[12:].square().sum()) / float(sigma.square().sum()))
        got = record.compression_errors[name]
        assert got > 0 and abs(got - expected) <= 1e-6 * max(1.0, expected)
        kept = residual(layer).delta_weight().double()
        assert residual(layer).rank == 12
        assert abs(float((kept - dense).norm() / dense.norm()) - expected) <= 1e-5  # the best rank-12 fit


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "nf4-dq", "int8"])
def test_requantize_reports_the_error_it_introduced(model_dirs, scheme):
    model = qlora(model_dirs["llama"], scheme)
    perturb(model, scale=0.05)
    layers = list(lora_layers(model))
    before = {n: quantized.dequantize_weight(lay.get_base_layer()) for n, lay, _ in layers}
    deltas = {n: link_delta(lay, a)[0] for n, lay, a in layers}
    ids = batch()
    exact = logits(model, ids)
    record = tie_knot(model, generator=gen(1), quantized_merge="requantize")
    assert record.quantized_merge == "requantize" and record.residual_rank == 0
    for name, layer, _ in layers:
        target = before[name] + deltas[name]
        direct = float((quantized.dequantize_weight(layer.get_base_layer()) - target).norm())
        assert direct > 0
        assert abs(record.requantize_errors[name] - direct / float(deltas[name].norm())) <= 1e-6
        assert residual(layer).rank == 0  # nothing went to the residual
        assert layer_chain(layer).requantized
    assert max_diff(exact, logits(model, ids)) > TOL  # lossy: the outputs moved (residual mode: they do not)
    with pytest.raises(ConfigError, match="keep one mode per chain"):
        tie_knot(model, generator=gen(2))  # residual after requantize: the export could not tell them apart


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_exported_adapter_loads_with_plain_peft(model_dirs, tmp_path, scheme, arch):
    path = model_dirs[arch]
    model = qlora(path, scheme, r=8, arch=arch)
    for link, rank in enumerate((4, 4), start=1):
        perturb(model, seed=link)
        tie_knot(model, rank=rank, generator=gen(link))
    perturb(model, seed=9)
    ids = batch()
    trained = logits(model, ids)
    report = export_adapter(model, tmp_path / "adapter")
    assert set(report.ranks.values()) == {8 + 4 + 4}
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in weights) and not any("residual" in k for k in weights)

    on_quantized = PeftModel.from_pretrained(load_quantized(path, scheme), tmp_path / "adapter")
    on_quantized.train()
    assert max_diff(trained, logits(on_quantized, ids)) <= TOL

    dequantized, _ = quantized.merge_dequantized(load_quantized(path, scheme), torch.float32)
    on_dequantized = PeftModel.from_pretrained(dequantized, tmp_path / "adapter")
    assert max_diff(trained, logits(on_dequantized, ids)) <= TOL

    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # W0, never quantized
    quant_gap = max_diff(logits(original, ids), logits(load_quantized(path, scheme).train(), ids))
    on_original = PeftModel.from_pretrained(original, tmp_path / "adapter")
    gap = max_diff(trained, logits(on_original, ids))
    assert 0 < gap < 10 * quant_gap + TOL  # the same chain on W0: differs by the quantization error only


def test_export_from_a_checkpoint_equals_export_from_the_model(model_dirs, tmp_path):
    """``chainlora export`` reads the residual from a checkpoint's chain state: the same adapter as from the model."""
    model = qlora(model_dirs["llama"], "nf4")
    perturb(model, seed=1)
    tie_knot(model, rank=4, generator=gen(1))
    perturb(model, seed=2)
    checkpoint = tmp_path / "checkpoint-3"
    save_chain_state(model, checkpoint)
    # the link scaling, as a checkpoint holds it
    model.peft_config["default"].save_pretrained(str(checkpoint))
    assert [
        link.lora_A.shape[0] for link in read_chain_state(checkpoint)[0]["model.layers.0.self_attn.q_proj"]
    ] == [8, 4]
    from_model = load_file(str(export_adapter(model, tmp_path / "a").path / "adapter_model.safetensors"))
    from_file = load_file(
        str(export_run_adapter(checkpoint, out=tmp_path / "b")["path"] + "/adapter_model.safetensors")
    )
    assert from_model.keys() == from_file.keys()
    assert all(torch.equal(from_model[k], from_file[k]) for k in from_model)


def test_peft_save_pretrained_and_unload_keep_the_chain(model_dirs, tmp_path):
    model, ids, trained = one_knot_into_a_trained_link(model_dirs["llama"], "nf4")
    model.save_pretrained(tmp_path / "peft")
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in keys) and not any("residual" in k for k in keys)
    assert any("residual_U" in k for k in model.state_dict())  # buffers: in the full state dict

    tied_only = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer, adapter in lora_layers(tied_only):
            layer.lora_B[adapter].weight.zero_()
    unloaded = copy.deepcopy(model).unload()  # PEFT's unload keeps the residual, drops the current link
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, quantized.ResidualLinear)
    assert max_diff(logits(tied_only, ids), logits(unloaded, ids)) <= TOL
    merged = copy.deepcopy(model).merge_and_unload()  # … and merge folds the current link in, exactly
    assert max_diff(trained, logits(merged, ids)) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_dequantized_model(model_dirs, tmp_path, dtype):
    model, ids, trained = one_knot_into_a_trained_link(model_dirs["llama"], "nf4")
    exact = {
        n: quantized.dequantize_weight(lay.get_base_layer())
        + residual(lay).delta_weight()
        + link_delta(lay, a)[0]
        for n, lay, a in lora_layers(model)
    }
    merged, report = quantized.merge_dequantized(model, dtype)
    assert report.layers == 4 and report.dequantized == 10
    modules = dict(merged.named_modules())
    for name, weight in exact.items():
        path = name.removeprefix("base_model.model.")  # module paths inside the transformers model
        got = modules[path].weight
        assert got.dtype == dtype
        direct = float((got.float() - weight).norm() / weight.norm())
        assert abs(report.relative_errors[path] - direct) <= 1e-7
    if dtype == torch.float32:
        assert report.max_relative_error == 0.0
        assert max_diff(trained, logits(merged, ids)) <= TOL
    else:
        assert 0 < report.max_relative_error < 1e-2
    merged.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=dtype)
    assert not hasattr(reloaded.config, "quantization_config")
    assert max_diff(logits(merged, ids), logits(reloaded, ids)) == 0.0


def test_merge_chain_dispatches_to_the_dequantized_merge(model_dirs):
    model, ids, trained = one_knot_into_a_trained_link(model_dirs["llama"], "fp4")
    merged = chain.merge_chain(model, dtype=torch.float32)
    assert not any(quantized.quantization(m) for m in merged.modules())
    assert max_diff(trained, logits(merged, ids)) <= TOL


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    ("scheme", "merge"),
    [("nf4", "residual"), ("int8", "residual"), ("nf4-dq", "requantize"), ("int8", "requantize")],
)
def test_resume_mid_chain_equals_uninterrupted(model_dirs, tmp_path, scheme, merge):
    path = model_dirs["llama"]
    knots = {2: 4, 4: 4, 6: 2}

    def knot(model, optimizer, rank, generator):
        return tie_knot(model, optimizer, rank=rank, generator=generator, quantized_merge=merge)

    whole = qlora(path, scheme, r=8)
    losses_whole, _ = train_chain(whole, knot, 8, knots)

    first = qlora(path, scheme, r=8)
    losses_first, optimizer = train_chain(first, knot, 5, knots)  # stop mid link 3 (after 2 knots)
    save_chain_state(first, tmp_path)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    resumed = qlora(path, scheme, r=8, seed=123)  # another first link: the restore must overwrite it
    load_chain_state(resumed, tmp_path)
    ids = batch(seed=99)
    assert max_diff(logits(first, ids), logits(resumed, ids)) == 0.0
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    losses_rest, _ = train_chain(resumed, knot, 8, knots, start=6, optimizer=optimizer)
    assert losses_first + losses_rest == losses_whole
    assert max_diff(logits(whole, ids), logits(resumed, ids)) == 0.0
    fresh = load_quantized(path, scheme).train()  # not vacuous: the chain moved the outputs
    assert max_diff(logits(whole, ids), logits(fresh, ids)) > 1000 * TOL


def auto_trainer(path: Path, output_dir: Path):
    """An HF Trainer with adaptive knots (ranks halved: 8, 4, 2) over a tiny nf4 QLoRA model."""
    from transformers import Trainer, TrainingArguments

    from chainlora import ChainOfLoRACallback
    from chainlora.schedules import AutoChainSchedule
    from chainlora.testing.tiny import TokenDataset

    schedule = AutoChainSchedule(
        12, max_links=3, min_link_steps=2, patience=2, threshold=0.002, ema=0.5, ranks="halve", rank=8
    )
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", save_strategy="steps", save_steps=4, logging_steps=1, report_to=[], seed=7,
        data_seed=7, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    model = qlora(path, "nf4", r=8)
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(VOCAB), callbacks=[ChainOfLoRACallback(schedule)]
    )
    return trainer, schedule


def test_auto_knots_step_down_and_resume_through_the_trainer(model_dirs, tmp_path):
    """Adaptive knots with halving ranks on a quantized base: each knot folds its link into the residual (its rank
    the sum of the tied ranks), the log says why and how large the residual is, and a resume from a checkpoint
    before the auto knots makes the same decisions and ends with the same residuals and outputs."""
    trainer, schedule = auto_trainer(model_dirs["llama"], tmp_path / "run")
    trainer.train()
    assert len(schedule.knots) >= 2 and schedule.knots[0] > 4  # loss-driven knots after checkpoint-4
    logged = [e for e in trainer.state.log_history if "knot" in e]
    ranks = (8, 4, 2)
    assert [e["residual_rank"] for e in logged] == [sum(ranks[:i]) for i in range(1, len(logged) + 1)]
    assert [e["reason"] for e in logged] == [d.reason for d in schedule.decisions]
    layers = list(lora_layers(trainer.model))
    assert {layer.r[a] for _, layer, a in layers} == {ranks[len(logged)]}
    ids = batch(seed=99)
    trainer.model.train()
    expected = logits(trainer.model, ids)

    resumed, resumed_schedule = auto_trainer(model_dirs["llama"], tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed_schedule.decisions == schedule.decisions
    for (_, layer, _), (_, other, _) in zip(layers, lora_layers(resumed.model), strict=True):
        torch.testing.assert_close(residual(other).residual_U, residual(layer).residual_U, atol=0, rtol=0)
    resumed.model.train()
    assert max_diff(expected, logits(resumed.model, ids)) == 0.0


def test_a_state_saved_before_the_first_requantize_knot_restores_the_original_weight(model_dirs, tmp_path):
    """The best dev state may predate the first requantize knot: restoring it puts the original weight back."""
    model = qlora(model_dirs["llama"], "nf4")
    perturb(model, seed=1)
    ids = batch()
    before = logits(model, ids)
    save_chain_state(model, tmp_path)
    tie_knot(model, generator=gen(1), quantized_merge="requantize")
    assert max_diff(before, logits(model, ids)) > TOL
    load_chain_state(model, tmp_path)
    assert max_diff(before, logits(model, ids)) == 0.0
    assert not any(layer_chain(layer).requantized for _, layer, _ in lora_layers(model))


def test_restore_refuses_another_scheme(model_dirs, tmp_path):
    model = qlora(model_dirs["llama"], "nf4")
    perturb(model)
    tie_knot(model, generator=gen(1))
    save_chain_state(model, tmp_path)
    with pytest.raises(ChainLoRAError, match="saved on a nf4 base, this model's is fp4"):
        load_chain_state(qlora(model_dirs["llama"], "fp4"), tmp_path)
    unquantized = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    with pytest.raises(ChainLoRAError, match="saved on a nf4 base, this model's is unquantized"):
        load_chain_state(unquantized, tmp_path)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input(model_dirs, monkeypatch):
    with pytest.raises(ConfigError, match="unknown scheme 'int4'"):
        quantized.bnb_config("int4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed.*pip install"):
        quantized.bnb_config("nf4")
    monkeypatch.undo()
    model = qlora(model_dirs["llama"], "nf4")
    with pytest.raises(ConfigError, match="unknown mode"):
        tie_knot(model, quantized_merge="lossy")
    with pytest.raises(ConfigError, match="larger than layer"):
        tie_knot(model, rank=64)
    with pytest.raises(ConfigError, match="max_residual_rank"):
        tie_knot(model, max_residual_rank=0)


def test_cpu_bf16_repack_is_refused(model_dirs):
    """bitsandbytes ≥ 0.49 repacks a 4-bit weight for bf16 on an eval-mode forward without grad (AVX512-BF16
    CPUs), rounding its block scales for good: disable_cpu_bf16_repack switches this off, and a weight already
    repacked is refused."""
    import bitsandbytes as bnb

    wide = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")  # in ≥ blocksize (64)
    if not getattr(wide, "support_avx512bf16_for_cpu", False):
        pytest.skip("no AVX512-BF16 repacking here (CPU or bitsandbytes version): nothing to refuse")
    wide.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=wide)
    wide = wide.to("cpu")
    exact = quantized.dequantize_weight(wide)
    x = torch.randn(2, 64)
    wide.eval()
    with torch.no_grad():
        packed = wide(x)
    assert wide.weight.quant_state.packing_format_for_cpu
    assert max_diff(packed, x @ exact.T) > 1e-4  # the bf16 kernel: not the fp32 product any more
    with pytest.raises(ChainLoRAError, match="repacked"):
        quantized.disable_cpu_bf16_repack(torch.nn.Sequential(wide))

    model = qlora(model_dirs["llama"], "nf4")  # disable_cpu_bf16_repack ran: eval + no_grad stays exact
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    with torch.no_grad():
        model(input_ids=batch())
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_refused_knot_leaves_the_model_unchanged(model_dirs):
    model = qlora(model_dirs["llama"], "nf4")
    perturb(model)
    ids = batch()
    before = logits(model, ids)
    _, layer, adapter = next(iter(lora_layers(model)))
    kept = float(layer.lora_B[adapter].weight.detach()[0, 0])
    with torch.no_grad():
        layer.lora_B[adapter].weight[0, 0] = float("inf")
    with pytest.raises(KnotError, match="not finite"):
        tie_knot(model, generator=gen(1))
    with torch.no_grad():
        layer.lora_B[adapter].weight[0, 0] = kept
    with pytest.raises(KnotError, match="over 1e-06"):
        tie_knot(model, generator=gen(1), max_relative_delta=1e-6)
    assert all(residual(lay).rank == 0 for _, lay, _ in lora_layers(model))
    assert max_diff(before, logits(model, ids)) == 0.0
    assert tie_knot(model, generator=gen(1), max_relative_delta=10.0).link == 1


# ------------------------------------------------------------------------------- chainlora train --quantize

TRAIN = ["--task", "rte", "--num_train", "16", "--num_dev", "8", "--num_eval", "8", "--batch_size", "4"]
TRAIN += ["--epochs", "2", "--precision", "fp32", "--lr", "1e-2", "--zero_shot", "false"]
COLA = ["--method", "cola", "--chain.length", "2", "--chain.ranks", "[8, 4]", "--save_steps", "3"]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama folder with its tokenizer, and synthetic RTE rows (no ../shared needed: CI has none)."""
    from chainlora.testing import tiny_model_dir

    root = tmp_path_factory.mktemp("qlora_run")
    data = root / "rte"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    words = [
        "the",
        "man",
        "dog",
        "cat",
        "sleeps",
        "runs",
        "is",
        "awake",
        "happy",
        "sad",
        "a",
        "house",
        "red",
        "big",
        "small",
        "old",
    ]

    def row(i: int) -> str:
        pick = torch.randint(len(words), (12,), generator=g).tolist()
        premise, hypothesis = " ".join(words[j] for j in pick[:8]), " ".join(words[j] for j in pick[8:])
        return json.dumps(
            {"premise": premise + ".", "hypothesis": hypothesis + ".", "idx": i, "label": i % 2}
        )

    (data / "train.jsonl").write_text("".join(row(i) + "\n" for i in range(40)))
    (data / "validation.jsonl").write_text("".join(row(i) + "\n" for i in range(16)))
    return tiny_model_dir(root / "tiny", "llama"), data


def train_cli(model_dir: Path, data: Path, out: Path, *args: str) -> int:
    from chainlora.cli import main

    return main(
        ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TRAIN, *args]
    )


def score_adapter(model_dir: Path, data: Path, adapter: Path, scheme: str) -> float:
    """The run's test draw scored by plain PEFT: the adapter on a freshly quantized base (fp32 compute)."""
    from transformers import AutoTokenizer

    from chainlora import tasks

    base = load_quantized(model_dir, scheme)
    model = PeftModel.from_pretrained(base, adapter).eval()
    task = tasks.get_task("rte")
    test = tasks.load_task_data(task, data=data).sample(0, num_train=0, num_dev=0, num_eval=8).test
    return tasks.evaluate(model, AutoTokenizer.from_pretrained(model_dir), task, test, batch_size=4)["score"]


def test_train_quantize_nf4_cola_resumes_exactly_and_exports_for_the_quantized_base(run_inputs, tmp_path):
    """``chainlora train --quantize nf4 --method cola``: a knot into the residual (recorded), the best dev state
    restored, killed after step 7 and resumed from checkpoint-6 (after the knot) = the uninterrupted run; the
    adapter on a freshly quantized base scores what the run reported."""
    from transformers import TrainerCallback

    from chainlora.config import TrainConfig, parse_config
    from chainlora.recipes.train import train

    model_dir, data = run_inputs
    whole = tmp_path / "whole"
    assert train_cli(model_dir, data, whole, *COLA, "--quantize", "nf4") == 0
    metrics = json.loads((whole / "metrics.json").read_text())
    assert [(k["step"], k["link"], k["quantized_merge"], k["residual_rank"]) for k in metrics["knots"]] == [
        (4, 1, "residual", 8)
    ]
    assert "requantize_errors" not in metrics["knots"][0] and "compression_errors" not in metrics["knots"][0]
    q = metrics["quantized"]
    assert (q["scheme"], q["bitsandbytes"], q["quantized_merge"], q["final"]) == (
        "nf4",
        "0.50.2",
        "residual",
        None,
    )
    assert q["residual_MiB"] == round(4 * 8 * (32 + 32) * 4 / 2**20, 4)  # 4 layers, rank 8, fp32 U and V
    assert metrics["ranks"] == [8, 4] and metrics["adapter"]["rank"] == 8 + 4
    assert not (whole / "final").exists()  # QLoRA: adapter/ is the result unless final/ is asked for
    readme = (whole / "adapter" / "README.md").read_text()
    assert 'quantized.bnb_config("nf4"' in readme  # how to load its base
    assert score_adapter(model_dir, data, whole / "adapter", "nf4") == metrics["test_score"]

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise KeyboardInterrupt

    cut = tmp_path / "cut"
    args = ["--model", str(model_dir), "--data", str(data), "--output_dir", str(cut), *TRAIN, *COLA]
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(TrainConfig, [*args, "--quantize", "nf4"], prog="test"), callbacks=[Stop()])
    assert not (cut / "metrics.json").exists() and (cut / "checkpoints" / "checkpoint-6").is_dir()
    from chainlora.cli import main

    assert main(["train", "--resume", str(cut)]) == 0
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-6")
    for key in ("knots", "dev_history", "selected_step", "test_score", "train_loss", "quantized"):
        assert resumed[key] == metrics[key], key
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_quantize_requantize_with_a_merged_final(run_inputs, tmp_path):
    """``--chain.quantized_merge requantize`` records each knot's error; ``--save_final true`` writes the chain
    merged into the dequantized base in bf16, the cast's error recorded, and tests that model."""
    from transformers import AutoTokenizer

    from chainlora import tasks

    model_dir, data = run_inputs
    out = tmp_path / "run"
    args = [*COLA, "--quantize", "fp4", "--chain.quantized_merge", "requantize", "--save_final", "true"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_cli(model_dir, data, out, *args, "--selection", "last") == 0
    assert any("re-quantization errors" in str(w.message) for w in caught)  # the adapter is not exact
    metrics = json.loads((out / "metrics.json").read_text())
    (knot,) = metrics["knots"]
    assert knot["quantized_merge"] == "requantize" and knot["residual_rank"] == 0
    assert len(knot["requantize_errors"]) == 4 and all(e > 0 for e in knot["requantize_errors"].values())
    final = metrics["quantized"]["final"]
    assert final["dtype"] == "bfloat16" and final["layers"] == 4 and 0 < final["max_relative_error"] < 1e-2
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.bfloat16
    task = tasks.get_task("rte")
    test = tasks.load_task_data(task, data=data).sample(0, num_train=0, num_dev=0, num_eval=8).test
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tasks.evaluate(model, tokenizer, task, test, batch_size=4)["score"] == metrics["test_score"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--quantize", "int4"], "quantize"),
        (["--quantize", "nf4", "--method", "full"], "quantize: method full"),
        (["--quantize", "nf4", "--lora.target_modules", "[q_proj, lm_head]"], "lm_head is not quantized"),
        (["--quantize", "nf4", "{no bitsandbytes}"], "pip install 'chainlora[quantized]'"),
        (["--chain.max_residual_rank", "8"], "chain.max_residual_rank: applies to a quantized base only"),
        (["--quantize", "int8", "--chain.quantized_merge", "lossy"], "chain.quantized_merge"),
    ],
)
def test_train_quantize_bad_input_is_one_line_before_anything_is_written(
    args, expected, run_inputs, tmp_path, capsys, monkeypatch
):
    if "{no bitsandbytes}" in args:
        args = [a for a in args if a != "{no bitsandbytes}"]
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    out = tmp_path / "run"
    assert train_cli(*run_inputs, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then exactly one error line
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and expected in err[-1], err
    assert not out.exists()
