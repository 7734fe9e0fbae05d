"""What a run writes keeps what the run had (#17 items 16-18): ``final/`` is the fp32 merge of the chain in the
base model's own dtype (not the bf16 training copy), its recorded test score is computed on exactly what is
written, ``chainlora eval RUN/final`` reproduces it and says in which precision, ``adapter/`` names its base
portably, and ``final/`` generates with the cache. Made-up data (``chainlora.testing.tiny_task_data``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chainlora import models
from chainlora.cli import main
from chainlora.recipes.export import adapter_reference

RUN = [
    *("--task", "cb", "--method", "cola", "--chain.length", "2", "--precision", "bf16", "--lr", "1e-2"),
    *("--num_train", "16", "--num_dev", "4", "--num_eval", "8", "--batch_size", "4", "--epochs", "2"),
    *("--zero_shot", "false", "--selection", "last"),
]


@pytest.fixture(scope="module")
def bf16_run(tiny_llama_dir, tiny_cb_data, tmp_path_factory) -> Path:
    """A COLA run with the bf16 speed settings: the base trained in bf16, the links and knots in fp32."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(tiny_cb_data), "--output_dir", str(out)]
    assert main([*argv, *RUN]) == 0
    return out


def test_final_is_the_fp32_merge_in_the_base_dtype_and_scores_what_the_run_reported(
    bf16_run, tiny_llama_dir, tiny_cb_data, capsys
):
    metrics = json.loads((bf16_run / "metrics.json").read_text())
    assert metrics["speed"]["base_dtype"] == "bf16" and len(metrics["knots"]) == 1
    assert metrics["test_precision"] == "fp32"  # the tiny base is stored in fp32
    config = json.loads((bf16_run / "final" / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "float32"

    # every merged weight is W0 + Σ s_i·B_i·A_i computed in fp32 from the original base (not the bf16 copy)
    base = load_file(tiny_llama_dir / "model.safetensors")
    adapter = load_file(bf16_run / "adapter" / "adapter_model.safetensors")
    scale = json.loads((bf16_run / "adapter" / "adapter_config.json").read_text())
    final = load_file(bf16_run / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())
    checked = 0
    for key, weight in final.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            stem = key.removesuffix(".weight")
            a = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_A.weight"))
            b = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_B.weight"))
            exact = base[key] + scale["lora_alpha"] / scale["r"] * (b @ a)
            torch.testing.assert_close(weight, exact, rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(weight, base[key])
            checked += 1
        elif key in base:
            assert torch.equal(weight, base[key]), key  # untouched layers: the original fp32 weights
    assert checked == 4

    # the base + adapter/ and final/ compute the same function (an independent fp32 evaluator sees no gap)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(bf16_run / "final")
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), bf16_run / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-5)

    # `chainlora eval RUN/final` scores it as the run did: same task, draw, settings and precision
    out = bf16_run.parent / "eval.json"
    capsys.readouterr()
    assert main(["eval", str(bf16_run / "final"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["score"] == metrics["test_score"] and result["precision"] == "fp32"
    assert (result["task"], result["num_examples"]) == ("cb", 8)
    assert capsys.readouterr().out.strip().endswith(f"model {bf16_run / 'final'}, fp32)")


def test_adapter_names_its_base_portably(bf16_run, tiny_llama_dir):
    adapter_config = json.loads((bf16_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama_dir)  # the path the run was given
    assert str(tiny_llama_dir) in (bf16_run / "adapter" / "README.md").read_text()

    name = next(iter(models.REGISTRY))
    reference, readme = adapter_reference(name)
    assert reference == name  # not this machine's cache folder
    entry = models.REGISTRY[name]
    assert entry.description in readme and entry.pip_command in readme
    assert f'models.load("{name}")' in readme and "PeftModel.from_pretrained" in readme
