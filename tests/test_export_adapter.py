"""The whole chain exported as one standard PEFT LoRA adapter: plain PEFT on the original base reproduces it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from chainlora import merge_chain, tie_knot
from chainlora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, export_adapter, export_run_adapter
from chainlora.errors import ChainLoRAError
from chainlora.links import layer_chain, lora_layers
from chainlora.state import save_chain_state
from chainlora.testing import lora_on_qv as lora
from chainlora.testing import perturb_links, tiny_causal_lm


def chain_8_4(model: nn.Module, **kwargs) -> nn.Module:
    """A chain with links of rank 8 then 4, the current (rank-4) link non-zero."""
    model = lora(model, r=8, **kwargs)
    perturb_links(model)
    tie_knot(model, rank=4)
    perturb_links(model)
    return model


def batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["The capital of France is Paris.", "It was great", "Yes or No? Maybe."]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def dense_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Σ_i s_i·B_i·A_i per layer, in float64, from the links themselves (keys: PEFT module paths)."""
    deltas = {}
    for name, layer, adapter in lora_layers(model):
        delta = layer.scaling[adapter] * (
            layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
        )
        for link in layer_chain(layer).links:
            delta += link.scaling * (link.lora_B.double() @ link.lora_A.double())
        deltas[name.removeprefix(PREFIX)] = delta
    return deltas


def test_chain_exports_as_one_adapter_that_plain_peft_loads_on_the_original_base(
    tiny_model, tokenizer, tmp_path
):
    arch = tiny_model.config.model_type
    model = chain_8_4(tiny_model)
    inputs = batch(tokenizer)
    chained = logits(model, inputs)

    report = export_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == 12 and not config["use_rslora"]
    assert config["lora_bias"] == (arch == "opt") and config["rank_pattern"] == {}
    assert report.links == 2 and set(report.ranks.values()) == {12} and report.max_relative_error == 0.0
    assert report.bytes == (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size > 0

    fresh_base = tiny_causal_lm(arch, vocab_size=len(tokenizer))  # the original W0, rebuilt from the seed
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    assert (logits(loaded, inputs) - chained).abs().max() <= 1e-5
    assert (logits(merge_chain(model), inputs) - chained).abs().max() <= 1e-5


def test_layers_with_different_total_ranks_use_exact_rank_patterns(tokenizer, tmp_path):
    model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)), r=8, rank_pattern={"v_proj": 4})
    perturb_links(model)
    tie_knot(model, rank=2)
    perturb_links(model)
    inputs = batch(tokenizer)
    report = export_adapter(model, tmp_path / "adapter")
    assert sorted(set(report.ranks.values())) == [6, 10]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    loaded = PeftModel.from_pretrained(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / "adapter"
    )
    for _, layer, adapter in lora_layers(loaded):
        assert layer.scaling[adapter] == 1.0
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() <= 1e-5


def test_rslora_chain_exports_exactly(tokenizer, tmp_path):
    model = chain_8_4(tiny_causal_lm("llama", vocab_size=len(tokenizer)), use_rslora=True)
    scalings = {link.scaling for _, layer, _ in lora_layers(model) for link in layer_chain(layer).links}
    assert scalings == {16 / math.sqrt(8)}
    inputs = batch(tokenizer)
    export_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / "adapter"
    )
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() <= 1e-5


def test_fan_in_fan_out_chain_on_gpt2_conv1d_exports_exactly(tmp_path):
    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return AutoModelForCausalLM.from_config(config).eval()

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)
    model = get_peft_model(gpt2(), config)
    perturb_links(model)
    tie_knot(model, rank=2)
    perturb_links(model)
    inputs = {"input_ids": torch.randint(0, 64, (2, 10))}
    export_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"]
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path / "adapter")
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() <= 1e-5


