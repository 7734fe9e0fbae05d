"""Save and restore the whole chain (merged base weights, tied links, current link, ranks) for resume.

A PEFT checkpoint holds only the current link's A and B; after a knot the *base* weights have moved too, and
after a rank step-down the link has another shape. The chain state file holds everything that the knots
changed, for the LoRA-targeted layers only (small next to the model), so resuming mid-chain is exact.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from chainlora.chain import (
    KnotRecord,
    TiedLink,
    _extend_link,
    _record_rank_in_peft_config,
    lora_layers,
    master_copy,
)
from chainlora.errors import ChainLoRAError
from chainlora.io import atomic_path

CHAIN_STATE_FILE = "chainlora_chain.safetensors"
FORMAT = "chainlora-chain-v1"


def chain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of the chain for every LoRA layer: base weight (fp32 master when kept) and bias, current A/B,
    and each tied link. Keys are ``<layer name>/<what>``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer, adapter in lora_layers(model):
        base = layer.get_base_layer()
        master = getattr(layer, "chainlora_master_weight", None)
        tensors[f"{name}/base_weight"] = (master if master is not None else base.weight).detach()
        tensors[f"{name}/master"] = torch.tensor(master is not None)
        if base.bias is not None:
            tensors[f"{name}/base_bias"] = base.bias.detach()
        tensors[f"{name}/lora_A"] = layer.lora_A[adapter].weight.detach()
        tensors[f"{name}/lora_B"] = layer.lora_B[adapter].weight.detach()
        if layer.lora_B[adapter].bias is not None:
            tensors[f"{name}/lora_B_bias"] = layer.lora_B[adapter].bias.detach()
        tensors[f"{name}/knots"] = torch.tensor(getattr(layer, "chainlora_knots", 0))
        for i, link in enumerate(getattr(layer, "chainlora_links", [])):
            tensors[f"{name}/link{i}/lora_A"] = link.lora_A
            tensors[f"{name}/link{i}/lora_B"] = link.lora_B
            tensors[f"{name}/link{i}/scaling"] = torch.tensor(link.scaling, dtype=torch.float64)
            if link.lora_B_bias is not None:
                tensors[f"{name}/link{i}/lora_B_bias"] = link.lora_B_bias
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def save_chain_state(model: nn.Module, directory: str | Path, knots: list[KnotRecord] = ()) -> Path:
    """Write ``directory/chainlora_chain.safetensors`` atomically (temp + fsync + rename)."""
    path = Path(directory) / CHAIN_STATE_FILE
    metadata = {"format": FORMAT, "knots": json.dumps([asdict(k) for k in knots])}
    with atomic_path(path) as tmp:
        save_file(chain_state_dict(model), str(tmp), metadata=metadata)
    return path


def load_chain_state(model: nn.Module, directory: str | Path) -> list[KnotRecord]:
    """Restore the chain saved by :func:`save_chain_state` into ``model`` (same architecture and LoRA targets).

    Links are resized to the saved rank first (no optimizer must hold them yet). Returns the knot records.
    """
    path = Path(directory) / CHAIN_STATE_FILE
    if not path.is_file():
        raise ChainLoRAError(f"{path} not found: this checkpoint has no chain state to resume from")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ChainLoRAError(f"{path}: not a {FORMAT} file (format={metadata.get('format')!r})")
    layers = list(lora_layers(model))
    saved = {key.split("/")[0] for key in tensors}
    missing = [name for name, _, _ in layers if name not in saved]
    if missing or len(saved) != len(layers):
        raise ChainLoRAError(
            f"{path}: saved chain covers {len(saved)} layers, the model has {len(layers)} LoRA layers"
        )
    with torch.no_grad():
        for name, layer, adapter in layers:
            saved_rank = tensors[f"{name}/lora_A"].shape[0]
            if saved_rank != layer.r[adapter]:
                _extend_link(layer, adapter, saved_rank, "gaussian", None)
            base = layer.get_base_layer()
            weight = tensors[f"{name}/base_weight"]
            if bool(tensors[f"{name}/master"]):
                layer.chainlora_master_weight = master_copy(weight)
            base.weight.copy_(weight)
            if base.bias is not None:
                base.bias.copy_(tensors[f"{name}/base_bias"])
            layer.lora_A[adapter].weight.copy_(tensors[f"{name}/lora_A"])
            layer.lora_B[adapter].weight.copy_(tensors[f"{name}/lora_B"])
            if layer.lora_B[adapter].bias is not None:
                layer.lora_B[adapter].bias.copy_(tensors[f"{name}/lora_B_bias"])
            layer.chainlora_knots = int(tensors[f"{name}/knots"])
            layer.chainlora_links = [
                TiedLink(
                    lora_A=tensors[f"{name}/link{i}/lora_A"],
                    lora_B=tensors[f"{name}/link{i}/lora_B"],
                    scaling=float(tensors[f"{name}/link{i}/scaling"]),
                    lora_B_bias=tensors.get(f"{name}/link{i}/lora_B_bias"),
                )
                for i in range(
                    sum(1 for k in tensors if k.startswith(f"{name}/link") and k.endswith("/lora_A"))
                )
            ]
    ranks = {layer.r[adapter] for _, layer, adapter in layers}
    if len(ranks) == 1:
        _record_rank_in_peft_config(model, ranks.pop())
    return [KnotRecord(**k) for k in json.loads(metadata.get("knots", "[]"))]