def test_truncation_error_is_the_norm_of_the_dropped_singular_values(tokenizer, tmp_path):
    model = chain_8_4(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    deltas = dense_delta(model)
    report = export_adapter(model, tmp_path / "r5", rank=5)
    tensors = load_file(str(tmp_path / "r5" / ADAPTER_WEIGHTS))
    assert set(report.ranks.values()) == {5} and report.truncated_to == 5
    for name, delta in deltas.items():
        sigma = torch.linalg.svdvals(delta)
        expected = float(sigma[5:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert report.relative_errors[name] == pytest.approx(expected, rel=1e-6)
        exported = (
            tensors[f"{PREFIX}{name}.lora_B.weight"].double()
            @ tensors[f"{PREFIX}{name}.lora_A.weight"].double()
        )
        actual = float(torch.linalg.norm(delta - exported) / torch.linalg.norm(delta))
        assert actual == pytest.approx(expected, rel=1e-4)  # the best rank-5 approximation (Eckart-Young)
    # a rank at or above the chain's total rank is exact
    exact = export_adapter(model, tmp_path / "r64", rank=64)
    assert set(exact.ranks.values()) == {12} and exact.max_relative_error == 0.0


def test_export_refuses_what_one_adapter_cannot_hold(tokenizer, tmp_path):
    with pytest.raises(ChainLoRAError, match="no LoRA layer"):
        export_adapter(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / "plain")
    merged = merge_chain(chain_8_4(tiny_causal_lm("llama", vocab_size=len(tokenizer))))
    with pytest.raises(ChainLoRAError, match="no LoRA layer"):
        export_adapter(merged, tmp_path / "merged")
    with pytest.raises(ChainLoRAError, match="nothing to export"):
        export_adapter(lora(tiny_causal_lm("llama", vocab_size=len(tokenizer))), tmp_path / "zero")
    dora = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)), use_dora=True)
    with pytest.raises(ChainLoRAError, match="cannot export"):
        export_adapter(dora, tmp_path / "dora")
    forgetful = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    perturb_links(forgetful)
    tie_knot(forgetful, keep_links=False)
    with pytest.raises(ChainLoRAError, match="keep_links"):
        export_adapter(forgetful, tmp_path / "forgetful")
    assert not any(p.name in {"plain", "merged", "zero", "dora", "forgetful"} for p in tmp_path.iterdir())


def test_export_refuses_a_folder_holding_another_adapter_unless_overwrite(tokenizer, tmp_path):
    model = chain_8_4(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    target = tmp_path / "adapter"
    export_adapter(model, target)
    export_adapter(model, target)  # the same adapter again: fine
    before = (target / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(ChainLoRAError, match="different adapter"):
        export_adapter(model, target, rank=4)
    assert (target / ADAPTER_WEIGHTS).read_bytes() == before  # untouched
    assert export_adapter(model, target, rank=4, overwrite=True).truncated_to == 4
    assert json.loads((target / ADAPTER_CONFIG).read_text())["r"] == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ChainLoRAError, match="other files"):
        export_adapter(model, other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp left behind


def test_export_run_adapter_from_a_checkpoint_then_compressed(tokenizer, tmp_path):
    model = chain_8_4(tiny_causal_lm("opt", vocab_size=len(tokenizer)))
    inputs = batch(tokenizer)
    run = tmp_path / "run"
    for step in (3, 7):  # the newest checkpoint is read
        checkpoint = run / "checkpoints" / f"checkpoint-{step}"
        model.save_pretrained(checkpoint)
        save_chain_state(model, checkpoint)
    full = export_run_adapter(run)
    assert full["source"].endswith("checkpoint-7") and full["rank"] == 12 and full["links"] == 2
    loaded = PeftModel.from_pretrained(tiny_causal_lm("opt", vocab_size=len(tokenizer)), run / "adapter")
    assert (logits(loaded, inputs) - logits(model, inputs)).abs().max() <= 1e-5

    again = export_run_adapter(run)  # adapter/ exists now: described, not rewritten
    assert again["source"] == str(run / "adapter") and again["bytes"] == full["bytes"]
    small = export_run_adapter(run, rank=4)
    assert small["path"] == str(run / "adapter-r4") and small["rank"] == 4 and small["links"] == 2
    assert 0 < small["max_relative_error"] < 1 and small["bytes"] < full["bytes"]
    with pytest.raises(ChainLoRAError, match="no chain to export"):
        export_run_adapter(tmp_path / "empty")
